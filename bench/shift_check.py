"""What the label-free check (`medxfer shift`) sees, measured where the labels are known.

    python bench/shift_check.py chest-xray-pneumonia [--runs DIR ...] [--draws 50]

For each trained run (default: the five seeds of bench/seeds.py under runs/bench/seeds/):

1. **The official test split, labels hidden**: `medxfer shift RUN <data>/test`. Recorded: the
   verdict, the smallest KS p-value, the estimated accuracy (ATC) against the run's real test
   accuracy, the estimated class mix (BBSE) against the test split's real mix, and the
   predicted class shares of the file path that `medxfer shift` and `medxfer predict` use
   against those of the run's own test evaluation (`test_predictions.npz`): equal shares show
   both paths preprocess alike.
2. **No shift (false alarms)**: the validation split cut at random into halves, one the
   reference and one the "new" images, `--draws` times: how often the check fires at its 5%
   level, and the ATC error on the half.
3. **Pure label shift (power, and BBSE where its assumption holds)**: as 2, but the "new" half
   is resampled to the test split's class mix: how often it fires, and how far BBSE's estimate
   lands from that mix, against the naive guesses (validation's mix, the predicted mix).

In 2 and 3 (pure label shifts: the images of each class are validation's), the test of BBSE's
assumption (`label_shift_test`, 100 bootstrap draws there) should reject rarely: its rejection
rate at 5% is recorded; on the official test split its p-value is.

Writes bench/results/shift-check/<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import numpy as np
from _common import REPO, SHARED_DATA, abspath, medxfer_cmd, run, save

from medxfer.evaluate.predict import load_trained
from medxfer.evaluate.unlabelled import (
    ALPHA,
    compare_outputs,
    reference_outputs,
    stored_outputs,
)


def l1(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def controls(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], target_mix: np.ndarray, draws: int
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    k = len(classes)
    null_flags, null_atc, ls_flags, ls_atc, bbse_err, val_err, pred_err = [], [], [], [], [], [], []
    assumption_rejected: list[bool] = []
    for _ in range(draws):
        order = rng.permutation(len(labels))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        r = compare_outputs(probs[a], labels[a], probs[b], classes, n_bootstrap=100)
        null_flags.append(r["shifted"])
        assumption_rejected.append(r["label_shift_test"]["p_value"] < ALPHA)
        acc_b = float((probs[b].argmax(1) == labels[b]).mean())
        null_atc.append(r["accuracy"]["estimated_accuracy"] - acc_b)
        # resample half b to the target class mix (with replacement within each class)
        counts = rng.multinomial(len(b), target_mix)
        picked = np.concatenate([
            rng.choice(b[labels[b] == j], size=counts[j], replace=True)
            for j in range(k) if counts[j] and (labels[b] == j).any()
        ])  # fmt: skip
        r = compare_outputs(probs[a], labels[a], probs[picked], classes, n_bootstrap=100)
        ls_flags.append(r["shifted"])
        assumption_rejected.append(r["label_shift_test"]["p_value"] < ALPHA)
        acc = float((probs[picked].argmax(1) == labels[picked]).mean())
        ls_atc.append(r["accuracy"]["estimated_accuracy"] - acc)
        true_mix = np.bincount(labels[picked], minlength=k) / len(picked)
        bbse_err.append(l1([c["estimated_share"] for c in r["per_class"]], true_mix))
        val_err.append(l1([c["reference_true_share"] for c in r["per_class"]], true_mix))
        pred_err.append(l1([c["predicted_share"] for c in r["per_class"]], true_mix))
    return {
        "draws": draws,
        "no_shift_false_alarm_rate": statistics.fmean(null_flags),
        "no_shift_atc_error_mean": statistics.fmean(null_atc),
        "no_shift_atc_abs_error_mean": statistics.fmean(abs(e) for e in null_atc),
        "label_shift_detection_rate": statistics.fmean(ls_flags),
        # both kinds of draw are pure label shifts: how often BBSE's assumption is rejected
        "bbse_assumption_false_rejection_rate": statistics.fmean(assumption_rejected),
        "label_shift_atc_error_mean": statistics.fmean(ls_atc),
        "label_shift_mix_l1_error_mean": {
            "bbse": statistics.fmean(bbse_err),
            "validation_mix": statistics.fmean(val_err),
            "predicted_mix": statistics.fmean(pred_err),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--data-root", type=abspath, default=SHARED_DATA)
    p.add_argument("--runs", type=abspath, nargs="+")
    p.add_argument("--draws", type=int, default=50)
    args = p.parse_args()
    test_dir = args.data_root / args.dataset / "test"
    runs = args.runs or sorted((REPO / "runs" / "bench" / "seeds" / args.dataset).glob("seed*/"))
    runs = [r for r in runs if (r / "best.pt").exists()]
    if not runs:
        p.error("no trained runs: run bench/seeds.py first or pass --runs")
    rows: list[dict[str, Any]] = []
    for run_dir in runs:
        out = run_dir / "shift-test.json"
        cmd = [*medxfer_cmd(), "shift", str(run_dir), str(test_dir), "--out", str(out)]
        _, seconds = run(cmd)
        check = json.loads(out.read_text())
        m = json.loads((run_dir / "metrics.json").read_text())
        saved = np.load(run_dir / "test_predictions.npz")
        classes = check["classes"]
        k = len(classes)
        test_mix = np.bincount(saved["labels"], minlength=k) / len(saved["labels"])
        loader_shares = np.bincount(saved["probs"].argmax(1), minlength=k) / len(saved["labels"])
        # the reference `medxfer shift` used: stored by the run, or rebuilt as it rebuilt it
        stored = stored_outputs(run_dir, k)
        probs, labels = stored if stored is not None else reference_outputs(*load_trained(run_dir))
        rows.append({
            "run_dir": str(run_dir),
            "command": " ".join(cmd),
            "seconds": round(seconds, 1),
            "test": {
                "shifted": check["shifted"],
                "ks_min_p_value": check["ks_min_p_value"],
                "predicted_shares_chi2_p_value": check["predicted_shares_chi2_p_value"],
                "atc_estimated_accuracy": check["accuracy"]["estimated_accuracy"],
                "test_accuracy": m["test"]["accuracy"],
                "val_accuracy": check["accuracy"]["reference_accuracy"],
                "mean_confidence": check["mean_confidence"],
                "estimated_mix": {c["class"]: c["estimated_share"] for c in check["per_class"]},
                "test_mix": dict(zip(classes, test_mix.tolist(), strict=True)),
                "val_mix": {c["class"]: c["reference_true_share"] for c in check["per_class"]},
                "bbse_mix_l1_error": l1([c["estimated_share"] for c in check["per_class"]],
                                        test_mix),
                "validation_mix_l1_error": l1([c["reference_true_share"]
                                               for c in check["per_class"]], test_mix),
                "bbse_assumption_p_value": check["label_shift_test"]["p_value"],
                "predicted_shares_file_path": [c["predicted_share"] for c in check["per_class"]],
                "predicted_shares_run_evaluation": loader_shares.tolist(),
            },
            "controls": controls(probs, labels, classes, test_mix, args.draws),
        })  # fmt: skip
        t, c = rows[-1]["test"], rows[-1]["controls"]
        print(f"{run_dir.name}: test shifted={t['shifted']} (p {t['ks_min_p_value']:.1g}); "
              f"ATC {t['atc_estimated_accuracy']:.3f} vs real {t['test_accuracy']:.3f}; "
              f"BBSE L1 {t['bbse_mix_l1_error']:.2f} vs {t['validation_mix_l1_error']:.2f}; "
              f"null alarms {c['no_shift_false_alarm_rate']:.2f}, "
              f"label-shift power {c['label_shift_detection_rate']:.2f}; BBSE assumption p "
              f"{t['bbse_assumption_p_value']:.2g} on test, false rejections "
              f"{c['bbse_assumption_false_rejection_rate']:.2f}")  # fmt: skip

    def mean(path: list[str]) -> float:
        vals = []
        for r in rows:
            v: Any = r
            for key in path:
                v = v[key]
            vals.append(float(v))
        return statistics.fmean(vals)

    save(f"shift-check/{args.dataset}", {
        "dataset": args.dataset,
        "data": str(args.data_root / args.dataset),
        "alpha": ALPHA,
        "runs": rows,
        "summary": {
            "test_flagged": f"{sum(r['test']['shifted'] for r in rows)} of {len(rows)}",
            "test_atc_error_mean": statistics.fmean(
                r["test"]["atc_estimated_accuracy"] - r["test"]["test_accuracy"] for r in rows),
            "test_val_accuracy_error_mean": statistics.fmean(
                r["test"]["val_accuracy"] - r["test"]["test_accuracy"] for r in rows),
            "test_bbse_mix_l1_error_mean": mean(["test", "bbse_mix_l1_error"]),
            "test_validation_mix_l1_error_mean": mean(["test", "validation_mix_l1_error"]),
            "test_bbse_assumption_p_values": [r["test"]["bbse_assumption_p_value"] for r in rows],
            "no_shift_false_alarm_rate": mean(["controls", "no_shift_false_alarm_rate"]),
            "bbse_assumption_false_rejection_rate": mean(
                ["controls", "bbse_assumption_false_rejection_rate"]),
            "label_shift_detection_rate": mean(["controls", "label_shift_detection_rate"]),
            "label_shift_bbse_l1_error_mean": statistics.fmean(
                r["controls"]["label_shift_mix_l1_error_mean"]["bbse"] for r in rows),
            "label_shift_validation_mix_l1_error_mean": statistics.fmean(
                r["controls"]["label_shift_mix_l1_error_mean"]["validation_mix"] for r in rows),
        },
    })  # fmt: skip


if __name__ == "__main__":
    main()
