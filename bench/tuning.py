"""Cost and result of `medxfer tune` with and without the pruner, and with 2 worker processes.

    python bench/tuning.py [brain-tumor-mri] [--data-root ../shared/data]

Three studies of `efficientnet_lite0` from the offline ImageNet weights under one small CPU
protocol (PROTOCOL below, saved in the JSON), the default search space (learning rate log
[1e-4, 1e-2], batch size {16, 32, 64}, weight decay log [1e-5, 1e-1]), TPE seed 0:

- `unpruned`: 20 trials, `tune.pruner=none` (every trial trains all its epochs);
- `pruned`: the same 20 trials' budget with `tune.pruner=halving` (successive halving);
  the two studies run side by side, one torch thread each, so that both see the same load
  (`load_check` compares the epoch times of the trials both studies sampled alike);
- `parallel_workers`: a study run by `--workers 2` on one journal storage; every trial is
  checked: finished exactly once, none left running, none lost or run twice.

The decode cache is warmed first so that neither study pays for decoding the JPEGs.
Objective: validation balanced accuracy (the test split is never read).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import REPO, SHARED_DATA, abspath, medxfer_cmd, run_timed, save

from medxfer.runs import make_run_dir, remove_run_dir

PROTOCOL = [
    "model.arch=efficientnet_lite0",
    "model.weights=imagenet",
    "data.image_size=64",
    "tune.train_subset=0.2",
    "tune.epochs=9",
    "train.label_smoothing=0.1",
    "augment.vflip=true",
    "train.seed=0",
    "tune.seed=0",
]
# One torch thread per study: the benchmark shares this 2-core machine with other jobs, and
# a single thread keeps both studies' load alike (v1, 5 epochs per trial and 2 threads, is
# tuning-brain-tumor-mri-v1-5epochs.json in the git history: too few epochs for pruning to
# pay).
VARIANTS = {
    "unpruned": ["tune.pruner=none", "train.threads=1"],
    "pruned": ["tune.pruner=halving", "train.threads=1"],
}
PARALLEL = ["tune.pruner=halving", "tune.epochs=2"]


def warm_cache(data: Path) -> float:
    """Decode the dataset once at the protocol's size (the studies then read the cache)."""
    from medxfer.config import load_config
    from medxfer.data.prepare import prepare

    t0 = time.perf_counter()
    cfg = load_config(None, [f"data.root={data}", "data.image_size=64"])
    prepare(cfg.data)
    return time.perf_counter() - t0


def study(data: Path, out_dir: Path, extra: list[str], n_trials: int, workers: int = 1) -> dict:
    cmd = [*medxfer_cmd(), "tune", "--data", str(data), "--n-trials", str(n_trials),
           "--workers", str(workers), f"out_dir={out_dir}", "name=bench",
           *PROTOCOL, *extra]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stdout, seconds, cpu = run_timed(cmd, out_dir / "tune.log")
    study_dir = Path(stdout.strip().splitlines()[-1])
    summary: dict[str, Any] = json.loads((study_dir / "summary.json").read_text())
    summary["command"] = " ".join(cmd)
    summary["process_seconds"] = round(seconds, 1)
    summary["cpu_seconds"] = round(cpu, 1)
    return summary


