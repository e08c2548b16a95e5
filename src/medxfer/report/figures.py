"""Figures only the report draws: class balance before/after synthesis, real beside synthetic."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def manifest_counts(manifest: Path) -> dict[str, int]:
    """Synthetic images per class in a ``medxfer gan sample`` manifest."""
    with open(manifest, newline="") as fh:
        return dict(Counter(row["label"] for row in csv.DictReader(fh)))


def plot_class_balance(before: dict[str, int], added: dict[str, int], path: Path) -> Path:
    """Stacked bars: real training images per class, and the synthetic ones on top."""
    plt = _plt()
    classes = list(before)
    real = np.array([before[c] for c in classes])
    synth = np.array([added.get(c, 0) for c in classes])
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.bar(classes, real, label="real", color="tab:blue")
    if synth.any():
        ax.bar(classes, synth, bottom=real, label="synthetic (GAN)", color="tab:orange")
    ax.set_ylabel("training images")
    ax.set_title("Class balance of the training split")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(path: str, size: int) -> np.ndarray:
    from medxfer.data.io import read_image, resize

    return resize(read_image(path, "gray"), size, "pad")


def plot_real_vs_synthetic(
    real: dict[str, list[str]], synthetic: dict[str, list[str]], path: Path, size: int = 64
) -> Path:
    """Per class one row: real training images on the left, GAN images on the right."""
    plt = _plt()
    classes = [c for c in synthetic if synthetic[c]]
    n = max([len(real.get(c, [])) for c in classes] + [len(synthetic[c]) for c in classes] + [1])
    fig, axes = plt.subplots(
        max(1, len(classes)),
        2 * n,
        squeeze=False,
        figsize=(1.1 * 2 * n, 1.25 * max(1, len(classes))),
    )
    for ax in axes.ravel():
        ax.axis("off")
    for row, c in enumerate(classes):
        for kind, files, start in (("real", real.get(c, []), 0), ("GAN", synthetic[c], n)):
            for k, f in enumerate(files[:n]):
                ax = axes[row][start + k]
                ax.imshow(_load(f, size), cmap="gray", vmin=0, vmax=255)
                if k == 0:
                    ax.set_title(f"{c}: {kind}", fontsize=7, loc="left")
    fig.suptitle("Real training images (left) beside GAN images (right)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_files(
    root: str, manifest: Path, per_class: int, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """A seeded sample of real training files and GAN files for each synthesised class."""
    from medxfer.data.sources import discover

    rng = np.random.default_rng(seed)
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    synth: dict[str, list[str]] = {}
    for row in rows:
        p = Path(row["path"])
        synth.setdefault(row["label"], []).append(
            str(p if p.is_absolute() else manifest.parent / p)
        )
    real: dict[str, list[str]] = {}
    for s in discover(root):
        if s.split in ("train", "") and s.label in synth:
            real.setdefault(s.label, []).append(s.path)

    def pick(files: list[str]) -> list[str]:
        return [files[i] for i in sorted(rng.permutation(len(files))[:per_class])]

    return ({c: pick(f) for c, f in real.items()}, {c: pick(f) for c, f in synth.items()})
