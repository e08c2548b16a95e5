"""Hostile model files: a file whose unpickling would run code is refused by every command that
reads a model (one message, the code never runs), loads only with --trust-pickle, and an older
run converts to the weights-only format; the structured model round-trips without pickle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medxfer.cli import main
from medxfer.prune import structured as st  # the names of the format are looked up late

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=1",
    "train.batch_size=8", "train.steps_per_epoch=1", "train.eval_batch_size=128",
    "eval.n_bootstrap=20", "train.optimizer=sgd", "train.threads=1",
]  # fmt: skip


class Payload:
    """Unpickling this calls os.system, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("secure") / "run"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]) == 0
    return run


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _plant(run: Path, name: str, marker: Path) -> None:
    """Replace ``run/name`` with the same content plus the payload."""
    obj = torch.load(run / name, map_location="cpu", weights_only=True)
    obj["extra"] = Payload(marker)
    torch.save(obj, run / name)


def _copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _refused(capsys: pytest.CaptureFixture[str], marker: Path) -> None:
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert not marker.exists()  # the payload never ran
    assert "unpickling" in err and "Traceback" not in err
    assert err.count("error:") == 1 and "--trust-pickle" in err


COMMANDS = {  # command -> (file planted, arguments after the run folder)
    "predict": ("best.pt", ["{images}", "--out", "{tmp}/p.csv"]),
    "shift": ("best.pt", ["{images}", "--out", "{tmp}/s.json"]),
    "adapt": ("best.pt", ["{images}", "--out", "{tmp}/adapted"]),
    "evaluate": ("best.pt", []),
    "evaluate-last": ("last.pt", ["--checkpoint", "last"]),
    "prune-structured": ("best.pt", ["--ratio", "0.5", "--out", "{tmp}/structured"]),
    "prune-export": ("best.pt", []),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_crafted_model_file_never_runs(
    command: str, trained: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = _copy(trained, tmp_path), tmp_path / "marker"
    name, rest = COMMANDS[command]
    _plant(run, name, marker)
    if command == "prune-export":  # a lottery level folder also holds its mask
        torch.save({"masks": {}, "extra": Payload(marker)}, run / "mask.pt")
    args = [a.format(images=images, tmp=tmp_path) for a in rest]
    head = {"evaluate-last": ["evaluate"], "prune-export": ["prune", "--export"]}
    assert main([*head.get(command, [command]), str(run), *args]) == 2
    _refused(capsys, marker)


def test_resume_refuses_a_crafted_last_checkpoint(
    trained: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = _copy(trained, tmp_path), tmp_path / "marker"
    (run / "metrics.json").unlink()  # an interrupted run
    _plant(run, "last.pt", marker)
    args = ["train", "--data", str(synth_root), "--run-dir", str(run), "--resume", *FAST]
    assert main(args) == 2
    _refused(capsys, marker)


def test_gan_sample_refuses_a_crafted_generator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    torch.save({"kind": "medxfer-wgan-gp", "extra": Payload(marker)}, tmp_path / "generator.pt")
    assert main(["gan", "sample", str(tmp_path / "generator.pt"), "--n", "a:1"]) == 2
    _refused(capsys, marker)


def test_trust_pickle_loads_the_file(
    trained: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = _copy(trained, tmp_path), tmp_path / "marker"
    _plant(run, "best.pt", marker)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(images), "--out", str(out), "--trust-pickle"]) == 0
    assert marker.exists() and len(out.read_text().splitlines()) == 5  # the user's choice


def _pruned(trained: Path, steps: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    best = torch.load(trained / "best.pt", weights_only=True)
    meta, n = best["meta"], len(best["meta"]["classes"])
    states = []
    if steps > 1:  # the weights step 1's fine-tune chose: any of its shapes will do
        first = st.pruned_model("resnet18", best["model"], n, st.step_ratios(0.5, 2)[0], 32)
        states = [{k: v + 0.01 if v.is_floating_point() else v
                   for k, v in first.state_dict().items()}]  # fmt: skip
    model = st.pruned_model("resnet18", best["model"], n, 0.5, 32, steps=steps, states=states)
    return model, meta


@pytest.mark.parametrize("steps", [1, 2])
def test_structured_model_round_trips_without_pickle(
    trained: Path, tmp_path: Path, steps: int
) -> None:
    model, meta = _pruned(trained, steps)
    st.save_structured(tmp_path / "model.pt", model, st.structure_meta(meta, 0.5, steps))
    raw = torch.load(tmp_path / "model.pt", weights_only=True)  # tensors and plain values
    assert raw["meta"]["structure"] == {"ratio": 0.5, "steps": steps}
    loaded, loaded_meta = st.load_structured(tmp_path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded_meta["classes"] == meta["classes"]


def test_old_structured_run_is_refused_then_converted(
    trained: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, meta = _pruned(trained, 1)
    out = tmp_path / "structured"
    out.mkdir()
    (out / "structured_settings.json").write_text(json.dumps({"ratio": 0.5}))
    torch.save({"format": st.LEGACY_FORMAT, "module": model, "meta": meta}, out / "model.pt")
    csv_out = str(tmp_path / "p.csv")
    assert main(["predict", str(out), str(images), "--out", csv_out]) == 2
    assert "medxfer convert" in " ".join(capsys.readouterr().err.split())
    assert main(["convert", str(out)]) == 2  # converting unpickles: only when asked
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["convert", str(out), "--trust-pickle"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "model.pt")
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    torch.load(out / "model.pt", weights_only=True)
    loaded, _ = st.load_structured(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert main(["predict", str(out), str(images), "--out", csv_out]) == 0
    assert main(["convert", str(out)]) == 0  # nothing left to convert


def test_every_file_a_run_writes_loads_weights_only(trained: Path) -> None:
    files = sorted(trained.rglob("*.pt"))
    assert {p.name for p in files} >= {"best.pt", "last.pt"}
    for path in files:
        torch.load(path, weights_only=True)


def test_the_recipe_rebuilds_shapes_whatever_the_weights() -> None:
    """The structured format's premise: a cut's shapes depend on the ratio, not the weights."""
    from medxfer.models import create_model

    def shapes(seed: int) -> dict[str, tuple[int, ...]]:
        torch.manual_seed(seed)
        m = create_model("resnet18", weights="none", num_classes=3).model
        st.prune_channels(m, "fc", 0.4, 32)
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    assert shapes(0) == shapes(1)


def test_every_file_a_gan_writes_loads_weights_only(synth_root: Path, tmp_path: Path) -> None:
    from medxfer.config import load_config
    from medxfer.gan.trainer import train_gan

    tiny = ["gan.width=4", "gan.z_dim=8", "gan.batch_size=8", "gan.n_critic=1", "gan.steps=2",
            "gan.checkpoint_every=1", "gan.sample_every=2", "gan.min_images=10"]  # fmt: skip
    cfg = load_config(None, [f"data.root={synth_root}", "data.image_size=32", *tiny])
    train_gan(cfg, tmp_path / "gan")
    files = sorted((tmp_path / "gan").rglob("*.pt"))
    assert "generator.pt" in {p.name for p in files} and "state.pt" in {p.name for p in files}
    for path in files:
        torch.load(path, weights_only=True)
