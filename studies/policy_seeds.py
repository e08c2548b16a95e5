"""What `augment.policy: robust` costs in distribution, over several training seeds.

    python studies/policy_seeds.py NAME RUN [RUN ...] [--data-note TEXT]

Each RUN is a finished `medxfer train` run folder of one recipe; they must come in pairs that
differ only in `augment.policy` (robust and standard) at the same `train.seed`, e.g.

    medxfer train --config configs/brain-tumor-cpu.yaml --data ../shared/data/brain-tumor-mri \\
        --run-dir runs/trust-brain-robust-s1 train.threads=1 train.seed=1
    (the same with --run-dir runs/trust-brain-standard-s1 ... augment.policy=standard)

Reads each run's policy and seed from its config.yaml and its validation and test accuracy
(with the bootstrap interval) from its metrics.json, and writes
studies/results/policy-seeds/NAME.json: the cost (standard minus robust, points) per seed
and its mean, on validation (what the policy is chosen on) and on test (reported only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.errors import MedxferError


def read_run(folder: Path) -> dict[str, Any]:
    import yaml

    cfg_path, metrics_path = folder / "config.yaml", folder / "metrics.json"
    if not cfg_path.is_file() or not metrics_path.is_file():
        raise MedxferError(f"{folder} is not a finished run", "pass `medxfer train` run folders")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    m = json.loads(metrics_path.read_text())
    ci = m["test"].get("ci95", {}).get("accuracy")
    return {
        "policy": str((cfg.get("augment") or {}).get("policy", "standard")),
        "seed": int((cfg.get("train") or {}).get("seed", 0)),
        "run": str(folder),
        "val_accuracy": round(float(m["val"]["accuracy"]), 4),
        "test_accuracy": round(float(m["test"]["accuracy"]), 4),
        "test_accuracy_ci95": ci,
    }


def costs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["policy"] in by.setdefault(r["seed"], {}):
            raise MedxferError(f"two {r['policy']} runs at seed {r['seed']}", "pass one of each")
        by[r["seed"]][r["policy"]] = r
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        per = {}
        for seed, pair in sorted(by.items()):
            if set(pair) != {"robust", "standard"}:
                raise MedxferError(
                    f"seed {seed} has only {sorted(pair)}",
                    "pass a robust and a standard run for every seed",
                )
            key = f"{split}_accuracy"
            per[str(seed)] = round(100 * (pair["standard"][key] - pair["robust"][key]), 2)
        out[f"id_cost_points_{split}"] = per
        out[f"id_cost_points_{split}_mean"] = round(statistics.fmean(per.values()), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", help="result name, e.g. brain-tumor-mri")
    p.add_argument("runs", type=abspath, nargs="+")
    p.add_argument("--data-note", default="", help="what data the runs were trained on")
    args = p.parse_args()
    runs = [read_run(r) for r in args.runs]
    result = {"data": args.data_note, "runs": runs} | costs(runs)
    for seed, cost in result["id_cost_points_test"].items():
        print(f"seed {seed}: cost on validation {result['id_cost_points_val'][seed]:+.2f}, "
              f"on test {cost:+.2f} points")  # fmt: skip
    save(f"policy-seeds/{args.name}", result, STUDY_RESULTS)


if __name__ == "__main__":
    main()
