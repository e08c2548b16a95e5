"""Evaluation figures as PNG files: confusion matrix, ROC, training curves, reliability, and
the per-class output distributions of ``medxfer shift``.

Every function writes one file and closes its figure, so long runs do not leak memory.
The Agg backend is forced here because training runs headless (servers, CI, containers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after matplotlib.use: pyplot binds the backend on import
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from medxfer.evaluate.metrics import expected_calibration_error, reliability_bins

DPI = 120


def _save(fig: Figure, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_confusion_matrix(
    cm: np.ndarray | Sequence[Sequence[int]],
    class_names: list[str],
    path: Path | str,
    normalize: bool = True,
) -> Path:
    """Heatmap of ``cm`` (rows = true). Colours are row-normalised when ``normalize`` so rare
    classes are as readable as common ones; cells are annotated with raw counts."""
    counts = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {k} classes")
    row_sums = counts.sum(axis=1, keepdims=True)
    if normalize:
        shown = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
        vmax = 1.0
    else:
        shown = counts.astype(np.float64)
        vmax = max(float(shown.max()), 1.0)
    size = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, label="fraction of true class" if normalize else "count")
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            # Dark text on light cells, light text on dark ones.
            colour = "white" if shown[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("Confusion matrix" + (" (row-normalised colours)" if normalize else ""))
    return _save(fig, path)


def plot_roc(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path | str
) -> Path:
    """One-vs-rest ROC curve per class; classes with no positives or no negatives are skipped."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.0, 5.5))
    for k, name in enumerate(class_names):
        positives = y == k
        if positives.all() or not positives.any():
            continue  # ROC is undefined without both positives and negatives
        fpr, tpr, _ = roc_curve(positives, p[:, k])
        auc = roc_auc_score(positives, p[:, k])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for rows that have ``key``; falls back to the row index for epoch."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None:
            continue
        xs.append(float(row.get("epoch", i + 1)))
        ys.append(float(value))
    return xs, ys


def _plot_keys(ax: Any, history: list[dict[str, Any]], keys: dict[str, str]) -> bool:
    drew = False
    for key, label in keys.items():
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=label)
            drew = True
    if drew:
        ax.legend(fontsize=8)
    return drew


def plot_training_curves(history: list[dict[str, Any]], path: Path | str) -> Path:
    """Two panels: train/val loss (with learning rate on a twin log axis), and val metrics.

    Rows may lack any key (e.g. no validation on some epochs); missing points are skipped.
    """
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    _plot_keys(ax_loss, history, {"train_loss": "train loss", "val_loss": "val loss"})
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    lr_x, lr_y = _series(history, "lr")
    if lr_x and min(lr_y) > 0:
        ax_lr = ax_loss.twinx()
        ax_lr.plot(lr_x, lr_y, color="grey", ls=":", lw=1)
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="grey")
    metrics = {"val_accuracy": "val accuracy", "val_balanced_accuracy": "val balanced acc"}
    _plot_keys(ax_metric, history, metrics)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("score")
    ax_metric.set_ylim(0.0, 1.02)
    ax_metric.set_title("Validation metrics")
    return _save(fig, path)


def plot_reliability(
    y_true: np.ndarray, probs: np.ndarray, path: Path | str, n_bins: int = 15
) -> Path:
    """Reliability diagram of top-class confidence, same bins as ``expected_calibration_error``."""
    counts, acc, _ = reliability_bins(y_true, probs, n_bins)
    ece = expected_calibration_error(y_true, probs, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    width = 1.0 / n_bins
    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    nonempty = counts > 0
    ax.bar(
        edges[:-1][nonempty],
        acc[nonempty],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.bar(edges[:-1], counts, width=width, align="edge", color="grey", edgecolor="black")
    ax_hist.set_xlim(0.0, 1.0)
    ax_hist.set_xlabel("confidence (max probability)")
    ax_hist.set_ylabel("count")
    return _save(fig, path)


def plot_output_shift(
    ref_probs: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    path: Path | str,
    p_values: Sequence[float] | None = None,
) -> Path:
    """One panel per class: the cumulative distribution of the model's probability for that
    class on validation and on the new images (the curves the KS tests compare)."""
    k = len(class_names)
    cols = min(k, 4)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for j, name in enumerate(class_names):
        ax = axes[j // cols][j % cols]
        for values, label in ((ref_probs[:, j], "validation"), (probs[:, j], "new images")):
            x = np.sort(values)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)
        title = name if p_values is None else f"{name} (KS p = {p_values[j]:.2g})"
        ax.set(title=title, xlim=(0, 1), ylim=(0, 1.02), xlabel=f"P({name})")
        ax.grid(alpha=0.3)
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].set_ylabel("share of images")
    axes[0][0].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def save_all_figures(
    run_dir: Path,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    history: list[dict[str, Any]] | None = None,
    prefix: str = "test",
) -> dict[str, str]:
    """Write every figure under ``run_dir/figures`` and return name -> path relative to run_dir.

    The training-curves figure is skipped when ``history`` is empty or None.
    """
    run_dir = Path(run_dir)
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    cm = confusion_matrix(y, p.argmax(axis=1), labels=list(range(k)))
    fig_dir = run_dir / "figures"
    written = {
        "confusion_matrix": plot_confusion_matrix(
            cm, class_names, fig_dir / f"{prefix}_confusion_matrix.png"
        ),
        "roc": plot_roc(y, p, class_names, fig_dir / f"{prefix}_roc.png"),
        "reliability": plot_reliability(y, p, fig_dir / f"{prefix}_reliability.png"),
    }
    if history:
        written["training_curves"] = plot_training_curves(history, fig_dir / "training_curves.png")
    return {name: path.relative_to(run_dir).as_posix() for name, path in written.items()}
