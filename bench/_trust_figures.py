"""bench/trust.py's figures (PNG): what the shifts look like, accuracy and flags by severity,
detector AUROC per case, flag shares per case, risk-coverage on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after matplotlib.use
import numpy as np
from _trust_tables import FLAGS, Scored
from matplotlib.figure import Figure

from medxfer.evaluate.selective import risk_coverage
from medxfer.evaluate.shifts import SEVERITIES, SHIFTS, apply_shift

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def examples(image: np.ndarray, out: Path, seed: int) -> Path:
    """One test image (at the size the shifts act on) under every shift and severity."""
    fig, axes = plt.subplots(len(SHIFTS), 4, figsize=(6.4, 1.6 * len(SHIFTS)))
    for row, shift in enumerate(SHIFTS):
        shown = [image] + [apply_shift(image[None], shift, s, seed=seed)[0] for s in SEVERITIES]
        for col, img in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("original" if col == 0 else f"severity {col}", fontsize=9)
        axes[row, 0].set_ylabel(shift, fontsize=9)
    return _save(fig, out)


def by_severity(test: dict[str, Any], covariate: list[dict[str, Any]], out: Path) -> Path:
    """Per shift, from the test split (severity 0) to severity 3: accuracy, accepted accuracy,
    fraction `ok`, fraction of errors flagged."""
    panels = [
        ("accuracy", "accuracy"),
        ("accepted_accuracy", "accuracy of `ok` images"),
        ("ok_fraction", "fraction `ok`"),
        ("errors_flagged", "errors flagged"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for shift in SHIFTS:
            rows = sorted(
                (r for r in covariate if r["shift"] == shift), key=lambda r: r["severity"]
            )
            xs = [0] + [r["severity"] for r in rows]
            ys = [test.get(key)] + [r.get(key) for r in rows]
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=shift)
        ax.set_title(title)
        ax.set_xticks([0, *SEVERITIES], ["test", *map(str, SEVERITIES)])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=2)
    for ax in axes[1]:
        ax.set_xlabel("severity")
    return _save(fig, out)


def auroc_heatmap(rows: list[dict[str, Any]], out: Path) -> Path:
    """AUROC of each detector (columns; `chosen` = the run's) against the test split, per case."""
    rows = [r for r in rows if "detectors" in r]
    names = list(rows[0]["detectors"])
    grid = np.array([[r["detectors"][n]["auroc"] for n in names] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 0.28 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["case"] for r in rows], fontsize=8)
    for i, j in np.ndindex(grid.shape):
        ax.text(
            j,
            i,
            f"{grid[i, j]:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if grid[i, j] < 0.8 else "black",
        )
    fig.colorbar(im, ax=ax, label="AUROC against the test split")
    return _save(fig, out)


def flag_shares(rows: list[dict[str, Any]], out: Path) -> Path:
    """Stacked shares of ok / review / unfamiliar per case."""
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    colours = {"ok": "#4c9f70", "review": "#e0a030", "unfamiliar": "#c0504d"}
    for flag in FLAGS:
        share = np.array([r["flags"][flag] for r in rows])
        ax.barh(range(len(rows)), share, left=left, color=colours[flag], label=flag)
        left += share
    ax.set_yticks(range(len(rows)), [r["case"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of images")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out)


def risk_coverage_plot(cases: dict[str, tuple[Scored, np.ndarray]], out: Path) -> Path:
    """Risk-coverage curves ranking by the top softmax probability and by the failure score."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (s, labels) in cases.items():
        correct = s.pred == labels
        for rank, conf, style in (
            ("MSP", s.probs.max(axis=1), "--"),
            ("failure score", -s.failure, "-"),
        ):
            cov, risk = risk_coverage(correct, conf)
            ax.plot(cov, risk, style, label=f"{name}: {rank}")
    ax.set_xlabel("coverage (fraction accepted, most confident first)")
    ax.set_ylabel("risk (error rate of the accepted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
