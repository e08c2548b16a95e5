"""Which conformal score should be the default: LAC or APS, read together with the flags, on
validation only.

    python studies/conformal_default.py RUN --name N [--repeats R] [--threads T]
    python studies/conformal_default.py --combine JSON ...

``studies/conformal_shifts.py`` showed on validation that LAC's sets lose coverage under strong
appearance shifts (brain: 0.70 to 0.72 over the nine severity-3 shifts) where APS's keep it
(0.90 to 0.93), and APS became an option. Whether it should be the default depends on what a
user reads: the set beside the flag. A shifted image that the flags already mark `unfamiliar` or
`review` is doubted whatever its set; the set matters most on the images left `ok`. This study
measures that, on validation alone:

- the run's validation images, clean and under the nine covariate shifts of
  ``medxfer.evaluate.shifts`` at severity 3 (the suite's functions and seed, at the model's input
  size), scored by the run's own trust statistics as ``medxfer predict`` scores them;
- validation split in halves ``--repeats`` times: on the clean images of one half, the flags'
  thresholds (the run's own ``trust.acceptance`` and budget share) and the 90% sets of each
  score are calibrated; on the other half, clean and shifted, this counts each score's coverage
  and mean set size among all images and among the images left ``ok``, and the ``ok`` share.

The rule, written before the first run of this script: APS becomes the default only if, on every
as-configured run measured (brain and chest, two seeds each), among the images left ``ok``
(mean over the nine shifts), APS covers at least 0.88 and at least 0.03 more than LAC, while on
clean validation both scores cover within 0.01 of nominal and APS's mean set size stays within
the issue's limits (1.2 for brain, 1.6 for chest; ``--max-size``). Otherwise LAC, the smaller
sets, stays the default, and APS stays an option. Writes
studies/results/conformal-default/<name>.json; run it on each run, then ``--combine``.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling studies

from _common import STUDY_RESULTS, abspath, save
from conformal_shifts import SCORES, _rounded, sets_from
from trust_budget import loaded

from medxfer.evaluate import trust_fit
from medxfer.evaluate.shifts import SHIFTS, apply_shift

SEVERITY, COVERAGE = 3, 0.90
CANDIDATES = ("lac", "aps")
MIN_OK_COVERAGE, GAIN, CLEAN_TOLERANCE = 0.88, 0.03, 0.01

Scored = dict[str, np.ndarray]  # probs, ood, failure


def scored_cases(run: Path) -> tuple[dict[str, Any], np.ndarray, dict[str, Scored]]:
    trust, model, meta, images, labels = loaded(run)
    cases = {"clean": images} | {s: apply_shift(images, s, SEVERITY, seed=0) for s in SHIFTS}
    out = {}
    with torch.inference_mode():
        for name, arrays in cases.items():
            t = trust.score(model, meta, arrays)
            out[name] = {"probs": t.probs, "ood": t.ood_score, "failure": t.failure_score}
    return trust.record, labels, out


def counted(sets: np.ndarray, labels: np.ndarray, ok: np.ndarray) -> dict[str, float]:
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(1)
    return {
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "ok_coverage": float(covered[ok].mean()) if ok.any() else float("nan"),
        "ok_mean_set_size": float(size[ok].mean()) if ok.any() else float("nan"),
        "ok": float(ok.mean()),
    }


def on_halves(record: dict[str, Any], labels: np.ndarray, cases: dict[str, Scored],
              repeats: int) -> dict[str, Any]:  # fmt: skip
    acceptance = float(record["acceptance"])
    share = float(record.get("ood_share", 0.5))
    clean = cases["clean"]
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in CANDIDATES}
    for _ in range(repeats):
        perm = rng.permutation(len(labels))
        cal, held = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        t_ood, t_review = trust_fit.thresholds(
            clean["ood"][cal], clean["failure"][cal], acceptance, share
        )
        ok = {
            case: trust_fit.flags(c["ood"][held], c["failure"][held], t_ood, t_review) == "ok"
            for case, c in cases.items()
        }  # the same flags for both scores
        for name in CANDIDATES:
            score = SCORES[name]
            a_cal = score(clean["probs"][cal], rng)[np.arange(len(cal)), labels[cal]]
            row = {}
            for case, c in cases.items():
                sets = sets_from(a_cal, score(c["probs"][held], rng), COVERAGE)
                row[case] = counted(sets, labels[held], ok[case])
            rows[name].append(row)
    out: dict[str, Any] = {"acceptance": acceptance, "ood_share": share}
    for name, got in rows.items():
        mean: dict[str, dict[str, Any]] = {
            case: {k: _rounded([r[case][k] for r in got]) for k in got[0][case]} for case in got[0]
        }
        shifted = [mean[s] for s in SHIFTS]
        # a shift that leaves no image ``ok`` has no coverage among them (None): left out
        ok_coverage = [float(v) for m in shifted if (v := m["ok_coverage"]) is not None]
        out[name] = {
            "clean": mean["clean"],
            "severity3_mean_coverage": _rounded([m["coverage"] for m in shifted]),
            "severity3_mean_ok_coverage": _rounded(ok_coverage),
            "severity3_worst_ok_coverage": min(ok_coverage, default=None),
            "by_shift": {s: mean[s] for s in SHIFTS},
        }
    return out


def measure(run: Path, repeats: int) -> dict[str, Any]:
    if not (run / "trust.json").is_file():
        raise SystemExit(
            f"error: {run} has no trust statistics\nfix: pass a trained run, or run "
            f"`medxfer trust {run}` first"
        )
    record, labels, cases = scored_cases(run)
    if record["coverage"] != COVERAGE or record["class_conditional"]:
        raise SystemExit(
            f"error: {run}'s sets are not marginal at {COVERAGE}\nfix: pass a run with the "
            "default trust.coverage and marginal sets"
        )
    return {"run": str(run), "validation_images": len(labels),
            "conformal_nominal": COVERAGE} | on_halves(record, labels, cases, repeats)  # fmt: skip


def choose(paths: list[Path], max_size: dict[str, float]) -> dict[str, Any]:
    per_run = {}
    for path in paths:
        r = json.loads(path.read_text())
        lac, aps = r["lac"], r["aps"]
        limit = max_size[r["dataset"]]
        per_run[path.stem] = {
            "aps_ok_coverage": aps["severity3_mean_ok_coverage"],
            "lac_ok_coverage": lac["severity3_mean_ok_coverage"],
            "checks": {
                "aps_ok_coverage_at_least": aps["severity3_mean_ok_coverage"] >= MIN_OK_COVERAGE,
                "aps_gain_over_lac": aps["severity3_mean_ok_coverage"]
                >= lac["severity3_mean_ok_coverage"] + GAIN,
                "clean_coverage": all(
                    abs(s["clean"]["coverage"] - COVERAGE) <= CLEAN_TOLERANCE for s in (lac, aps)
                ),
                "aps_clean_size": aps["clean"]["mean_set_size"] <= limit,
            },
        }
    passes = all(all(v["checks"].values()) for v in per_run.values())
    return {"per_run": per_run, "aps_becomes_default": passes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", type=abspath)
    p.add_argument("--name", help="result name")
    p.add_argument("--dataset", choices=("brain", "chest"), help="which set-size limit applies")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--combine", nargs="+", type=Path, metavar="JSON")
    args = p.parse_args()
    if args.combine:
        out = choose(args.combine, {"brain": 1.2, "chest": 1.6})
        print(json.dumps(out, indent=1))
        save("conformal-default/verdict", out, STUDY_RESULTS)
        return
    if args.run is None or not args.name or not args.dataset:
        p.error("give RUN, --name and --dataset (or --combine)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = measure(args.run, args.repeats) | {"dataset": args.dataset}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    for name in CANDIDATES:
        r = out[name]
        clean = r["clean"]
        print(
            f"{name}: clean {clean['coverage']:.3f} ({clean['mean_set_size']:.2f}); shifted "
            f"{r['severity3_mean_coverage']:.3f}, among ok {r['severity3_mean_ok_coverage']:.3f} "
            f"(worst {r['severity3_worst_ok_coverage']:.3f})"
        )
    save(f"conformal-default/{args.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
