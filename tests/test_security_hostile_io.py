"""Bad numbers and a hostile file system end in one message with nothing half-written left;
predict and evaluate cope with unreadable inputs, unfinished runs and another working folder;
the Markdown report prints user text as text."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.report.blocks import Section, Table, Text
from medxfer.report.render import to_markdown
from medxfer.train import checkpoint
from medxfer.train import loop as loop_mod

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=1",
    "train.batch_size=8", "train.steps_per_epoch=1", "train.eval_batch_size=128",
    "eval.n_bootstrap=20", "train.optimizer=sgd", "train.threads=1",
]  # fmt: skip


def _train(data: Path | str, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--run-dir", str(run), *FAST, *extra])


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_is_refused(value: str) -> None:
    with pytest.raises(MedxferError, match="finite"):
        load_config(None, [f"train.lr={value}"])


def test_a_diverging_loss_stops_before_the_epoch_is_saved(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    real = loop_mod.train_one_epoch

    def diverging(model: torch.nn.Module, *args: Any, epoch: int, **kw: Any) -> dict[str, Any]:
        row = real(model, *args, epoch=epoch, **kw)
        if epoch == 1:  # the second epoch's weights blow up
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            row["train_loss"] = float("nan")
        return row

    monkeypatch.setattr(loop_mod, "train_one_epoch", diverging)
    run = tmp_path / "run"
    assert _train(synth_root, run, "train.epochs=3") == 2
    assert "diverged at epoch 2" in capsys.readouterr().err
    best = torch.load(run / "best.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 0 and len(last["history"]) == 1
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert not (run / "metrics.json").exists()


def _full_disk(real: Any) -> Any:
    def save(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
        Path(f).write_bytes(b"half a checkpoint")  # written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_is_one_message_and_leaves_no_temporary_file(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(torch, "save", _full_disk(torch.save))
    run = tmp_path / "run"
    assert _train(synth_root, run) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "the disk is full" in err and "Traceback" not in err
    assert _leftovers(run) == [] and not (run / "best.pt").exists()


def test_atomic_text_write_failure_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.write_text

    def refuse(self: Path, text: str, *a: Any, **kw: Any) -> int:
        real(self, text[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(MedxferError, match="disk is full"):
        checkpoint.atomic_write_json({"a": 1}, tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_folder_is_one_message(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Tests run as root, where chmod 0o555 does not stop a write: the refusal is simulated."""
    locked = tmp_path / "locked"
    real = Path.mkdir

    def mkdir(self: Path, *a: Any, **kw: Any) -> None:
        if self == locked or locked in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert _train(synth_root, locked / "run") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Permission denied" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def relative_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with a relative --data, from the folder that holds the dataset."""
    base = tmp_path_factory.mktemp("relative")
    shutil.copytree(synth_root, base / "set")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        assert _train("set", base / "run") == 0
    return base / "run"


def test_evaluate_finds_the_data_from_another_folder_or_takes_data(
    relative_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # "set" is not here
    assert main(["evaluate", str(relative_run)]) == 0
    moved = relative_run.parent / "moved"
    (relative_run.parent / "set").rename(moved)
    try:
        assert main(["evaluate", str(relative_run)]) == 2
        assert "--data" in capsys.readouterr().err
        assert main(["evaluate", str(relative_run), "--data", str(moved)]) == 0
    finally:
        moved.rename(relative_run.parent / "set")


def test_predict_fails_when_nothing_is_readable_and_warns_on_unfinished_runs(
    relative_run: Path, tmp_path: Path, capsys: Any
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert main(["predict", str(relative_run), str(bad), "--out", str(out)]) == 2
    assert "none of the 1 file(s) could be read" in " ".join(capsys.readouterr().err.split())
    assert "not an image" in out.read_text() or "a.png" in out.read_text()
    run = tmp_path / "unfinished"
    shutil.copytree(relative_run, run)
    (run / "metrics.json").unlink()
    from PIL import Image

    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(bad / "b.png")
    assert main(["predict", str(run), str(bad), "--out", str(out)]) == 0
    assert "has not finished training" in " ".join(capsys.readouterr().err.split())


def test_markdown_report_escapes_user_text(tmp_path: Path) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    sec = Section("classes", "Classes").add(
        Text(f"class {hostile} and *emphasis* and [a link](http://x)"),
        Table(["class", "recall"], [[hostile, "0.5"], ["a|b", "0.25"]], caption=hostile),
    )
    md = to_markdown(f"Report of {hostile}", [sec], tmp_path)
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)>" in md
    assert "\\*emphasis\\*" in md and "\\[a link\\]" in md
    row = next(line for line in md.splitlines() if line.startswith("| a"))
    assert row.replace("\\|", "").count("|") == 3  # the pipe in the class name is not a column
