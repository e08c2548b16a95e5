"""The picture of the README and the docs' home page: lottery tickets against their two
controls on both datasets, the kind of curve every report draws, from the committed pruning
benchmark results (bench/results/pruning/*.json).

    python studies/readme_figure.py      # writes docs/assets/lottery.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"brain-tumor-mri": "brain tumor MRI (4 classes)",
            "chest-xray-pneumonia": "chest X-ray (3 classes)"}  # fmt: skip
KINDS = {"ticket": ("o-", "ticket"), "random_reinit": ("s--", "same mask, random re-init"),
         "random_mask": ("^--", "random mask, same sparsity")}  # fmt: skip


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (name, title) in zip(axes, DATASETS.items(), strict=True):
        result = json.loads((REPO / "bench" / "results" / "pruning" / f"{name}.json").read_text())
        levels = result["levels"]
        xs = [100 * lv["sparsity"] for lv in levels]
        for kind, (style, label) in KINDS.items():
            ax.plot(xs, [lv[f"{kind}_test_accuracy"] for lv in levels], style, label=label)
        ax.axhline(result["dense_test_accuracy"], color="gray", ls="-.", label="dense")
        ax.set_title(title)
        ax.set_xlabel("weights pruned (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("Lottery tickets beside their controls (Lite0, 64 px, 3 epochs per level)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    out = REPO / "docs" / "assets" / "lottery.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
