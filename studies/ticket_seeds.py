"""Is the 80% lottery ticket within 1 point of dense, beyond the scatter of single runs?

    python studies/ticket_seeds.py chest-xray-pneumonia [--seeds 0 1 2 3 4] [--rewind init]

For each `train.seed`, one lottery of bench/pruning.py's protocol (`efficientnet_lite0` from the
offline ImageNet weights, 64 px, 3 epochs; dense level 0, then `--levels` levels to 80% global
sparsity, rewinding by `--rewind`) without the controls (they answer another question and
would triple the time) unless `--controls`: then each seed's lottery also trains both controls
(random re-init, random mask) at every level, added to the seed's folder when its ticket was
trained without them, and the result also gives the paired ticket-minus-control differences
over seeds (issue 3: the 80% ticket must beat both controls). Reports per seed the dense and
the 80% ticket's test accuracy and their paired difference; over seeds, the mean difference
with a 95% t-interval. Issue 3 asks for the ticket within 1 point of dense: a single pair
cannot say it (two single runs differ by about 2 points, studies/results/seeds/*.json); the
paired mean over seeds can. The data split is fixed
(`data.split_seed` 0); the seed changes the head's initialisation, the batch order and the
augmentation. The same pairs on the validation split (carved from the training split) tell
noise from a shift between it and the official test split. Resumable: finished levels and
seeds are read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import (
    REPO,
    SHARED_DATA,
    STUDY_RESULTS,
    abspath,
    medxfer_cmd,
    run,
    save,
    training_seconds,
)
from pruning import COMMON_UNSEEDED, PROTOCOLS
from scipy import stats
from seeds import summary

from medxfer.errors import MedxferError
from medxfer.evaluate.metrics import split_shift


def paired(diffs: list[float]) -> dict[str, Any]:
    """Mean of paired differences with its 95% t-interval (in accuracy, not points)."""
    mean = statistics.fmean(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean": mean, "ci95": [float(mean - half), float(mean + half)], "n": len(diffs)}


def per_class_recall(lottery: Path, last: int) -> dict[str, dict[str, dict[str, float]]]:
    """Recall per class of the dense model and the last ticket, on validation and test."""
    runs = {"dense": lottery / "level_0" / "dense", "ticket": lottery / f"level_{last}" / "ticket"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, run_dir in runs.items():
        m = json.loads((run_dir / "metrics.json").read_text())
        out[name] = {split: m[split]["per_class_recall"] for split in ("val", "test")}
    return out


def shifted_classes(lottery: Path, level: int) -> list[str]:
    """The classes whose recall differs between validation and test beyond chance, for the
    dense model (level 0) or the ticket of a level."""
    run_dir = lottery / f"level_{level}" / ("dense" if level == 0 else "ticket")
    m = json.loads((run_dir / "metrics.json").read_text())
    return [c["class"] for c in split_shift(m["val"], m["test"]) if c["shifted"]]


def mean_recall(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and split, each class's recall averaged over seeds."""
    first = rows[0]["per_class_recall"]
    return {
        model: {
            split: {
                c: statistics.fmean(r["per_class_recall"][model][split][c] for r in rows)
                for c in first[model][split]
            }
            for split in first[model]
        }
        for model in first
    }


CONTROLS = ("random_reinit", "random_mask")


