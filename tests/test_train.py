"""End to end on the synthetic set: CLI, resume equals uninterrupted, predict, clear errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from stopping import StopAfterOneEpoch, Stopped

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.evaluate.finish import fit_and_evaluate
from medxfer.train.loop import fit

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
    "train.batch_size=16", "eval.n_bootstrap=50", "train.eval_batch_size=64",
    "train.steps_per_epoch=6",
]  # fmt: skip


def _cfg(root: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"data.root={root}", f"out_dir={out}", *FAST, *extra])


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_end_to_end(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(synth_root), "--run-dir", str(tmp_path / "run"),
            "model.arch=efficientnet_lite0", "model.weights=imagenet", "data.image_size=64",
            "train.epochs=2", "train.batch_size=16", "eval.n_bootstrap=100"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().out.strip().endswith(str(run))
    for name in ("config.yaml", "best.pt", "last.pt", "history.csv", "history.json",
                 "metrics.json", "figures/test_confusion_matrix.png", "figures/test_roc.png",
                 "figures/training_curves.png"):  # fmt: skip
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["data"]["synthetic"] is True
    assert set(m["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "ci95", "ece"}
    assert m["test"]["balanced_accuracy"] > 0.4  # 4 classes: chance is 0.25
    near = m["test_near_copies"]  # test accuracy apart for near copies of training images
    n_test = sum(m["data"]["counts"]["test"].values())
    assert near["with_a_near_copy"]["images"] + near["without"]["images"] == n_test
    assert len(json.loads((run / "history.json").read_text())) == 2
    # a second call with the same config sees the completed run and does not retrain
    assert main([*args[:4], *args[4:]]) == 0
    # predict on a folder
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(run), str(synth_root / "test"), "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == sum(1 for _ in (synth_root / "test").rglob("*.png"))
    p = [float(rows[0][k]) for k in rows[0] if k.startswith("p_")]
    assert len(p) == 4 and abs(sum(p) - 1) < 1e-4
    # the model runs in the channels-last (NHWC) layout, with the probabilities of NCHW
    import numpy as np

    from medxfer.evaluate.predict import (
        load_trained,
        preprocess_arrays,
        probs_of_arrays,
        read_arrays,
    )

    model, meta = load_trained(run)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.is_contiguous(memory_format=torch.channels_last)
    arrays = np.stack(read_arrays(meta, sorted((synth_root / "test").rglob("*.png"))[:8])[0])
    nhwc = probs_of_arrays(model, meta, arrays)
    with torch.no_grad():
        nchw = torch.softmax(model.to(memory_format=torch.contiguous_format)(
            preprocess_arrays(meta, arrays)), dim=1).numpy()  # fmt: skip
    assert not stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(nhwc, nchw, atol=1e-5)
    # predict's CSV came from the BatchNorm-folded model: the same probabilities
    files = sorted((synth_root / "test").rglob("*.png"))[:8]
    by_path = {r["path"]: [float(r[f"p_{c}"]) for c in meta["classes"]] for r in rows}
    assert np.allclose([by_path[str(f)] for f in files], nhwc, atol=1e-4)
    # and on a single DICOM file
    from test_io import _write_dicom

    _write_dicom(tmp_path / "scan.dcm", np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (100, 1)))
    assert (
        main(["predict", str(run / "best.pt"), str(tmp_path / "scan.dcm"), "--out", str(out_csv)])
        == 0
    )
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and rows[0]["predicted"] in {"disc", "ring", "bars", "cross"}


def test_resume_equals_uninterrupted(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path, "train.epochs=3", "train.steps_per_epoch=4")
    fit_and_evaluate(cfg, tmp_path / "straight")
    with pytest.raises(Stopped):
        fit_and_evaluate(cfg, tmp_path / "killed", callbacks=(StopAfterOneEpoch(),))
    assert not (tmp_path / "killed" / "metrics.json").exists()
    fit_and_evaluate(cfg, tmp_path / "killed", resume=True)
    assert _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "killed" / "last.pt")
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["test"]
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())["test"]
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_resume_with_other_thread_count_warns(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(synth_root, tmp_path, "train.epochs=2", "train.steps_per_epoch=2")

    class CheckThreadsThenStop(StopAfterOneEpoch):
        def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
            assert row["threads"] == torch.get_num_threads()  # each epoch records its threads
            super().on_epoch_end(epoch, row)

    with pytest.raises(Stopped):
        fit(cfg, tmp_path / "run", callbacks=(CheckThreadsThenStop(),))
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        capsys.readouterr()
        fit(cfg, tmp_path / "run", resume=True)
    finally:
        torch.set_num_threads(before)
    out = " ".join(capsys.readouterr().err.split())
    assert f"epochs so far ran with {before} CPU threads, this call has {before + 1}" in out


def test_sigkill_then_resume(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real kill -9 in the middle of training, then `--resume`."""
    base = [sys.executable, "-m", "medxfer", "train", "--data", str(synth_root), *FAST,
            "train.epochs=3", "train.steps_per_epoch=4"]  # fmt: skip
    subprocess.run([*base, "--run-dir", str(tmp_path / "a")], check=True, capture_output=True)
    proc = subprocess.Popen([*base, "--run-dir", str(tmp_path / "b")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "b" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert main([*base[3:], "--run-dir", str(tmp_path / "b")]) == 2  # in process: no import
    assert "--resume" in capsys.readouterr().err
    subprocess.run(
        [*base, "--run-dir", str(tmp_path / "b"), "--resume"], check=True, capture_output=True
    )
    assert _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


@pytest.mark.parametrize("freeze", ["head", "unfreeze_after"])
def test_freezing_policies(synth_root: Path, tmp_path: Path, freeze: str) -> None:
    from medxfer.models import create_model

    opts = ["train.class_weight=true", "train.weighted_sampling=true", "train.optimizer=sgd"]
    cfg = _cfg(synth_root, tmp_path, f"model.freeze={freeze}", "model.unfreeze_epoch=1", *opts)
    torch.manual_seed(cfg.train.seed)  # fit builds the model right after this seed
    init = create_model("resnet18", weights="none", num_classes=4).model.state_dict()
    trained = fit(cfg, tmp_path / freeze)
    # fit ends after training: evaluation and metrics.json are evaluate.finish's
    assert trained.best_path.exists() and not (tmp_path / freeze / "metrics.json").exists()
    final = torch.load(tmp_path / freeze / "last.pt", weights_only=False)["model"]
    backbone = [k for k in init if not k.startswith("fc.")]
    unchanged = all(torch.equal(init[k], final[k]) for k in backbone)
    assert unchanged == (freeze == "head")  # head-only: backbone and its BN stats untouched
    assert not torch.equal(init["fc.weight"], final["fc.weight"])


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medxfer", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--data", "/no/such/folder"], "does not exist"),
        (["train", "model.arch=vgg77", "--data", "{synth}"], "unknown architecture"),
        (["train", "train.lrr=1"], "valid names under train"),
        (["predict", "/no/run", "/no/img.png"], "no checkpoint"),
    ],
)
def test_bad_input_is_one_clear_message(
    synth_root: Path, tmp_path: Path, args: list[str], needle: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """In process (the command line itself is run as a process by the next test)."""
    args = [a.replace("{synth}", str(synth_root)) for a in args]
    if args[0] == "train":
        args += ["--run-dir", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    """The unreadable file is named whole: a long path is not broken across lines (a
    terminal of 80 columns) and brackets in it are not read as markup."""
    import numpy as np
    from PIL import Image

    data = tmp_path / ("site [bold] " + "x" * 70)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), np.uint8)).save(
                data / c / f"{i}.png"
            )
    (data / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    r = _run_cli("train", "--data", str(data), "--run-dir", str(tmp_path / "r"), *FAST)
    assert r.returncode == 2 and str(data / "a" / "broken.png") in r.stderr
    assert "skip_unreadable" in r.stderr and "Traceback" not in r.stderr
