"""The price of stricter flags: the shift suite's flag keys at several ``trust.acceptance`` rates.

    python studies/trust_acceptance.py RUN --cases DIR --name N [--acceptance 0.8 0.85 0.9 0.95]

``trust.acceptance`` (default 0.95) is the share of validation images that end ``ok``; the
unfamiliar and review thresholds follow from it on validation. A lower rate flags more images,
errors and right answers alike. This study shows what each rate buys on the shift suite, so
that a user who needs more errors caught can see the cost: for each rate, thresholds are set on
the run's validation images exactly as ``trust.fit`` sets them (``trust_fit.thresholds``, the
run's ``ood_share``), and applied to the per-image scores of the suite's cached cases
(``--cases``: ``bench/trust.py --work-dir DIR`` writes them to DIR/cases/base). At the run's own
rate the recomputed flags must equal the suite's, which the script checks.

It chooses nothing: the default rate stays as the issue set it, and the test split and the
shifted cases are read to report, not to pick a rate. Writes
studies/results/trust-acceptance/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate import trust_fit
from medxfer.evaluate.selective import accepted_accuracy, coverage, errors_flagged
from medxfer.evaluate.shifts import SHIFTS


def validation_scores(run: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The run's chosen distance and failure score on its validation images, and trust.json."""
    from medxfer.evaluate.predict import folded_for_inference
    from medxfer.evaluate.trust import load_trust
    from medxfer.evaluate.trust_run import run_split_arrays

    model, meta, arrays = run_split_arrays(run, ("val",))
    images, _ = arrays["val"]
    model, _ = folded_for_inference(model.eval(), meta)
    trust = load_trust(run)
    with torch.inference_mode():
        t = trust.score(model, meta, images)
    return t.ood_score, t.failure_score, trust.record


def case_keys(flag: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    right, ok = pred == labels, flag == "ok"
    acc, caught = accepted_accuracy(right, ok), errors_flagged(right, ok)
    return {
        "ok_fraction": round(coverage(ok), 4),
        "accepted_accuracy": None if acc is None else round(acc, 4),
        "errors_flagged": None if caught is None else round(caught, 4),
    }


def empty_sets_among_ok(flag: np.ndarray, case: dict[str, np.ndarray],
                        labels: np.ndarray) -> dict[str, float | None]:  # fmt: skip
    """The ``ok`` images whose conformal set is empty (LAC: the least sure), and the accuracy of
    those and of the other ``ok`` images: what an empty set adds to an ``ok`` flag."""
    ok, empty = flag == "ok", ~case["sets"].any(1)
    right = case["pred"] == labels

    def acc(mask: np.ndarray) -> float | None:
        return round(float(right[mask].mean()), 4) if mask.any() else None

    return {"test_ok_empty_set_fraction": round(float((ok & empty).mean()), 4),
            "test_ok_empty_set_accuracy": acc(ok & empty),
            "test_ok_with_a_class_accuracy": acc(ok & ~empty)}  # fmt: skip


def measure(run: Path, cases: Path, rates: list[float]) -> dict[str, Any]:
    val_ood, val_fail, record = validation_scores(run)
    labels = np.load(run / "test_predictions.npz")["labels"]
    loaded = {}
    for name in ["test", *(f"{s}-3" for s in SHIFTS)]:
        path = cases / f"{name}.npz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run bench/trust.py {run} --work-dir ... first")
        with np.load(path) as z:
            loaded[name] = {k: z[k] for k in ("ood", "failure", "pred", "flag", "sets")}
        if len(loaded[name]["pred"]) != len(labels):
            raise SystemExit(f"{path}: {len(loaded[name]['pred'])} images, the test split has "
                             f"{len(labels)} (run the suite without --limit)")  # fmt: skip
    share = float(record["ood_share"])
    rows = []
    for rate in rates:
        t_ood, t_review = trust_fit.thresholds(val_ood, val_fail, rate, share)
        val_flag = trust_fit.flags(val_ood, val_fail, t_ood, t_review)
        per, per_flags = {}, {}
        for name, c in loaded.items():
            flag = per_flags[name] = trust_fit.flags(c["ood"], c["failure"], t_ood, t_review)
            if abs(rate - record["acceptance"]) < 1e-9 and not np.array_equal(flag, c["flag"]):
                raise SystemExit(f"{name}: flags recomputed at the run's own rate differ from "
                                 "the suite's; the cases are not this run's")  # fmt: skip
            per[name] = case_keys(flag, c["pred"], labels)
        test = per["test"]
        test_acc = float((loaded["test"]["pred"] == labels).mean())
        sev3 = [per[f"{s}-3"] for s in SHIFTS]
        gaps = {s: None if r["accepted_accuracy"] is None
                else round(100 * (test_acc - r["accepted_accuracy"]), 2)
                for s, r in zip(SHIFTS, sev3, strict=True)}  # fmt: skip
        flagged = {s: r["errors_flagged"] for s, r in zip(SHIFTS, sev3, strict=True)}
        rows.append({
            "acceptance": rate,
            "validation_ok_fraction": round(float((val_flag == "ok").mean()), 4),
            "test_ok_fraction": test["ok_fraction"],
            "test_accepted_accuracy": test["accepted_accuracy"],
            "test_errors_flagged": test["errors_flagged"],
            **empty_sets_among_ok(per_flags["test"], loaded["test"], labels),
            "severity3_accepted_accuracy_gap": max(g for g in gaps.values() if g is not None),
            "severity3_errors_flagged": min(f for f in flagged.values() if f is not None),
            "severity3_mean_errors_flagged": round(float(np.mean(
                [f for f in flagged.values() if f is not None])), 4),
            "severity3_gap_by_shift": gaps,
            "severity3_errors_flagged_by_shift": flagged,
        })  # fmt: skip
        r = rows[-1]
        print(f"acceptance {rate}: test ok {r['test_ok_fraction']}, severity-3 worst gap "
              f"{r['severity3_accepted_accuracy_gap']}, errors flagged worst "
              f"{r['severity3_errors_flagged']} (mean {r['severity3_mean_errors_flagged']})",
              flush=True)  # fmt: skip
    return {"run": str(run), "cases": str(cases), "test_accuracy": round(test_acc, 4),
            "run_acceptance": record["acceptance"], "ood_share": share,
            "ood_detector": record["ood_detector"], "rows": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=abspath)
    p.add_argument("--cases", type=abspath, required=True, help="the suite's DIR/cases/base")
    p.add_argument("--name", required=True, help="studies/results/trust-acceptance/<name>.json")
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.80, 0.85, 0.90, 0.95])
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.run / "trust.json").exists():
        raise SystemExit(f"error: {args.run} has no trust.json\nfix: give a finished run folder")
    if any(not 0 < a < 1 for a in args.acceptance):
        raise SystemExit("error: --acceptance rates lie in (0, 1)\nfix: e.g. --acceptance 0.9 0.95")
    t0 = time.perf_counter()
    out = measure(args.run, args.cases, sorted(args.acceptance))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    save(f"trust-acceptance/{args.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