def trial_rows(study_dir: Path) -> list[dict[str, str]]:
    with (study_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def epochs_trained(study_dir: Path) -> int:
    """Training epochs the study ran, over all its trials: its cost independent of the load."""
    return sum(int(r["epochs_reported"] or 0) for r in trial_rows(study_dir))


def result(summary: dict[str, Any]) -> dict[str, Any]:
    best = summary["best"] or {}
    return {
        "epochs_trained": epochs_trained(Path(summary["study_dir"])),
        "n_trials": summary["complete"] + summary["pruned"],
        "n_complete": summary["complete"],
        "n_pruned": summary["pruned"],
        "n_failed": summary["failed"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "cpu_seconds": summary["cpu_seconds"],
        "best_value": best.get("value"),
        "best_params": best.get("params"),
        "best_trial": best.get("number"),
        "study_dir": summary["study_dir"],
        "command": summary["command"],
    }


def load_check(unpruned: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Seconds per training epoch of the trials that both studies sampled with the same
    parameters (TPE's seeded random start), pruned / unpruned: 1.0 means equal load."""
    dirs = [Path(unpruned["study_dir"]), Path(pruned["study_dir"])]
    rows = [{r["number"]: r for r in trial_rows(d)} for d in dirs]
    keys = [k for k in rows[0]["0"] if k.startswith("params_")] if "0" in rows[0] else []
    ratios = {}
    for n, r in rows[1].items():
        u = rows[0].get(n)
        if u is None or any(u[k] != r[k] for k in keys):
            continue
        secs = []
        for d in dirs:
            with (d / "trials" / n / "history.csv").open() as f:
                secs.append([float(x["train_seconds"]) for x in csv.DictReader(f)])
        common = min(len(secs[0]), len(secs[1]))
        if common:
            ratios[n] = round(sum(secs[1][:common]) / sum(secs[0][:common]), 3)
    return {
        "pruned_over_unpruned_epoch_seconds": ratios,
        "note": "same trial number and parameters in both studies, same epochs compared",
    }


def parallel_check(summary: dict[str, Any], n_trials: int) -> dict[str, Any]:
    rows = trial_rows(Path(summary["study_dir"]))
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    numbers = [r["number"] for r in finished]
    dirs = [r.get("user_attrs_trial_dir", "") for r in finished]
    duplicated = (len(numbers) - len(set(numbers))) + (len(dirs) - len(set(dirs)))
    duplicated += max(0, len(finished) - n_trials)
    lost = summary["running"] + summary["waiting"] + summary["failed"]
    lost += max(0, n_trials - len(finished))
    per_worker: dict[str, int] = {}
    for r in finished:
        w = r.get("user_attrs_worker", "?")
        per_worker[w] = per_worker.get(w, 0) + 1
    return {
        "workers": summary["workers"],
        "n_trials": len(finished),
        "n_trials_asked": n_trials,
        "lost_or_duplicated": lost + duplicated,
        "surplus_refused": summary["surplus"],
        "finished_per_worker": per_worker,
        "wall_seconds": round(summary["wall_seconds"], 1),
        "storage": summary["storage"],
        "command": summary["command"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", nargs="?", default="brain-tumor-mri")
    p.add_argument("--data-root", type=abspath, default=SHARED_DATA)
    p.add_argument("--n-trials", type=int, default=20)
    p.add_argument("--parallel-trials", type=int, default=10)
    p.add_argument("--out-dir", type=abspath, default=REPO / "runs" / "bench" / "tuning")
    p.add_argument("--fresh", action="store_true", help="delete earlier studies first")
    args = p.parse_args()
    data = args.data_root / args.dataset
    if args.fresh:  # only a folder this benchmark made (it carries medxfer's run marker)
        remove_run_dir(args.out_dir)
    make_run_dir(args.out_dir, "bench-tuning")
    warm = round(warm_cache(data), 1)
    out: dict[str, Any] = {"data": str(data), "arch": "efficientnet_lite0",
                           "protocol": PROTOCOL, "warm_cache_seconds": warm}  # fmt: skip
    with ThreadPoolExecutor(len(VARIANTS)) as pool:  # side by side: the same load for both
        futures = {
            name: pool.submit(study, data, args.out_dir / name, extra, args.n_trials)
            for name, extra in VARIANTS.items()
        }
        for name, future in futures.items():
            out[name] = result(future.result())
            shown = ("n_pruned", "wall_seconds", "best_value")
            print(json.dumps({name: {k: out[name][k] for k in shown}}), flush=True)
    out["load_check"] = load_check(out["unpruned"], out["pruned"])
    out["schedule"] = "unpruned and pruned studies side by side, 1 torch thread each"
    par = study(data, args.out_dir / "parallel", PARALLEL, args.parallel_trials, workers=2)
    out["parallel_workers"] = parallel_check(par, args.parallel_trials) | {"protocol": PARALLEL}
    u, q = out["unpruned"], out["pruned"]
    out["targets"] = {
        "pruned_wall_fraction": round(q["wall_seconds"] / u["wall_seconds"], 3),
        "pruned_at_most_half_the_wall_time": q["wall_seconds"] <= 0.5 * u["wall_seconds"],
        "pruned_epoch_fraction": round(q["epochs_trained"] / u["epochs_trained"], 3),
        "pruned_cpu_fraction": round(q["cpu_seconds"] / u["cpu_seconds"], 3),
        "best_value_gap_points": round(100 * (u["best_value"] - q["best_value"]), 2),
        "best_within_1_point": abs(u["best_value"] - q["best_value"]) <= 0.01
        or q["best_value"] >= u["best_value"],
        "parallel_exact": out["parallel_workers"]["lost_or_duplicated"] == 0
        and out["parallel_workers"]["n_trials"] == args.parallel_trials,
    }
    print(json.dumps(out["targets"], indent=2))
    save(f"tuning/{args.dataset}", out)


if __name__ == "__main__":
    main()
