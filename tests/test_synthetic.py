from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medxfer.data import synthetic
from medxfer.data.sources import discover
from medxfer.data.synthetic import (
    DEFAULT_COUNTS,
    default_synthetic_root,
    ensure_synthetic,
    make_synthetic,
)
from medxfer.errors import MedxferError

SMALL = {"disc": 5, "ring": 4, "bars": 3, "cross": 2}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _load(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for i, cls in enumerate(DEFAULT_COUNTS):
        for p in sorted(root.glob(f"*/{cls}/*.png")):
            images.append(np.asarray(Image.open(p), dtype=np.float32))
            labels.append(i)
    return np.stack(images), np.array(labels)


def _cv_balanced_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")
    )
    return float(cross_val_score(clf, x, y, cv=5, scoring="balanced_accuracy").mean())


def _radial_spectrum(images: np.ndarray) -> np.ndarray:
    """Translation- and rotation-invariant shape features: log radial power spectrum."""
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2)))
    n = images.shape[1]
    yy, xx = np.mgrid[:n, :n] - n // 2
    rings = np.hypot(xx, yy).astype(int).ravel()
    per_ring = np.bincount(rings)
    prof = np.stack([np.bincount(rings, weights=p.ravel()) / per_ring for p in power])
    return np.log(prof[:, 1 : n // 2] + 1e-3)


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", counts=SMALL, test_per_class=2, seed=3)
    b = make_synthetic(tmp_path / "b", counts=SMALL, test_per_class=2, seed=3)
    c = make_synthetic(tmp_path / "c", counts=SMALL, test_per_class=2, seed=4)
    assert _files(a) == _files(b)
    assert _files(a).keys() == _files(c).keys()
    assert _files(a)["train/disc/disc_0000.png"] != _files(c)["train/disc/disc_0000.png"]


def test_counts_imbalance_and_marker(default_set: Path) -> None:
    samples = discover(default_set)
    train = {c: sum(s.split == "train" and s.label == c for s in samples) for c in SMALL}
    test = {c: sum(s.split == "test" and s.label == c for s in samples) for c in SMALL}
    assert train == DEFAULT_COUNTS
    assert max(train.values()) >= 8 * min(train.values())
    assert set(test.values()) == {40}
    marker = (default_set / "SYNTHETIC").read_text()
    assert "SYNTHETIC" in marker and "NOT MEDICAL" in marker and "seed: 0" in marker
    assert "disc=240" in marker and "medxfer" in marker
    assert (default_set / "README.txt").read_text() == marker
    with Image.open(default_set / "train/ring/ring_0000.png") as im:
        assert im.mode == "L" and im.size == (64, 64)


def test_brightness_is_not_predictive_but_shape_is(default_set: Path) -> None:
    images, labels = _load(default_set)
    mean_std = np.stack([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)
    assert _cv_balanced_accuracy(mean_std, labels) < 0.35  # chance is 0.25
    assert _cv_balanced_accuracy(_radial_spectrum(images), labels) > 0.65


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(MedxferError, match="not empty"):
        make_synthetic(tmp_path / "full", counts=SMALL)
    with pytest.raises(MedxferError, match="unknown synthetic"):
        make_synthetic(tmp_path / "x", counts={"blob": 3})


def test_ensure_synthetic_caches_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDXFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DEFAULT_COUNTS", SMALL)
    root = default_synthetic_root(32)
    assert root == tmp_path / "cache" / "synthetic-v1-32"
    root.mkdir(parents=True)
    (root / "half-written.png").write_bytes(b"")  # no marker: incomplete, must be replaced
    assert ensure_synthetic(32) == root
    assert (root / "SYNTHETIC").is_file() and not (root / "half-written.png").exists()
    stamp = (root / "SYNTHETIC").stat().st_mtime_ns
    assert ensure_synthetic(32) == root
    assert (root / "SYNTHETIC").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in root.parent.iterdir()) == ["synthetic-v1-32"]
