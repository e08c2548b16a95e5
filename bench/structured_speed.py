"""Does a channel-pruned model meet issue 3's speed target: at least 1.5x faster on CPU at batch
1 and 32, within 1.5 points of its dense model's test accuracy?

    python bench/structured_speed.py DENSE_RUN STRUCTURED_DIR [--sizes 160 224]
        [--threads 1 2] [--blocks 5] [--no-onnxruntime] [--out NAME]

``DENSE_RUN``: a finished training run; ``STRUCTURED_DIR``: ``medxfer prune-structured
DENSE_RUN ...``'s folder (its ``structured.json`` names the source, which must be DENSE_RUN).
Accuracy: both test scores with their intervals, and the paired difference on the same test
images (percentile bootstrap). Speed: ``inference_layout.time_rows`` at every thread count,
input size and batch, in both PyTorch layouts and (if installed) onnxruntime, round-robin in
independent blocks. ``targets`` says, per backend, input size and thread count, whether the
speed-up holds at every batch, and whether accuracy holds. Writes
bench/results/<--out>.json and a figure beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, abspath, save
from inference_layout import LAYOUTS, ONNX, load, time_rows

from medxfer.errors import MedxferError


def _test(run: Path) -> dict[str, Any]:
    path = run / "metrics.json"
    if not path.exists():
        raise MedxferError(f"{run} has no metrics.json", "pass a finished run folder")
    t = json.loads(path.read_text())["test"]
    return {"accuracy": t["accuracy"], "balanced_accuracy": t["balanced_accuracy"],
            "ci95": t["ci95"], "n": t["n"]}  # fmt: skip


def paired_difference(dense: Path, structured: Path) -> dict[str, Any]:
    """Structured minus dense on the same test images (``paired_bootstrap_difference``, in
    points); both runs must hold the same test labels in the same order."""
    from medxfer.evaluate.metrics import paired_bootstrap_difference

    a, b = (np.load(r / "test_predictions.npz") for r in (dense, structured))
    if not np.array_equal(a["labels"], b["labels"]):
        raise MedxferError("the two runs were tested on different images",
                           "prune-structure the dense run you compare against")  # fmt: skip
    d = paired_bootstrap_difference(a["labels"], a["probs"].argmax(1), b["probs"].argmax(1),
                                    a["probs"].shape[1])  # fmt: skip
    return {"points": 100 * d["accuracy_difference"],
            "ci95_points": [100 * v for v in d["accuracy_difference_ci95"]],
            "balanced_points": 100 * d["balanced_accuracy_difference"],
            "balanced_ci95_points": [100 * v for v in d["balanced_accuracy_difference_ci95"]],
            "n_bootstrap": d["n_bootstrap"]}  # fmt: skip


def targets(
    rows: list[dict[str, Any]], dense: str, structured: str, diff: float,
    speedup: float, points: float,
) -> dict[str, Any]:  # fmt: skip
    """Per backend, input size and thread count: the speed-ups at each batch and whether all
    reach ``speedup``; accuracy holds if the difference is at least -``points``."""
    key = f"speedup_over_{dense}_"
    by: dict[tuple[str, int, int], dict[int, float]] = {}
    for r in rows:
        if r["model"] != structured:
            continue
        for be in (*LAYOUTS, ONNX):
            if key + be in r:
                by.setdefault((be, r["image_size"], r["threads"]), {})[r["batch"]] = r[key + be]
    accuracy_ok = diff >= -points
    cases = [{"backend": be, "image_size": s, "threads": t,
              "speedup": {f"batch_{b}": round(v, 3) for b, v in sorted(sp.items())},
              "speed_met": min(sp.values()) >= speedup,
              "met": min(sp.values()) >= speedup and accuracy_ok}
             for (be, s, t), sp in sorted(by.items())]  # fmt: skip
    return {"speedup": speedup, "points": points, "accuracy_met": accuracy_ok, "cases": cases,
            "met_in": [f"{c['backend']}, {c['image_size']} px, {c['threads']} thread(s)"
                       for c in cases if c["met"]]}  # fmt: skip


def figure(rows: list[dict[str, Any]], dense: str, structured: str, target: float,
           path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["model"] == structured]
    threads = sorted({r["threads"] for r in mine})
    backends = [be for be in (*LAYOUTS, ONNX) if f"speedup_over_{dense}_{be}" in mine[0]]
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 3.8), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        sub = [r for r in mine if r["threads"] == t]
        labels = [f"{r['image_size']} px\nbatch {r['batch']}" for r in sub]
        x = np.arange(len(sub))
        w = 0.8 / len(backends)
        for i, be in enumerate(backends):
            ax.bar(x + i * w - 0.4 + w / 2, [r[f"speedup_over_{dense}_{be}"] for r in sub], w,
                   label=be)  # fmt: skip
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}x")
        ax.set_xticks(x, labels)
        ax.set_title(f"{t} thread(s)")
        ax.set_ylabel("speed-up over dense")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{structured} against {dense} (CPU, median of blocks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", type=abspath)
    p.add_argument("structured", type=abspath)
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[30, 5],
                   help="calls per block at each batch size (one value: all)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--target-speedup", type=float, default=1.5)
    p.add_argument("--target-points", type=float, default=1.5)
    p.add_argument("--out", default=None, help="default: structured-speed-<structured folder>")
    args = p.parse_args()
    info_path = args.structured / "structured.json"
    if not info_path.exists():
        raise MedxferError(f"{args.structured} has no structured.json",
                           "pass the folder `medxfer prune-structured` wrote")  # fmt: skip
    info = json.loads(info_path.read_text())
    if Path(info["source_run"]).resolve() != args.dense:
        raise MedxferError(f"{args.structured} was pruned from {info['source_run']}",
                           f"pass that run as DENSE_RUN, not {args.dense}")  # fmt: skip
    accuracy = {"dense": _test(args.dense), "structured": _test(args.structured),
                "difference": paired_difference(args.dense, args.structured)}  # fmt: skip
    print("accuracy", json.dumps(accuracy))
    onnx = not args.no_onnxruntime and importlib.util.find_spec("onnxruntime") is not None
    base = load([args.dense, args.structured], [])
    names = list(base)
    rows: list[dict[str, Any]] = []
    for t in args.threads:
        torch.set_num_threads(t)
        rows += time_rows(base, args.sizes, args.batches, args.repeats, args.blocks, onnx)
    name = args.out or f"structured-speed-{args.structured.name}"
    fig = RESULTS / f"{name}.png"
    figure(rows, names[0], names[1], args.target_speedup, fig)
    result = targets(rows, names[0], names[1], accuracy["difference"]["points"],
                     args.target_speedup, args.target_points)  # fmt: skip
    data = args.structured / "data.json"
    save(name, {
        "data": json.loads(data.read_text()) if data.exists() else None,
        "dense_run": str(args.dense),
        "structured_run": str(args.structured),
        "structured": {k: info[k] for k in ("method", "ratio", "target_macs_speedup",
                                            "macs_speedup", "params_fraction", "finetune")},
        "accuracy": accuracy, "onnxruntime": onnx, "blocks": args.blocks,
        "repeats": args.repeats, "statistic": "median over blocks of each block's median ms",
        "rows": rows, "targets": result, "figures": [str(fig.relative_to(RESULTS.parent.parent))],
    })  # fmt: skip
    for c in result["cases"]:
        print(c)
    print("accuracy within", args.target_points, "points:", result["accuracy_met"])
    print("target met in:", result["met_in"] or "none")


if __name__ == "__main__":
    main()
