"""Conformal sets calibrated per band of familiarity: do they keep their coverage when new
images are less familiar than validation?

    python studies/conformal_bins.py RUN --cases DIR --name N [--repeats R]

On both official test splits the conformal sets cover fewer images than the 90% asked, and the
test images the model finds less familiar are the ones it gets wrong more often. Mondrian
conformal prediction (Vovk et al. 2005; crepes' ``bins``) calibrates a threshold per group of
images, and keeps the coverage in each group. Grouped by a label-free score of how unfamiliar an
image is (the run's ``unfamiliar`` distance, in bands cut at its quantiles on the calibration
images), the sets of unfamiliar images are calibrated on the unfamiliar validation images only.
If new images are less familiar than validation, marginal sets under-cover them and banded
sets should not, as long as each band's images stay exchangeable with validation's.

Compared: the sets ``medxfer`` makes (one threshold, LAC scores as in
``medxfer.evaluate.conformal``) and banded sets with 2 and 3 bands. Everything is read from the
run's trust files (validation scores and distances), so no image is decoded.

Decision, on validation only, stated before any number: validation is split in halves
``--repeats`` times (calibrate on one, count on the other), (a) at random, and (b) tilted, each
image of the lower half of distances going to the calibration half with probability 0.7 and of
the upper half with 0.3, so the counted half is less familiar than the calibration half, as the
test splits are. Banded sets are worth building if, under (b), their coverage is at least 1 point
closer to nominal than the marginal sets', while under (a) they cover within 1 point of nominal
at a mean set size within the issue's limits (1.2 brain, 1.6 chest).

Then, read once and never to choose: coverage and size on the test split and on each case of the
shift suite (``--cases``: the suite's cached cases of this run, ``bench/trust.py --work-dir
DIR`` writes them to DIR/cases/base). Writes studies/results/conformal-bins/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate.conformal import prediction_sets

TILT = 0.7  # probability that a lower-half-distance image goes to the calibration half
BANDS = (1, 2, 3)  # 1 = the sets medxfer makes


def band_edges(dist: np.ndarray, bands: int) -> np.ndarray:
    return np.quantile(dist, np.arange(1, bands) / bands) if bands > 1 else np.zeros(0)


def sets_for(
    cal_scores: np.ndarray,
    cal_dist: np.ndarray,
    probs: np.ndarray,
    dist: np.ndarray,
    coverage: float,
    bands: int,
) -> np.ndarray:
    """Boolean (N, C) conformal sets, calibrated per band of distance (crepes, unsmoothed)."""
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    alphas = np.asarray(hinge(probs), np.float64)
    edges = band_edges(cal_dist, bands)  # one band: every image in bin 0, the plain sets
    cc = ConformalClassifier().fit(cal_scores, bins=np.searchsorted(edges, cal_dist))
    got = cc.predict_set(
        alphas, bins=np.searchsorted(edges, dist), confidence=coverage, smoothing=False
    )
    return np.asarray(got, bool)


def counted(sets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "coverage": float(sets[np.arange(len(labels)), labels].mean()),
        "mean_set_size": float(sets.sum(1).mean()),
    }


def halves(dist: np.ndarray, rng: np.random.Generator, tilted: bool) -> tuple[np.ndarray, ...]:
    if not tilted:
        perm = rng.permutation(len(dist))
        return perm[: len(dist) // 2], perm[len(dist) // 2 :]
    low = dist <= np.median(dist)
    to_cal = rng.random(len(dist)) < np.where(low, TILT, 1.0 - TILT)
    return np.flatnonzero(to_cal), np.flatnonzero(~to_cal)


def validation(v: dict[str, np.ndarray], coverage: float, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tilted in (False, True):
        rng = np.random.default_rng(0)
        rows: dict[int, list[dict[str, float]]] = {b: [] for b in BANDS}
        for _ in range(repeats):
            cal, new = halves(v["dist"], rng, tilted)
            for b in BANDS:
                s = sets_for(
                    v["scores"][cal], v["dist"][cal], v["probs"][new], v["dist"][new], coverage, b
                )
                rows[b].append(counted(s, v["labels"][new]))
        out["tilted" if tilted else "random"] = {
            f"bands={b}": {k: round(float(np.mean([r[k] for r in rs])), 4) for k in rs[0]}
            for b, rs in rows.items()
        }
    return out


def decide(val: dict[str, Any], coverage: float, size_limit: float) -> dict[str, Any]:
    base = abs(val["tilted"]["bands=1"]["coverage"] - coverage)
    verdict = {}
    for b in BANDS[1:]:
        key = f"bands={b}"
        closer = base - abs(val["tilted"][key]["coverage"] - coverage)
        rand = val["random"][key]
        verdict[key] = {
            "tilted_points_closer": round(100 * closer, 2),
            "adopt": bool(
                closer >= 0.01
                and abs(rand["coverage"] - coverage) <= 0.01
                and rand["mean_set_size"] <= size_limit
            ),
        }
    return verdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--cases", required=True, help="the suite's cached cases of RUN (a folder)")
    p.add_argument("--name", required=True)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--size-limit", type=float, required=True, help="1.2 brain, 1.6 chest")
    args = p.parse_args()
    t0 = time.perf_counter()
    from safetensors.numpy import load_file

    run = abspath(args.run)
    stats = load_file(str(run / "trust.safetensors"))
    trust = json.loads((run / "trust.json").read_text())
    saved = np.load(run / "val_predictions.npz")
    v = {
        "scores": stats["cal_scores"],
        "labels": stats["cal_labels"].astype(np.int64),
        "dist": stats["ref_dist"],
        "probs": saved["probs"],
    }
    rows = np.arange(len(v["labels"]))
    if not np.allclose(1 - v["probs"][rows, v["labels"]], v["scores"], atol=1e-5):
        raise SystemExit(f"{run}: val_predictions.npz does not match the conformal scores")
    coverage = float(trust["coverage"])
    val = validation(v, coverage, args.repeats)
    verdict = decide(val, coverage, args.size_limit)
    print(json.dumps({"validation": val, "verdict": verdict}, indent=1))
    # read once, to report: the test split and every cached case of the suite
    cases: dict[str, Any] = {}
    test_saved = np.load(run / "test_predictions.npz")
    test_labels = test_saved["labels"].astype(np.int64)
    cached = np.load(abspath(args.cases) / "test.npz")
    if not np.allclose(cached["probs"], test_saved["probs"], atol=1e-4):
        raise SystemExit(f"{args.cases} holds another model's cases than {run}")
    # one band is the sets medxfer makes: checked against its own code path
    one_band = sets_for(v["scores"], v["dist"], cached["probs"], cached["ood"], coverage, 1)
    assert np.array_equal(one_band, prediction_sets(v["scores"], v["labels"], cached["probs"],
                                                    coverage))  # fmt: skip
    for f in sorted(abspath(args.cases).glob("*.npz")):
        c = np.load(f)
        if len(c["probs"]) != len(test_labels):
            continue  # far-OOD sets: no label of the run's classes
        cases[f.stem] = {
            f"bands={b}": {
                k: round(x, 4)
                for k, x in counted(
                    sets_for(v["scores"], v["dist"], c["probs"], c["ood"], coverage, b), test_labels
                ).items()
            }
            for b in BANDS
        }
    shifted = [k for k in cases if k[-2:] in ("-1", "-2", "-3")]  # covariate shift, severity
    summary = {
        f"bands={b}": {
            "test": cases["test"][f"bands={b}"],
            "shifted_cases_mean_coverage": round(
                float(np.mean([cases[k][f"bands={b}"]["coverage"] for k in shifted])), 4
            ),
        }
        for b in BANDS
    }
    print(json.dumps(summary, indent=1), f"({len(shifted)} shifted cases)")
    save(
        f"conformal-bins/{args.name}",
        {
            "run": str(run),
            "coverage": coverage,
            "repeats": args.repeats,
            "tilt": TILT,
            "validation": val,
            "verdict": verdict,
            "test_and_suite": summary,
            "cases": cases,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        STUDY_RESULTS,
    )


if __name__ == "__main__":
    main()
