"""Knowledge distillation: the loss is Hinton's, the teacher never changes or trains, and
`medxfer prune-structured` fine-tunes with it when asked."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from subproc import run as run_diagnosed
from torch import nn

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.train.checkpoint import load_checkpoint
from medxfer.train.distill import DistillationLoss, Teacher

BENCH = Path(__file__).resolve().parents[1] / "studies"


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_loss_is_hintons_formula() -> None:
    teacher, student = _net(0), _net(1)
    x, y = torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    loss_fn = DistillationLoss(ce, Teacher(teacher, 0.7, 3.0), torch.device("cpu"), False)
    logits = student(x)
    got = loss_fn(logits, y, x)
    p_t = F.softmax(teacher(x) / 3.0, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / 3.0, dim=1))).sum(1).mean()
    want = 0.3 * ce(logits, y) + 0.7 * 9.0 * kl
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    same = DistillationLoss(ce, Teacher(student, 1.0), torch.device("cpu"), False)
    assert same(logits, y, x).item() == pytest.approx(0.0, abs=1e-6)  # its own teacher


def test_teacher_is_a_frozen_copy_and_only_the_student_learns() -> None:
    teacher, student = _net(0), _net(1)
    before = copy.deepcopy(teacher.state_dict())
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), Teacher(teacher, 0.5),
                               torch.device("cpu"), True)  # fmt: skip
    assert loss_fn.teacher is not teacher and not loss_fn.teacher.training
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    start = loss_fn(student(x), y, x).item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(student(x), y, x).backward()
        opt.step()
    assert loss_fn(student(x), y, x).item() < start
    assert all(p.grad is None for p in loss_fn.teacher.parameters())
    for k, v in loss_fn.teacher.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in teacher.state_dict().items():  # the caller's model, too
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(("alpha", "temperature", "words"),
                         [(1.5, 4.0, "outside (0, 1]"), (-0.2, 4.0, "outside (0, 1]"),
                          (0.5, 0.0, "not positive")])  # fmt: skip
def test_bad_settings(alpha: float, temperature: float, words: str) -> None:
    with pytest.raises(MedxferError, match=words.replace("(", r"\(").replace("]", r"\]")):
        Teacher(_net(0), alpha, temperature)


FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=2",
    "train.batch_size=8", "train.steps_per_epoch=2", "train.eval_batch_size=128",
    "eval.n_bootstrap=20", "train.optimizer=sgd",
]  # fmt: skip


def test_prune_structured_distills(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("MEDXFER_CACHE", str(tmp_path / "cache"))
    dense = tmp_path / "dense"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(dense), *FAST]) == 0
    assert main(["prune-structured", str(dense), "structured.distill=1.5",
                 "--ratio", "0.5", "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "outside (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work
    runs = {}
    for name, extra in (("plain", []), ("distilled", ["structured.distill=0.7"])):
        out = tmp_path / name
        # an override after an option still counts (cli.parse)
        args = ["prune-structured", str(dense), "train.lr=0.01", "--ratio", "0.5", *extra]
        assert main([*args, "--out", str(out), "--no-latency"]) == 0
        runs[name] = json.loads((out / "structured.json").read_text())
        best = load_checkpoint(out / "best.pt")["model"]
        assert not any(k.startswith("teacher") for k in best)  # only the student is saved
    assert runs["plain"]["finetune"]["distill"] is None
    # a finished folder is bound to its distillation settings, not reported as another's
    for folder, extra in (("plain", ["structured.distill=0.7"]),
                          ("distilled", ["structured.distill=0.5"])):  # fmt: skip
        args = ["prune-structured", str(dense), "train.lr=0.01", "--ratio", "0.5", *extra]
        assert main([*args, "--out", str(tmp_path / folder), "--no-latency"]) == 2
        assert "other settings" in capsys.readouterr().err
    assert runs["distilled"]["finetune"] | {"best_epoch": None} == {
        "epochs": 2,
        "lr": 0.01,
        "best_epoch": None,
        "distill": 0.7,
        "temperature": 4.0,
    }
    # same pruned start, same batches: only the loss differs
    plain = json.loads((tmp_path / "plain" / "history.json").read_text())
    dist = json.loads((tmp_path / "distilled" / "history.json").read_text())
    assert plain[0]["train_loss"] != pytest.approx(dist[0]["train_loss"])

    # studies/structured_speed.py on both (one network: timed once), results kept in tmp_path
    results = tmp_path / "results"
    cmd = [sys.executable, "structured_speed.py", str(dense), str(tmp_path / "plain"),
           str(tmp_path / "distilled"), "--sizes", "32", "--batches", "1", "2", "--threads", "1",
           "--blocks", "2", "--repeats", "2", "--out", "t"]  # fmt: skip
    r = run_diagnosed(cmd, cwd=BENCH, timeout=600,
                       env={**os.environ, "MEDXFER_BENCH_RESULTS": str(results)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((results / "structured-speed" / "t.json").read_text())
    assert [Path(x["structured_run"]).name for x in out["runs"]] == ["plain", "distilled"]
    assert {x["timed_as"] for x in out["runs"]} == {"plain"}
    for x, name in zip(out["runs"], ("plain", "distilled"), strict=True):
        test = json.loads((tmp_path / name / "metrics.json").read_text())["test"]["accuracy"]
        dense_test = json.loads((dense / "metrics.json").read_text())["test"]["accuracy"]
        assert x["accuracy"]["difference"]["points"] == pytest.approx(100 * (test - dense_test))
        assert {c["image_size"] for c in x["targets"]["cases"]} == {32}
    assert (results / "structured-speed" / "t.png").is_file()
    (tmp_path / "other").mkdir()
    bad = [sys.executable, "structured_speed.py", str(dense), str(tmp_path / "other")]
    r = run_diagnosed(bad, cwd=BENCH, timeout=300)
    assert r.returncode == 2 and "has no structured.json" in r.stderr


def test_words_after_options_are_overrides_and_nothing_else() -> None:
    from medxfer.cli import parse

    args = parse(["prune-structured", "run", "a.b=1", "--ratio", "0.4", "train.lr=1e-3"])
    assert args.overrides == ["a.b=1", "train.lr=1e-3"] and args.ratio == 0.4
    with pytest.raises(SystemExit):
        parse(["prune-structured", "run", "--ratio", "0.4", "--bogus"])
    with pytest.raises(SystemExit):
        parse(["prune-structured", "run", "--ratio", "0.4", "stray"])
    with pytest.raises(SystemExit):  # a command without overrides takes none
        parse(["paper-table", "x", "--out", "t.json", "a=b"])
