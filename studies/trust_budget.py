"""How the rejection budget is shared between ``unfamiliar`` and ``review``, on validation only.

    python studies/trust_budget.py RUN --name N [--held-out-run RUN2 --held-out-class C]
        [--shares 0 0.25 0.5 0.75 1] [--repeats R] [--threads T]
    python studies/trust_budget.py --combine JSON ...

At ``trust.acceptance`` 0.95, 5% of validation images are flagged. ``ood_share`` of that budget
goes to ``unfamiliar`` (the chosen distance's threshold) and the rest to ``review`` (the failure
score's threshold among familiar images): ``trust_fit.thresholds``. medxfer has always split it
in halves (``ood_share`` 0.5). Under a mild appearance shift (resolution loss, JPEG) images
still look familiar and their errors can only be caught by ``review``; under a strong one the
distance catches them whatever its share. This study measures the split, on validation alone:

- the run's validation images, clean and under the nine covariate shifts of
  ``medxfer.evaluate.shifts`` at severity 3 (the suite's functions and seed, at the model's
  input size), scored by the run's own trust statistics (its detector and failure score,
  fitted on all of validation: the same mild optimism for every share);
- validation split in halves ``--repeats`` times: thresholds set on the clean images of one half
  for each share, flags counted on the other half, clean and shifted: errors flagged (worst
  shift and mean of the nine), accepted accuracy's gap to the half's clean accuracy, ``ok``
  fraction;
- with ``--held-out-run`` (the same recipe trained without class C, ``bench/trust.py
  --train-held-out``): that run's thresholds for each share, set on its own validation images,
  and the share of RUN's validation images of C (which it never saw) that it flags.

The rule, stated before the first run: the default share changes from 0.5 to another share only
if, at acceptance 0.95 on every run measured, the worst shift's errors flagged rises by at
least 0.03 and the mean over the nine shifts does not fall, clean errors flagged does not fall
by more than 0.01, and, on the runs with a held-out class, the share of the new class flagged
does not fall by more than 0.02. Writes studies/results/trust-budget/<name>.json; run it on each
run, then ``--combine`` the JSONs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate import trust_fit
from medxfer.evaluate.predict import folded_for_inference
from medxfer.evaluate.selective import accepted_accuracy, errors_flagged
from medxfer.evaluate.shifts import SHIFTS, apply_shift
from medxfer.evaluate.trust import TrustModel, load_trust
from medxfer.evaluate.trust_run import run_split_arrays

SEVERITY = 3
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SHARE = 0.5
RISE, CLEAN_FALL, NEW_FALL = 0.03, 0.01, 0.02  # the rule's margins

Scored = dict[str, np.ndarray]  # ood, failure, right


def scored(trust: TrustModel, model: torch.nn.Module, meta: dict[str, Any],
           images: np.ndarray, labels: np.ndarray | None) -> Scored:  # fmt: skip
    with torch.inference_mode():
        t = trust.score(model, meta, images)
    out = {"ood": t.ood_score, "failure": t.failure_score}
    if labels is not None:
        out["right"] = t.pred == labels
    return out


def loaded(run: Path) -> tuple[TrustModel, torch.nn.Module, dict[str, Any], np.ndarray, np.ndarray]:
    model, meta, arrays = run_split_arrays(run, ("val",))
    model, _ = folded_for_inference(model.eval(), meta)
    images, labels = arrays["val"]
    return load_trust(run), model, meta, images, labels


def counted(c: Scored, idx: np.ndarray, t_ood: float, t_review: float) -> dict[str, float | None]:
    ok = trust_fit.flags(c["ood"][idx], c["failure"][idx], t_ood, t_review) == "ok"
    right = c["right"][idx]
    return {"ok": float(ok.mean()), "accuracy": float(right.mean()),
            "accepted_accuracy": accepted_accuracy(right, ok),
            "errors_flagged": errors_flagged(right, ok)}  # fmt: skip


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 4) if got else None


def _gap(clean_accuracy: float | None, accepted: float | None) -> float | None:
    """Clean accuracy minus a shifted case's accepted accuracy, in points."""
    if clean_accuracy is None or accepted is None:
        return None
    return round(100 * (clean_accuracy - accepted), 2)


