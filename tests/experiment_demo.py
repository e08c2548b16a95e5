"""The demo experiment on a tiny budget, run once per test session and shared by
tests/test_experiment.py and tests/test_report.py (not a test module itself)."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# the demo's own settings, shrunk: 32 px, 1 epoch, 2 trials of 1 epoch, 1 prune level
TINY = [
    "data.image_size=32",
    "train.epochs=1",
    "train.steps_per_epoch=3",
    "train.early_stopping=0",
    "tune.n_trials=2",
    "tune.epochs=1",
    "prune.levels=1",
    "eval.n_bootstrap=50",
    "report.gradcam_per_class=1",
    "report.gan_samples_per_class=2",
]
# the GAN stage runs when medxfer.gan is installed, with a few generator steps
GAN = [
    "gan.steps=4",
    "gan.balance=0.3",
    "gan.batch_size=16",
    "gan.n_critic=1",
    "gan.min_images=10",
    "gan.sample_every=1000",
    "gan.checkpoint_every=2",
    "gan.width=8",
    "gan.z_dim=16",
    "gan.quality_size=64",
    "gan.gate_size=64",
    "gan.gate_images=40",
]


def gan_available() -> bool:
    return importlib.util.find_spec("medxfer.gan") is not None


def tiny_overrides(out_dir: Path) -> list[str]:
    extra = GAN if gan_available() else ["stages.gan=false"]
    return [f"out_dir={out_dir}", *TINY, *extra]


@functools.cache
def run_demo(out_dir: Path, cache: Path) -> Path:
    """``medxfer run configs/demo.yaml`` with the tiny overrides; returns the experiment folder."""
    from medxfer.cli import main

    os.environ["MEDXFER_CACHE"] = str(cache)
    assert main(["run", str(DEMO), *tiny_overrides(out_dir)]) == 0
    return out_dir / "experiments" / "demo"
