"""Does a channel-pruned model meet issue 3's speed target: at least 1.5x faster on CPU at batch
1 and 32, within 1.5 points of its dense model's test accuracy?

    python studies/structured_speed.py DENSE_RUN STRUCTURED_DIR [...] [--sizes 160 224]
        [--threads 1 2] [--blocks 5] [--no-onnxruntime] [--out NAME]

``DENSE_RUN``: a finished training run; ``STRUCTURED_DIR``: ``medxfer prune-structured
DENSE_RUN ...``'s folder (its ``structured.json`` names the source, which must be DENSE_RUN);
several folders of one network (same ratio, e.g. fine-tuned with and without distillation)
share the timings of the first, after a check that their tensors have the same shapes.
Accuracy: both test scores with their intervals, and the paired difference on the same test
images (percentile bootstrap). Speed: ``inference_layout.time_rows`` at every thread count,
input size and batch, in both PyTorch layouts and (if installed) onnxruntime, round-robin in
independent blocks. ``targets`` says, per backend, input size and thread count, whether the
speed-up holds at every batch, and whether accuracy holds. Writes
studies/results/structured-speed/<--out>.json and a figure beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import REPO, STUDY_RESULTS, abspath, save
from inference_layout import LAYOUTS, ONNX, load, time_rows

from medxfer.errors import MedxferError

INFO_KEYS = ("method", "ratio", "target_macs_speedup", "macs_speedup", "params_fraction",
             "finetune", "soft", "command")  # fmt: skip


def _structured_info(run: Path, dense: Path) -> dict[str, Any]:
    path = run / "structured.json"
    if not path.exists():
        raise MedxferError(f"{run} has no structured.json",
                           "pass the folder `medxfer prune-structured` wrote")  # fmt: skip
    info: dict[str, Any] = json.loads(path.read_text())
    if Path(info["source_run"]).resolve() != dense:
        raise MedxferError(f"{run} was pruned from {info['source_run']}",
                           f"pass that run as DENSE_RUN, not {dense}")  # fmt: skip
    return info


def _same_shapes(a: Any, b: Any, run_a: Path, run_b: Path) -> None:
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (a, b)]
    if shapes[0] != shapes[1]:
        raise MedxferError(f"{run_b} is not the network of {run_a} (other channel counts)",
                           "give one bench call per pruning ratio")  # fmt: skip


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", type=abspath)
    p.add_argument("structured", type=abspath, nargs="+",
                   help="prune-structured folders of DENSE_RUN with one network (the first is "
                        "timed)")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[30, 5],
                   help="calls per block at each batch size (one value: all)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--target-speedup", type=float, default=1.5)
    p.add_argument("--target-points", type=float, default=1.5)
    p.add_argument("--out", default=None, help="default: the structured folder's name")
    args = p.parse_args()
    infos = {run: _structured_info(run, args.dense) for run in args.structured}
    dense_test = _test(args.dense)  # accuracy first: a run missing its outputs fails before timing
    accuracies = {run: {"dense": dense_test, "structured": _test(run),
                        "difference": paired_difference(args.dense, run)}
                  for run in args.structured}  # fmt: skip
    onnx = not args.no_onnxruntime and importlib.util.find_spec("onnxruntime") is not None
    base = load([args.dense, args.structured[0]], [])
    names = list(base)
    for run in args.structured[1:]:  # timed as the first: the same network, other weights
        _same_shapes(base[names[1]], load([run], [])[run.name], args.structured[0], run)
    rows: list[dict[str, Any]] = []
    for t in args.threads:
        torch.set_num_threads(t)
        rows += time_rows(base, args.sizes, args.batches, args.repeats, args.blocks, onnx)
    name = args.out or args.structured[0].name
    fig = STUDY_RESULTS / "structured-speed" / f"{name}.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, names[0], names[1], args.target_speedup, fig)
    runs = []
    for run, info in infos.items():
        accuracy = accuracies[run]
        result = targets(rows, names[0], names[1], accuracy["difference"]["points"],
                         args.target_speedup, args.target_points)  # fmt: skip
        runs.append({"structured_run": str(run), "timed_as": names[1],
                     "structured": {k: info.get(k) for k in INFO_KEYS},
                     "accuracy": accuracy, "targets": result})  # fmt: skip
        print(run.name, "accuracy", json.dumps(accuracy["difference"]))
        for c in result["cases"]:
            print(" ", c)
        print("  accuracy within", args.target_points, "points:", result["accuracy_met"])
        print("  target met in:", result["met_in"] or "none")
    data = args.structured[0] / "data.json"
    save(f"structured-speed/{name}", root=STUDY_RESULTS, payload={
        "data": json.loads(data.read_text()) if data.exists() else None,
        "dense_run": str(args.dense), "runs": runs, "onnxruntime": onnx,
        "blocks": args.blocks, "repeats": args.repeats,
        "statistic": "median over blocks of each block's median ms", "rows": rows,
        "figures": [str(fig.relative_to(REPO) if fig.is_relative_to(REPO) else fig)],
    })  # fmt: skip


if __name__ == "__main__":
    main()
