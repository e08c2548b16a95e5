"""How far single runs scatter on a test split: one training protocol, several seeds.

    python studies/seeds.py chest-xray-pneumonia [--seeds 0 1 2 3 4] [--data-root ../shared/data]

Trains the dense level 0 of bench/pruning.py (`efficientnet_lite0` from the offline ImageNet
weights, 64 px, 3 epochs, AdamW 1e-3, label smoothing 0.1) once per `train.seed`, everything
else fixed (data split included: `data.split_seed` stays 0), and reports the validation and
test accuracy of each run with their mean, standard deviation and range. The spread is the
noise floor for any "within N points" comparison of single runs under this protocol, such as
the lottery's "ticket within 1 point of dense" (issue 3). Each run also records, per class,
validation against test (`medxfer.evaluate.metrics.split_shift`): the classes whose recall
differs between the splits beyond chance. Resumable: finished seeds are read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import REPO, SHARED_DATA, STUDY_RESULTS, abspath, medxfer_cmd, run, save
from pruning import COMMON_UNSEEDED, PROTOCOLS

from medxfer.evaluate.metrics import split_shift


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values),  # main() asks for at least two seeds
        "min": min(values),
        "max": max(values),
        "range_points": 100 * (max(values) - min(values)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(PROTOCOLS))
    p.add_argument("--data-root", type=abspath, default=SHARED_DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out-dir", type=abspath, default=REPO / "runs" / "bench" / "seeds")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--name-suffix", default="", help="studies/results/seeds/<dataset><suffix>.json")
    args = p.parse_args()
    if len(args.seeds) < 2:
        p.error("give at least two seeds: one run has no scatter")
    data = args.data_root / args.dataset
    protocol = [*COMMON_UNSEEDED, *PROTOCOLS[args.dataset], *args.extra]
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        run_dir = args.out_dir / args.dataset / f"seed{seed}"
        cmd = [*medxfer_cmd(), "train", "--data", str(data), "--run-dir", str(run_dir),
               "--resume", *protocol, f"train.seed={seed}"]  # fmt: skip
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        _, seconds = run(cmd, run_dir.parent / f"seed{seed}.log")
        m = json.loads((run_dir / "metrics.json").read_text())
        runs.append({
            "seed": seed,
            "val_balanced_accuracy": m["val"]["balanced_accuracy"],
            "test_accuracy": m["test"]["accuracy"],
            "test_accuracy_ci95": m["test"].get("ci95", {}).get("accuracy"),
            "test_balanced_accuracy": m["test"]["balanced_accuracy"],
            "val_accuracy": m["val"]["accuracy"],
            "val_recall": m["val"]["per_class_recall"],
            "test_recall": m["test"]["per_class_recall"],
            # classes whose recall differs between validation and test beyond chance
            "val_test_shift": split_shift(m["val"], m["test"]),
            "patients": m["data"].get("patients"),
            "threads": m["compute"]["threads"],
            "train_seconds": round(m["train_seconds"], 1),  # however many calls trained it
            "seconds_this_call": round(seconds, 1),
            "run_dir": str(run_dir),
            "command": " ".join(cmd),
        })  # fmt: skip
        print(f"seed {seed}: val bal-acc {runs[-1]['val_balanced_accuracy']:.4f}, "
              f"test acc {runs[-1]['test_accuracy']:.4f}")  # fmt: skip
    out = {
        "dataset": args.dataset,
        "data": str(data),
        "protocol": protocol,
        "runs": runs,
        "test_accuracy": summary([r["test_accuracy"] for r in runs]),
        "test_balanced_accuracy": summary([r["test_balanced_accuracy"] for r in runs]),
        "val_balanced_accuracy": summary([r["val_balanced_accuracy"] for r in runs]),
        "shifted_classes_per_seed": {
            r["seed"]: [c["class"] for c in r["val_test_shift"] if c["shifted"]] for r in runs
        },
    }
    keys = ("test_accuracy", "val_balanced_accuracy", "shifted_classes_per_seed")
    print(json.dumps({k: out[k] for k in keys}, indent=2))
    save(f"seeds/{args.dataset}{args.name_suffix}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
