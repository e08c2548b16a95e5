"""``lottery.json`` and the sparsity-vs-accuracy plot, read back from the level run folders.

Built only from files on disk (masks and metrics.json), so the summary of a lottery that was
interrupted and continued is the same as that of one that ran straight through.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from medxfer.prune.mask import Mask
from medxfer.runs import split_shift
from medxfer.train.checkpoint import atomic_write_json

KINDS = ("dense", "ticket", "random_reinit", "random_mask", "finetune", "distill")
# The pruned models a study may report, as tables name them; the controls are not among them
# (they exist to test the ticket, not to be deployed).
REPORTABLE = {
    "ticket": "lottery ticket",
    "finetune": "pruned + fine-tuned",
    "distill": "pruned + distilled from the dense model",
}
SPLIT_KEYS = ("accuracy", "balanced_accuracy")
PLOT = "sparsity_vs_accuracy.png"


def _run_summary(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    mask = Mask.load(run / "mask.pt")
    out: dict[str, Any] = {"run_dir": str(run), "sparsity": mask.sparsity, "kept": mask.kept}
    info = run / "prune.json"  # the teacher of a distilled run (weight, temperature); else none
    if info.exists() and "distill" in (taught := json.loads(info.read_text())):
        out["distilled"] = {k: taught["distill"][k] for k in ("weight", "temperature")}
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            out[split] = {k: m[k] for k in SPLIT_KEYS} | {"ci95": m.get("ci95", {})}
    if "val" in metrics and "test" in metrics:
        out["val_test_shifted_classes"] = [
            c["class"] for c in split_shift(metrics["val"], metrics["test"]) if c["shifted"]
        ]
    return out


def shift_lines(summary: dict[str, Any]) -> list[str]:
    """One line per class that validation and test disagree on in any run of the lottery: a
    lottery trains many runs, so it says this once, with the count, instead of once per run."""
    runs = [r for level in summary["levels"] for r in level["runs"].values() if "test" in r]
    counts = Counter(c for r in runs for c in r.get("val_test_shifted_classes", []))
    return [
        f"class {name!r}: validation and test recall disagree beyond chance in {n} of "
        f"{len(runs)} runs of this lottery (each run's report has the table): choices made on "
        "validation, the pruned level among them, may not carry over to test for this class"
        for name, n in sorted(counts.items())
    ]


def summarize(out_dir: Path, levels: int) -> dict[str, Any]:
    """Per level: the ticket's sparsity (global and per layer) and every finished run's scores."""
    rows: list[dict[str, Any]] = []
    for level in range(levels + 1):
        folder = out_dir / f"level_{level}"
        main = folder / ("dense" if level == 0 else "ticket")
        if not (main / "mask.pt").exists():
            break
        mask = Mask.load(main / "mask.pt")
        runs = {
            kind: _run_summary(folder / kind)
            for kind in KINDS
            if (folder / kind / "metrics.json").exists()
        }
        rows.append({"level": level, "sparsity": mask.sparsity, "kept": mask.kept,
                     "total": mask.total, "per_layer": mask.per_layer(), "runs": runs})  # fmt: skip
    return {"out_dir": str(out_dir), "levels": rows, "plot": PLOT}


def plot(summary: dict[str, Any], path: Path, split: str = "test") -> Path:
    """Balanced accuracy against sparsity: the ticket, its controls, the baseline and dense."""
    import matplotlib

    matplotlib.use("Agg")  # headless, like the run figures
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"ticket": "o-", "random_reinit": "s--", "random_mask": "^--", "finetune": "d:",
              "distill": "v:"}  # fmt: skip
    for kind, style in styles.items():
        runs = [r["runs"][kind] for r in summary["levels"] if split in r["runs"].get(kind, {})]
        if not runs:
            continue
        xs = [100 * (1 - r["sparsity"]) for r in runs]
        ys = [r[split]["balanced_accuracy"] for r in runs]
        ci = [
            r[split]["ci95"].get("balanced_accuracy", [y, y]) for r, y in zip(runs, ys, strict=True)
        ]
        err = [[y - lo for y, (lo, _) in zip(ys, ci, strict=True)],
               [hi - y for y, (_, hi) in zip(ys, ci, strict=True)]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=kind.replace("_", " "))
    dense = summary["levels"][0]["runs"].get("dense", {}) if summary["levels"] else {}
    if split in dense:
        ax.axhline(dense[split]["balanced_accuracy"], color="gray", ls="-.", label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right, as in the lottery ticket papers
    ticks = sorted({round(100 * (1 - r["sparsity"]), 1) for r in summary["levels"]})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("prunable weights remaining (%, log scale)")
    ax.set_ylabel(f"{split} balanced accuracy (95% CI)")
    ax.set_title("Lottery tickets: accuracy against sparsity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out_dir: Path, levels: int) -> dict[str, Any]:
    summary = summarize(out_dir, levels)
    plot(summary, out_dir / PLOT)
    atomic_write_json(summary, out_dir / "lottery.json")  # written last, like metrics.json
    return summary
