"""TENT (``medxfer adapt --method tent``): only the BatchNorm scale and shift change, the
entropy on the target falls, the label-shift guard fires where the class mix collapses, and the
command works on a trained demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.evaluate.adapt import adapt_batchnorm
from medxfer.evaluate.predict import probs_of_arrays
from medxfer.evaluate.tent import (
    COLLAPSE_RATIO,
    MIN_STEPS,
    guard,
    label_shift_guard,
    mean_entropy,
    tent_adapt,
)

META = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "classes": ["a", "b", "c"]}
FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
    "train.batch_size=16", "eval.n_bootstrap=20", "train.eval_batch_size=64",
    "train.steps_per_epoch=6",
]  # fmt: skip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 3),
    ).eval()  # fmt: skip


def _site(n: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 200, (n, 16, 16)).astype(np.uint8)


def test_tent_updates_only_batchnorm_scale_and_shift() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tent_adapt(model, META, _site(), batch_size=32, steps=5, lr=1e-2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    affine = {f"{i}.{p}" for i in (1, 4) for p in ("weight", "bias")}
    assert affine <= changed  # every scale and shift moved
    assert changed - affine <= {
        f"{i}.{s}" for i in (1, 4) for s in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert not adapted.training and not any(p.requires_grad for p in adapted.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the original's flags are its own


def test_entropy_on_the_target_decreases() -> None:
    model, site = _model(), _site()
    trace: list[float] = []
    tent = tent_adapt(model, META, site, batch_size=32, steps=30, lr=1e-2, trace=trace)
    assert len(trace) == 30 and np.mean(trace[-5:]) < np.mean(trace[:5])
    adabn = adapt_batchnorm(model, META, site, batch_size=32)  # the same statistics, no steps
    e_tent = mean_entropy(probs_of_arrays(tent, META, site))
    e_adabn = mean_entropy(probs_of_arrays(adabn, META, site))
    assert e_tent < e_adabn - 0.01
    # steps=0: one pass over the images, one step per batch, at least MIN_STEPS
    default: list[float] = []
    tent_adapt(model, META, site, batch_size=32, trace=default)
    assert len(default) == MIN_STEPS
    tent_adapt(model, META, _site(32 * (MIN_STEPS + 5)), batch_size=32, trace=default)
    assert len(default) == MIN_STEPS + MIN_STEPS + 5


def test_tent_refuses_what_it_cannot_adapt() -> None:
    no_affine = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))  # fmt: skip
    with pytest.raises(MedxferError, match="scale and shift"):
        tent_adapt(no_affine, META, _site())
    with pytest.raises(MedxferError, match="at least 2 images"):
        tent_adapt(_model(), META, _site()[:1])
    with pytest.raises(MedxferError, match="lr > 0"):
        tent_adapt(_model(), META, _site(), lr=0.0)


def test_label_shift_guard_fires_on_a_collapsed_mix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    balanced = rng.integers(0, 3, 300)
    collapsed = np.where(rng.random(300) < 0.9, 0, balanced)  # 90% one class
    g = label_shift_guard(collapsed, balanced, 3, reference="validation")
    assert g["fired"] and g["ratio"] < COLLAPSE_RATIO and g["largest_share_adapted"] > 0.85
    assert not label_shift_guard(rng.integers(0, 3, 300), balanced, 3, reference="v")["fired"]
    # with the run's stored validation outputs, they are the reference ...
    probs = np.eye(3)[balanced].astype(np.float32)
    np.savez(tmp_path / "val_predictions.npz", probs=probs, labels=balanced, tta=False,
             precision="fp32")  # fmt: skip
    g = guard(tmp_path, collapsed, collapsed, 3)
    assert g["fired"] and g["reference"].startswith("validation")
    # ... without them, the unadapted predictions on the same images: a label shift that the
    # unadapted model already sees is then not the adaptation's doing
    g = guard(tmp_path / "elsewhere", collapsed, collapsed, 3)
    assert not g["fired"] and g["ratio"] == pytest.approx(1.0)


def test_adapt_command_with_tent(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medxfer.evaluate.predict import load_trained

    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]) == 0
    site = tmp_path / "site"
    for f in sorted((synth_root / "test").rglob("*.png")):
        dst = site / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(f)).astype(np.float32) * 0.6 + 20
        Image.fromarray(pixels.astype(np.uint8)).save(dst)
    capsys.readouterr()
    args = ["adapt", str(run), str(site), "--method", "tent", "--steps", "4", "--lr", "0.002"]
    assert main(args) == 0
    out = Path(capsys.readouterr().out.strip())
    rec = json.loads((out / "adapt.json").read_text())
    assert rec["method"] == "tent" and rec["tent"]["steps"] == 4 and rec["tent"]["lr"] == 0.002
    assert len(rec["tent"]["step_entropy"]) == 4
    check = rec["labelled_check"]  # the same cross-fitted check and verdict as AdaBN
    assert check["folds"] == 2 and check["n_images"] == rec["n_images"]
    g = rec["label_shift_guard"]
    assert g["reference"].startswith("validation") and g["threshold"] == COLLAPSE_RATIO
    model, meta = load_trained(out)
    assert meta["adapted"]["method"] == "tent"
    original, _ = load_trained(run)
    changed = {k for k, v in model.state_dict().items()
               if not torch.equal(v, original.state_dict()[k])}  # fmt: skip
    assert any(k.endswith("bn1.weight") for k in changed)
    bn_names = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert all(k.split(".")[-1] in bn_names and ("bn" in k or "downsample.1" in k)
               for k in changed)  # fmt: skip
    assert main(["predict", str(out), str(site), "--out", str(tmp_path / "p.csv")]) == 0
    # one class only: the guard compares with validation's mix and fires, said as a warning
    one = tmp_path / "one"
    cls = max(site.iterdir(), key=lambda p: len(list(p.glob("*.png"))))
    shutil.copytree(cls, one / cls.name)
    capsys.readouterr()
    assert main(["adapt", str(run), str(one), "--method", "tent", "--out", str(tmp_path / "o")]
                ) == 0  # fmt: skip
    g1 = json.loads((tmp_path / "o" / "adapt.json").read_text())["label_shift_guard"]
    err = " ".join(capsys.readouterr().err.split())
    assert ("class mix collapsed" in err) == g1["fired"]
    assert main(["adapt", str(run), str(site), "--method", "tent", "--lr", "0"]) == 2
    assert "lr > 0" in " ".join(capsys.readouterr().err.split())
