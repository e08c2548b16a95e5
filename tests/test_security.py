"""Hostile or careless input: --force deletes only medxfer's own folders, a resumed or reused run
is the run it claims to be, and a manifest cannot contradict itself or leave its folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from stopping import StopAfterOneEpoch, Stopped

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.data.prepare import list_samples
from medxfer.data.synthetic import make_synthetic
from medxfer.errors import MedxferError
from medxfer.runs import MARKER, make_run_dir, remove_run_dir
from medxfer.train.loop import fit

TINY = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=2",
    "train.batch_size=8", "train.eval_batch_size=64", "train.steps_per_epoch=2",
    "eval.n_bootstrap=10", "train.bn_recalibrate=false", "train.threads=1",
]  # fmt: skip


def _dataset(where: Path) -> Path:
    """A small image set that looks like a user's own (no SYNTHETIC marker)."""
    root = make_synthetic(where, size=32, counts={"disc": 24, "ring": 24}, test_per_class=6)
    (root / "SYNTHETIC").unlink()
    return root


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "data")


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr without any white space (the console wraps long paths anywhere)."""
    return "".join(capsys.readouterr().err.split())


def _says(err: str, *needles: str) -> bool:
    return all("".join(n.split()) in err for n in needles)


# --force --------------------------------------------------------------------------------------


def _force(command: str, data: Path, out: Path) -> list[str]:
    if command == "train":
        return ["train", "--data", str(data), "--run-dir", str(out), "--force", *TINY]
    if command == "prune-structured":  # its input is a run; the run's data is an input too
        run = make_run_dir(out.parent / "source-run", "train")
        (run / "config.yaml").write_text(f"data:\n  root: {data}\n")
        return ["prune-structured", str(run), "--out", str(out), "--force"]
    head = ["gan", "train"] if command == "gan" else [command]
    return [*head, "--data", str(data), "--out", str(out), "--force", *TINY]


COMMANDS = ["train", "prune", "prune-structured", "gan"]


@pytest.mark.parametrize("command", COMMANDS)
def test_force_never_deletes_the_data(
    command: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(data)
    for out in (data, data.parent):  # the data folder itself, and a folder holding it
        assert main(_force(command, data, out)) == 2
        assert _says(_err(capsys), "is or holds the input")
        assert _files(data) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_force_never_deletes_a_user_folder(
    command: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    assert main(_force(command, data, mine)) == 2
    err = _err(capsys)
    assert _says(err, f"no {MARKER} marker", "before the marker existed")
    assert (mine / "thesis.docx").read_text() == "years of work"


def test_force_replaces_a_run_medxfer_made(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--run-dir", str(run), *TINY, "train.epochs=1"]
    assert main(args) == 0
    assert json.loads((run / MARKER).read_text())["kind"] == "train"
    (run / "stale.txt").write_text("left by the first run")
    assert main([*args, "--force"]) == 0
    assert (run / "metrics.json").exists() and not (run / "stale.txt").exists()


def test_remove_run_dir_guards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = make_run_dir(tmp_path / "parent", "train")
    inner = parent / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)  # a marked folder holding the current directory
    with pytest.raises(MedxferError, match="the current directory"):
        remove_run_dir(parent)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(inner))
    with pytest.raises(MedxferError, match="home folder"):
        remove_run_dir(parent)
    with pytest.raises(MedxferError, match="file-system root"):
        remove_run_dir(Path("/"))
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a.txt").write_text("x")
    make_run_dir(busy, "train")  # a folder that already holds files is never marked
    with pytest.raises(MedxferError, match="not made by medxfer"):
        remove_run_dir(busy)
    remove_run_dir(parent)
    assert not parent.exists() and busy.exists()


# resume and reuse ------------------------------------------------------------------------------


def _killed_run(data: Path, run: Path) -> None:
    """A run of TINY on ``data`` stopped after its first epoch."""
    cfg = load_config(None, [f"data.root={data}", *TINY])
    with pytest.raises(Stopped):
        fit(cfg, run, callbacks=(StopAfterOneEpoch(),))
    assert (run / "last.pt").exists() and not (run / "metrics.json").exists()


def _train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--run-dir", str(run), *TINY, *extra])


def test_resume_after_images_were_added_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _killed_run(data, run)
    config = (run / "config.yaml").read_text()
    for i, png in enumerate(sorted((data / "train" / "disc").glob("*.png"))[:4]):
        shutil.copy(png, data / "train" / "disc" / f"added-{i}.png")
    capsys.readouterr()
    assert _train(data, run, "--resume") == 2
    err = _err(capsys)
    assert _says(err, "4 image(s) added", "cannot be resumed", "new run folder")
    assert (run / "config.yaml").read_text() == config


@pytest.mark.parametrize("change", ["train.lr=0.01", "train.epochs=3"])
def test_resume_with_another_config_is_refused(
    change: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _killed_run(data, run)
    config = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert _train(data, run, "--resume", change) == 2
    err = _err(capsys)
    assert _says(err, f"config changed: {change.split('=')[0]}")
    assert (run / "config.yaml").read_text() == config


def test_resume_with_the_same_data_and_config_continues(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _killed_run(data, run)
    # threads only change how a run is computed: a resume may change them
    assert _train(data, run, "--resume", "train.threads=2") == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (run / "metrics.json").exists()


def test_finished_run_of_another_config_is_not_reused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _train(data, run, "train.epochs=1") == 0
    capsys.readouterr()
    assert _train(data, run, "train.epochs=1") == 0  # the same: reported as it is
    assert _says(_err(capsys), "already complete")
    assert _train(data, run, "train.epochs=1", "augment.rotate_deg=30") == 2
    err = _err(capsys)
    assert _says(err, "cannot be reused", "augment.rotate_deg 10.0 -> 30.0")
    sorted((data / "train" / "ring").glob("*.png"))[0].unlink()
    assert _train(data, run, "train.epochs=1") == 2
    assert _says(_err(capsys), "1 image(s) removed")


# manifests -------------------------------------------------------------------------------------


def _manifest(data: Path, rows: list[tuple[str, str, str]], name: str = "m.csv") -> Path:
    path = data / name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def _rows(data: Path) -> list[tuple[str, str, str]]:
    return [
        (str(p.relative_to(data)), p.parent.name, p.parts[-3])
        for p in sorted(data.glob("*/*/*.png"))
    ]


@pytest.mark.parametrize("conflict", ["label", "split"])
def test_contradicting_manifest_rows_stop_or_are_dropped(
    conflict: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _rows(data)
    path, label, split = rows[0]
    other = ("ring", split) if conflict == "label" else (label, "train")
    assert split == "test"  # the first row, in sorted order
    csv_path = _manifest(data, [*rows, (path, *other)])
    assert main(["train", "--data", str(csv_path), f"out_dir={data.parent / 'runs'}", *TINY]) == 2
    err = _err(capsys)
    assert _says(err, "1 image(s) are listed with two labels or in two splits", Path(path).name)
    assert _says(err, "data.drop_conflicts=true")
    cfg = load_config(None, [f"data.root={csv_path}", "data.drop_conflicts=true"])
    samples, _, _, dropped = list_samples(cfg.data)
    assert dropped == [str(data / path)]
    assert len(samples) == len(rows) - 1 and str(data / path) not in {s.path for s in samples}


def test_repeated_manifest_row_counts_once(data: Path) -> None:
    rows = _rows(data)
    cfg = load_config(None, [f"data.root={_manifest(data, [*rows, rows[0]])}"])
    assert len(list_samples(cfg.data)[0]) == len(rows)


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_manifest_paths_outside_its_folder_are_refused(
    outside: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sub = data / "lists"
    sub.mkdir()
    away = tmp_path / "elsewhere.png"
    shutil.copy(sorted(data.glob("train/disc/*.png"))[0], away)
    far = "../elsewhere.png" if outside == "relative" else str(away)
    rows = [("../" + p, label, split) for p, label, split in _rows(data)]  # data/ is above
    csv_path = _manifest(sub, [(p, lab, sp) for p, lab, sp in rows])
    with pytest.raises(MedxferError, match="point outside its folder"):
        list_samples(load_config(None, [f"data.root={csv_path}"]).data)
    inside = [(p.removeprefix("../"), lab, sp) for p, lab, sp in rows]
    csv_path = _manifest(data, [*inside, (far, "disc", "train")])
    assert main(["train", "--data", str(csv_path), f"out_dir={tmp_path / 'runs'}", *TINY]) == 2
    err = _err(capsys)
    assert _says(err, "1 row(s)", "elsewhere.png", "data.allow_outside_root")
    ok = load_config(None, [f"data.root={csv_path}", "data.allow_outside_root=true"])
    assert str(away) in {str(Path(s.path).resolve()) for s in list_samples(ok.data)[0]}
