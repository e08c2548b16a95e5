"""Comparison report of the imbalance strategies: bootstrap intervals, markdown table, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medxfer.data.generated import MINORITY_BELOW


def bootstrap_class_metrics(
    labels: np.ndarray,
    pred: np.ndarray,
    k: int,
    minority: list[int],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    chunk: int = 200,
) -> dict[str, Any]:
    """95% percentile-bootstrap intervals of per-class recall, macro-F1 and minority recall.

    Test samples are resampled with replacement (as ``evaluate.metrics.bootstrap_ci``); a
    class absent from a resample is skipped in that resample's averages.
    """
    rng = np.random.default_rng(seed)
    recalls, f1s, minor = [], [], []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, len(labels), size=(b, len(labels)))
        rows = np.arange(b)[:, None] * k
        hit = (labels[idx] == pred[idx]).ravel().astype(np.float64)
        support = np.bincount((rows + labels[idx]).ravel(), minlength=b * k).reshape(b, k)
        predicted = np.bincount((rows + pred[idx]).ravel(), minlength=b * k).reshape(b, k)
        tp = np.bincount((rows + labels[idx]).ravel(), weights=hit, minlength=b * k).reshape(b, k)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(support > 0, tp / support, np.nan)
            f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
        recalls.append(rec)
        f1s.append(np.nanmean(f1, axis=1))
        minor.append(np.nanmean(rec[:, minority], axis=1) if minority else np.full(b, np.nan))
    rec_all = np.concatenate(recalls)

    def ci(x: np.ndarray) -> list[float] | None:
        x = x[np.isfinite(x)]
        return [float(v) for v in np.percentile(x, [2.5, 97.5])] if len(x) else None

    return {
        "per_class_recall": [ci(rec_all[:, c]) for c in range(k)],
        "macro_f1": ci(np.concatenate(f1s)),
        "minority_recall": ci(np.concatenate(minor)),
    }


def _fmt(x: float | None, ci: list[float] | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per strategy: accuracy, balanced accuracy, macro-F1, recall per class (minority
    classes marked *), minority recall, all with 95% intervals; synthetic images used."""
    classes, minority = summary["classes"], set(summary["minority_classes"])
    head = ["strategy", "val balanced accuracy", "test accuracy", "balanced accuracy", "macro-F1"]
    head += [f"recall {c}{' *' if c in minority else ''}" for c in classes]
    head += ["minority recall", "synthetic images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary["strategies"].items():
        row = [
            name,
            _fmt(s.get("val_balanced_accuracy")),
            _fmt(s["test_accuracy"], s["test_accuracy_ci95"]),
            _fmt(s["test_balanced_accuracy"], s["test_balanced_accuracy_ci95"]),
            _fmt(s["test_macro_f1"], s["test_macro_f1_ci95"]),
        ]
        row += [_fmt(s["per_class_recall"][c], s["per_class_recall_ci95"][c]) for c in classes]
        row += [_fmt(s["minority_recall"], s["minority_recall_ci95"])]
        row += [str(s["synthetic_images_total"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "\\* minority class in training ("
        + summary.get(  # summaries written before the rule was recorded
            "minority_rule", f"fewer than {MINORITY_BELOW:.0%} of the largest class's images"
        )
        + "). "
        f"Test split: {summary['test_n']} real images, never used for training or model "
        "selection; intervals: 95% percentile bootstrap."
    )
    if summary.get("val_winner"):
        lines += ["", summary["val_winner"]["sentence"]]
    lines += ["", *summary.get("verdict", [])]
    return "\n".join(lines) + "\n"


def comparison_plot(summary: dict[str, Any], path: Path) -> None:
    """Grouped bars (one colour per strategy) with 95% intervals: balanced accuracy, macro-F1,
    minority recall and each class's recall (minority classes marked *)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minority = set(summary["minority_classes"])
    groups = [
        ("balanced acc", "test_balanced_accuracy", None),
        ("macro-F1", "test_macro_f1", None),
        ("minority recall", "minority_recall", None),
    ]
    groups += [
        (f"recall {c}{' *' if c in minority else ''}", "per_class_recall", c)
        for c in summary["classes"]
    ]
    strategies = summary["strategies"]
    width = 0.8 / max(1, len(strategies))
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4.2))
    for j, (name, s) in enumerate(strategies.items()):
        vals, lo, hi = [], [], []
        for _, key, cls in groups:
            v = s[key][cls] if cls else s[key]
            ci = s[f"{key}_ci95"][cls] if cls else s.get(f"{key}_ci95")
            vals.append(v if v is not None else np.nan)
            lo.append(v - ci[0] if ci and v is not None else 0.0)
            hi.append(ci[1] - v if ci and v is not None else 0.0)
        x = np.arange(len(groups)) + (j - (len(strategies) - 1) / 2) * width
        ax.bar(x, vals, width, yerr=[lo, hi], capsize=2, label=name)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{summary['dataset']}: imbalance strategies (test split, 95% CI)")
    ax.legend(fontsize=8, ncol=min(5, len(strategies)), loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def real_vs_synthetic_grid(
    real: dict[str, torch.Tensor], synth: dict[str, torch.Tensor], path: Path, n: int = 6
) -> None:
    """One row per synthesised class: ``n`` real training images, then ``n`` synthetic ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in synth if len(synth[c]) and len(real.get(c, []))]
    if not names:
        return
    fig, axes = plt.subplots(
        len(names), 2 * n, figsize=(2 * n * 1.1, len(names) * 1.25), squeeze=False
    )
    for r, c in enumerate(names):
        for j, ax in enumerate(axes[r]):
            ax.axis("off")
            source, i = (real[c], j) if j < n else (synth[c], j - n)
            if i < len(source):
                img = source[i].numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        axes[r][0].set_title(f"{c}: real", fontsize=8, loc="left")
        axes[r][n].set_title(f"{c}: synthetic", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
