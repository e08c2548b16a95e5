from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from medxfer.evaluate.figures import (
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    save_all_figures,
)

NAMES = ["benign", "malignant", "normal"]
HISTORY = [
    {"epoch": 1, "train_loss": 1.1, "val_loss": 1.0, "val_accuracy": 0.5, "lr": 1e-3},
    {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.6, "lr": 5e-4},
    {"epoch": 3, "train_loss": 0.6, "val_balanced_accuracy": 0.62, "lr": 1e-4},  # no val loss
    {"train_loss": 0.5},  # no epoch: falls back to row index
]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=90)
    logits = rng.normal(size=(90, 3))
    logits[np.arange(90), y] += 1.5
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file()
    assert path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 200 and img.height > 200


def test_save_all_figures(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    out = save_all_figures(tmp_path, y, p, NAMES, HISTORY, prefix="val")
    assert set(out) == {"confusion_matrix", "roc", "reliability", "training_curves"}
    for rel in out.values():
        assert not Path(rel).is_absolute()
        assert_png(tmp_path / rel)
    assert out["roc"] == "figures/val_roc.png"
    assert plt.get_fignums() == []  # every figure was closed


def test_save_all_figures_without_history(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    y, p = data
    out = save_all_figures(tmp_path, y, p, NAMES, history=None)
    assert "training_curves" not in out
    assert len(out) == 3


def test_individual_plots(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    cm = np.array([[20, 3, 1], [4, 25, 2], [0, 0, 0]])  # an empty row must not divide by 0
    assert_png(plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png"))
    assert_png(plot_confusion_matrix(cm, NAMES, tmp_path / "cm_raw.png", normalize=False))
    assert_png(plot_roc(y, p, NAMES, tmp_path / "roc.png"))
    assert_png(plot_reliability(y, p, tmp_path / "rel.png", n_bins=10))
    assert_png(plot_training_curves(HISTORY, tmp_path / "sub" / "curves.png"))


def test_roc_with_class_absent(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    keep = y != 1
    assert_png(plot_roc(y[keep], p[keep], NAMES, tmp_path / "roc.png"))


def test_confusion_matrix_shape_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_confusion_matrix(np.eye(2, dtype=int), NAMES, tmp_path / "cm.png")