def on_halves(clean: Scored, shifted: dict[str, Scored], acceptance: float,
              shares: list[float], repeats: int) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(0)
    halves = []
    for _ in range(repeats):
        perm = rng.permutation(len(clean["ood"]))
        halves.append((perm[: len(perm) // 2], perm[len(perm) // 2 :]))
    out: dict[str, Any] = {}
    for share in shares:
        rows = []
        for cal, held in halves:
            t_ood, t_review = trust_fit.thresholds(
                clean["ood"][cal], clean["failure"][cal], acceptance, share
            )
            row = {"clean": counted(clean, held, t_ood, t_review)}
            row |= {s: counted(c, held, t_ood, t_review) for s, c in shifted.items()}
            rows.append(row)
        mean = {case: {k: _mean([r[case][k] for r in rows]) for k in rows[0][case]}
                for case in rows[0]}  # fmt: skip
        flagged = {s: mean[s]["errors_flagged"] for s in shifted}
        gaps = {s: _gap(mean["clean"]["accuracy"], mean[s]["accepted_accuracy"]) for s in shifted}
        out[str(share)] = {
            "clean": mean["clean"],
            "severity3_errors_flagged_worst": min(v for v in flagged.values() if v is not None),
            "severity3_errors_flagged_mean": _mean(list(flagged.values())),
            "severity3_gap_worst": max(g for g in gaps.values() if g is not None),
            "severity3_ok_mean": _mean([mean[s]["ok"] for s in shifted]),
            "by_shift": {s: mean[s] | {"gap": gaps[s]} for s in shifted},
        }
    return out


def new_class(images: np.ndarray, labels: np.ndarray, classes: list[str], held: Path, cls: str,
              acceptance: float, shares: list[float]) -> dict[str, Any]:  # fmt: skip
    """The share of RUN's validation images of ``cls`` (``images``, ``labels`` over
    ``classes``) that RUN2 (never trained on it) flags, with RUN2's thresholds set on its own
    validation images for each share."""
    if cls not in classes:
        raise SystemExit(f"the run has no class {cls!r}; it has {classes}")
    trust, model, meta2, val2, _ = loaded(held)
    if cls in meta2["classes"]:
        raise SystemExit(f"{held} was trained with {cls!r}")
    own = scored(trust, model, meta2, val2, None)
    new = scored(trust, model, meta2, images[labels == classes.index(cls)], None)
    out = {}
    for share in shares:
        t_ood, t_review = trust_fit.thresholds(own["ood"], own["failure"], acceptance, share)
        flag = trust_fit.flags(new["ood"], new["failure"], t_ood, t_review)
        out[str(share)] = {
            "flagged": round(float((flag != "ok").mean()), 4),
            "unfamiliar": round(float((flag == "unfamiliar").mean()), 4),
        }
    return {"run": str(held), "class": cls, "images": len(new["ood"]), "by_share": out}


def measure(run: Path, shares: list[float], repeats: int, held: Path | None,
            cls: str | None) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    trust, model, meta, images, labels = loaded(run)
    if cls is not None and cls not in meta["classes"]:  # before the long scoring
        raise SystemExit(f"{run} has no class {cls!r}; it has {list(meta['classes'])}")
    acceptance = float(trust.record["acceptance"])
    clean = scored(trust, model, meta, images, labels)
    shifted = {}
    for shift in SHIFTS:
        shifted[shift] = scored(
            trust, model, meta, apply_shift(images, shift, SEVERITY, seed=0), labels
        )
        print(f"scored {shift}-{SEVERITY}", flush=True)
    out: dict[str, Any] = {
        "run": str(run), "acceptance": acceptance, "run_ood_share": trust.record["ood_share"],
        "ood_detector": trust.record["ood_detector"],
        "failure_score": trust.record["failure"]["method"],
        "validation_images": len(labels), "repeats": repeats,
        "shares": on_halves(clean, shifted, acceptance, shares, repeats),
    }  # fmt: skip
    if held is not None and cls is not None:
        classes = list(meta["classes"])
        out["new_class"] = new_class(images, labels, classes, held, cls, acceptance, shares)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def choose(paths: list[Path]) -> dict[str, Any]:
    per = {p.stem: json.loads(p.read_text()) for p in paths}
    shares = list(next(iter(per.values()))["shares"])
    base = str(DEFAULT_SHARE)
    verdict: dict[str, Any] = {}
    for share in shares:
        if share == base:
            continue
        runs = {}
        for name, r in per.items():
            a, b = r["shares"][base], r["shares"][share]
            row = {
                "worst_rise": round(b["severity3_errors_flagged_worst"]
                                    - a["severity3_errors_flagged_worst"], 4),
                "mean_change": round(b["severity3_errors_flagged_mean"]
                                     - a["severity3_errors_flagged_mean"], 4),
                "clean_change": round((b["clean"]["errors_flagged"] or 0)
                                      - (a["clean"]["errors_flagged"] or 0), 4),
            }  # fmt: skip
            if "new_class" in r:
                nc = r["new_class"]["by_share"]
                row["new_class_change"] = round(nc[share]["flagged"] - nc[base]["flagged"], 4)
            row["passes"] = (row["worst_rise"] >= RISE and row["mean_change"] >= 0
                             and row["clean_change"] >= -CLEAN_FALL
                             and row.get("new_class_change", 0.0) >= -NEW_FALL)  # fmt: skip
            runs[name] = row
        verdict[share] = {"runs": runs, "passes": all(r["passes"] for r in runs.values())}
    return {"runs": list(per), "default_share": DEFAULT_SHARE,
            "rule": f"worst-shift errors flagged +{RISE} or more, mean not lower, clean errors "
                    f"flagged down {CLEAN_FALL} at most, new class flagged down {NEW_FALL} at "
                    "most, on every run", "shares": verdict,
            "images": "validation only (no test image)"}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=abspath, nargs="?")
    p.add_argument("--name", help="result name (default: the run folder's name)")
    p.add_argument("--held-out-run", type=abspath)
    p.add_argument("--held-out-class")
    p.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--combine", type=abspath, nargs="+", help="study JSONs: apply the rule")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.combine:
        out = choose(args.combine)
        print({s: v["passes"] for s, v in out["shares"].items()})
        save("trust-budget/choice", out, STUDY_RESULTS)
        return
    if not args.run or (args.held_out_run is None) != (args.held_out_class is None):
        p.error("give RUN (and --held-out-run with --held-out-class, or neither), or --combine")
    if DEFAULT_SHARE not in args.shares:
        p.error(f"--shares must include the default {DEFAULT_SHARE}")
    out = measure(args.run, args.shares, args.repeats, args.held_out_run, args.held_out_class)
    for share, r in out["shares"].items():
        nc = out.get("new_class", {}).get("by_share", {}).get(share, {}).get("flagged")
        print(f"share {share}: clean errors flagged {r['clean']['errors_flagged']}, severity-3 "
              f"worst {r['severity3_errors_flagged_worst']} mean "
              f"{r['severity3_errors_flagged_mean']}, worst gap {r['severity3_gap_worst']}, "
              f"new class flagged {nc}")  # fmt: skip
    save(f"trust-budget/{args.name or args.run.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