def control_accuracies(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The controls' test and validation accuracy at the last level, where the lottery has them
    (a seed folder trained with the controls, now or by an earlier call)."""
    last = levels[-1]["runs"]
    return {
        f"{kind}_{split}_accuracy": last[kind][split]["accuracy"]
        for kind in CONTROLS
        if kind in last
        for split in ("test", "val")
    }


def versus_controls(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per control, the paired ticket-minus-control difference over the seeds that have it."""
    out: dict[str, Any] = {}
    for kind in CONTROLS:
        have = [r for r in rows if f"{kind}_test_accuracy" in r]
        if len(have) < 2:
            raise MedxferError(
                f"{len(have)} seed(s) have the {kind} control: one pair has no scatter",
                fix="run --controls on at least two seeds",
            )
        out[kind] = {"seeds": [r["seed"] for r in have]} | {
            split: paired(
                [r[f"ticket_{split}_accuracy"] - r[f"{kind}_{split}_accuracy"] for r in have]
            )
            for split in ("test", "val")
        }
    return out


# settings medxfer gained after a result was made, each at the value that reproduces that
# result's behaviour (checked bit for bit on a dense run before seeds were combined, see the
# README): --extra may carry them when --combine reads a result made before they existed
ADDED_SINCE = frozenset({"train.bn_recalibrate=false"})


def combined(
    path: Path, protocol: list[str], lottery: str, seeds: list[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The per-seed rows of an earlier result of the same protocol, less the seeds to run now,
    and the overrides of ``ADDED_SINCE`` that this call adds to that protocol."""
    try:
        old = json.loads(path.read_text())
        old_protocol, old_runs = old["protocol"], old["runs"]
    except (OSError, ValueError, KeyError) as err:
        raise MedxferError(f"cannot read a ticket-seeds result from {path}: {err!r}",
                           fix="pass a studies/results/ticket-seeds/*.json") from None  # fmt: skip
    restored = [o for o in protocol if o in ADDED_SINCE and o not in old_protocol["overrides"]]
    same = [o for o in protocol if o not in restored]
    if old_protocol != {"overrides": same, "lottery": lottery}:
        raise MedxferError(
            f"{path} used another protocol: {old_protocol} (now {protocol}, {lottery})",
            fix="give the same --levels, --rewind and --extra as that result",
        )
    return [r for r in old_runs if r["seed"] not in seeds], restored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(PROTOCOLS))
    p.add_argument("--data-root", type=abspath, default=SHARED_DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--levels", type=int, default=4, help="pruning levels to reach 80%%")
    p.add_argument("--rewind", default="init", help="init | epoch:K | lr")
    p.add_argument("--out-dir", type=abspath, default=REPO / "runs" / "bench" / "ticket-seeds")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--name-suffix", default="", help="added to the result and run folder names")
    p.add_argument(
        "--controls",
        action="store_true",
        help="train both controls too (added to existing seed folders) and compare the ticket "
        "with them over seeds; result ticket-seeds-<...>-controls.json",
    )
    p.add_argument(
        "--combine",
        type=abspath,
        help="an earlier result JSON of the same protocol: its seeds join these (its run "
        "folders need not exist any more)",
    )
    args = p.parse_args()
    data = args.data_root / args.dataset
    protocol = [*COMMON_UNSEEDED, *PROTOCOLS[args.dataset], *args.extra]
    tag = f"{args.levels}levels-rewind-{args.rewind.replace(':', '')}{args.name_suffix}"
    controls = "controls on" if args.controls else "no controls"
    lottery = (
        f"{args.levels} levels to 80% sparsity, rewind {args.rewind}, {controls}, head not pruned"
    )
    earlier, restored = (
        combined(args.combine, protocol, lottery, args.seeds) if args.combine else ([], [])
    )
    if len(args.seeds) + len(earlier) < 2:
        p.error("give at least two seeds: one pair has no scatter")
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        out = args.out_dir / args.dataset / tag / f"seed{seed}"
        cmd = [*medxfer_cmd(), "prune", "--data", str(data), "--out", str(out),
               "--target-sparsity", "0.8", "--levels", str(args.levels), "--rewind", args.rewind,
               *([] if args.controls else ["--no-controls"]), *protocol,
               f"train.seed={seed}"]  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        _, seconds = run(cmd, out.parent / f"seed{seed}.log")
        levels = json.loads((out / "lottery.json").read_text())["levels"]
        kept = [lv["runs"]["dense" if lv["level"] == 0 else "ticket"] for lv in levels]
        test, val = [r["test"] for r in kept], [r["val"] for r in kept]
        rows.append({
            "seed": seed,
            "dense_test_accuracy": test[0]["accuracy"],
            "ticket_test_accuracy": test[-1]["accuracy"],
            "ticket_sparsity": levels[-1]["sparsity"],
            "difference_points": 100 * (test[-1]["accuracy"] - test[0]["accuracy"]),
            # validation is carved from the training split: where it and the official test
            # split disagree about the ticket, the gap is a shift between them, not noise
            "dense_val_accuracy": val[0]["accuracy"],
            "ticket_val_accuracy": val[-1]["accuracy"],
            "dense_val_balanced_accuracy": val[0]["balanced_accuracy"],
            "ticket_val_balanced_accuracy": val[-1]["balanced_accuracy"],
            "levels": [{"sparsity": lv["sparsity"], "test_accuracy": t["accuracy"],
                        "val_accuracy": v["accuracy"],
                        "val_balanced_accuracy": v["balanced_accuracy"],
                        "val_test_shifted_classes": shifted_classes(out, lv["level"])}
                       for lv, t, v in zip(levels, test, val, strict=True)],
            # every level's epochs, whichever invocation trained them (a resumed call is short)
            "training_seconds": training_seconds(out),
            "seconds_this_call": round(seconds, 1),
            # where the two splits disagree, which classes move (recall per class)
            "per_class_recall": per_class_recall(out, levels[-1]["level"]),
            "lottery_dir": str(out),
            "command": " ".join(cmd),
        } | control_accuracies(levels))  # fmt: skip
        r = rows[-1]
        dense, ticket, points = (r[k] for k in ("dense_test_accuracy", "ticket_test_accuracy",
                                                "difference_points"))  # fmt: skip
        print(f"seed {seed}: dense {dense:.4f}, ticket {ticket:.4f} ({points:+.1f} pt)")
    rows = sorted([*earlier, *rows], key=lambda r: r["seed"])
    diff = paired([r["ticket_test_accuracy"] - r["dense_test_accuracy"] for r in rows])
    diff_val = paired([r["ticket_val_accuracy"] - r["dense_val_accuracy"] for r in rows])
    within = diff["mean"] >= -0.01
    versus = versus_controls(rows) if args.controls else None
    out_json = {
        "dataset": args.dataset,
        "data": str(data),
        "protocol": {"overrides": protocol, "lottery": lottery},
        # seeds read from an earlier result (--combine) rather than trained by this call
        "combined_from": (
            {
                "path": str(args.combine),
                "seeds": [r["seed"] for r in earlier],
                "settings_added_since": restored,
            }
            if earlier
            else None
        ),
        "runs": rows,
        "dense_test_accuracy": summary([r["dense_test_accuracy"] for r in rows]),
        "ticket_test_accuracy": summary([r["ticket_test_accuracy"] for r in rows]),
        "paired_difference": diff,
        "val_accuracy": {
            "dense": summary([r["dense_val_accuracy"] for r in rows]),
            "ticket": summary([r["ticket_val_accuracy"] for r in rows]),
            "paired_difference": diff_val,
        },
        "mean_per_class_recall": mean_recall(rows),
        # the last (80%) ticket minus each control of the same seed and level
        "ticket_minus_controls": versus,
        "verdict": {
            "ticket_within_1pt_of_dense_on_average": within,
            # the whole interval below -1 point: worse than the target allows, beyond the noise
            "interval_entirely_below_minus_1pt": diff["ci95"][1] < -0.01,
        }
        | (
            {
                f"ticket_beats_{kind}_on_average": versus[kind]["test"]["mean"] > 0
                for kind in CONTROLS
            }
            if versus
            else {}
        ),
    }
    print(
        json.dumps(
            {
                k: out_json[k]
                for k in (
                    "paired_difference",
                    "val_accuracy",
                    "mean_per_class_recall",
                    "ticket_minus_controls",
                    "verdict",
                )
            },
            indent=2,
        )
    )
    save(
        f"ticket-seeds/{args.dataset}-{tag}{'-controls' if args.controls else ''}",
        out_json,
        STUDY_RESULTS,
    )


if __name__ == "__main__":
    main()
