"""The augmentation policies under the shift suite's covariate shifts, on validation images only.

    python studies/policy_shifts.py RUN [RUN ...] --name N [--threads T] [--boot B]

`bench/trust.py` measures what `augment.policy: robust` buys under strong appearance shifts on
the official test split, where nothing may be chosen. The policy itself is chosen on
validation (docs/augmentation.md), from clean accuracy alone. This study gives that choice the
rest of the picture without reading a test image: each run's own validation images (split
exactly as its training split them) under the nine covariate shifts of
``medxfer.evaluate.shifts`` at severities 1 to 3, the same functions and seed as the suite.

Unlike the suite, the shifts act on the images at the model's input size (the decode cache),
not at the source resolution: blur, noise, JPEG and resolution loss are therefore somewhat
stronger relative to the anatomy here, and the numbers are not the suite's.

Reported per run: clean accuracy and accuracy under every shift and severity, and the mean over
the nine shifts at each severity. Given runs of both policies on the same split (the same
validation images, checked), each robust run is paired with each standard run: the differences
per shift, the clean difference and the mean severity-3 gain, each with a paired bootstrap
interval over validation images (``--boot`` resamples). Writes
studies/results/policy-shifts/<name>.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # trust_tta

from _common import STUDY_RESULTS, abspath, save
from trust_tta import study_args

from medxfer.config import load_config
from medxfer.evaluate.predict import folded_for_inference, probs_of_arrays
from medxfer.evaluate.shifts import SHIFTS, apply_shift
from medxfer.evaluate.trust_run import run_split_arrays

SEVERITIES = (1, 2, 3)


def correct_under_shifts(folder: Path) -> dict[str, Any]:
    """Per-image correctness (bool arrays) of the run on its validation images, clean and
    under every shift and severity, and the labels (to check that paired runs share them)."""
    model, meta, arrays = run_split_arrays(folder, ("val",))
    model, _ = folded_for_inference(model.eval(), meta)
    images, labels = arrays["val"]
    hits: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        hits["clean"] = probs_of_arrays(model, meta, images).argmax(1) == labels
        for shift in SHIFTS:
            for sev in SEVERITIES:
                shifted = apply_shift(images, shift, sev, seed=0)
                hits[f"{shift}-{sev}"] = probs_of_arrays(model, meta, shifted).argmax(1) == labels
    return {"run": str(folder), "policy": load_config(folder / "config.yaml").augment.policy,
            "labels": labels, "hits": hits}  # fmt: skip


def severity_mean(hits: dict[str, np.ndarray], sev: int) -> np.ndarray:
    """Per image: the share of the nine shifts at ``sev`` under which it is classified right."""
    return np.mean([hits[f"{s}-{sev}"] for s in SHIFTS], axis=0)


def summary(r: dict[str, Any]) -> dict[str, Any]:
    hits = r["hits"]
    return {
        "run": r["run"],
        "policy": r["policy"],
        "images": len(r["labels"]),
        "accuracy": {k: round(float(v.mean()), 4) for k, v in hits.items()},
        "mean_by_severity": {
            str(sev): round(float(severity_mean(hits, sev).mean()), 4) for sev in SEVERITIES
        },
    }


def paired(robust: dict[str, Any], standard: dict[str, Any], boot: int) -> dict[str, Any]:
    """Robust minus standard, in points, with 95% paired bootstrap intervals over images."""
    if not np.array_equal(robust["labels"], standard["labels"]):
        raise SystemExit(f"{robust['run']} and {standard['run']} have other validation images")
    rng = np.random.default_rng(0)
    n = len(robust["labels"])
    idx = rng.integers(0, n, size=(boot, n))

    def diff(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        d = a.astype(np.float64) - b.astype(np.float64)
        lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
        return {"points": round(100 * float(d.mean()), 2),
                "ci95": [round(100 * float(lo), 2), round(100 * float(hi), 2)]}  # fmt: skip

    rh, sh = robust["hits"], standard["hits"]
    return {
        "robust": robust["run"],
        "standard": standard["run"],
        "clean": diff(rh["clean"], sh["clean"]),
        "severity3_mean_gain": diff(severity_mean(rh, 3), severity_mean(sh, 3)),
        "per_case": {k: round(100 * float(rh[k].mean() - sh[k].mean()), 2) for k in rh},
    }


def main() -> None:
    args = study_args(__doc__)
    t0 = time.perf_counter()
    rows = []
    for r in args.runs:
        rows.append(correct_under_shifts(abspath(r)))
        s = summary(rows[-1])
        print(f"{s['run']} ({s['policy']}): clean {s['accuracy']['clean']}, mean by severity "
              f"{s['mean_by_severity']}", flush=True)  # fmt: skip
    pairs = [
        paired(a, b, args.boot)
        for a in rows if a["policy"] == "robust"
        for b in rows if b["policy"] == "standard"
    ]  # fmt: skip
    for p in pairs:
        print(f"robust - standard: clean {p['clean']}, severity-3 mean {p['severity3_mean_gain']}")
    save(f"policy-shifts/{args.name}",
         {"source": "validation images at the model's input size", "shift_seed": 0,
          "runs": [summary(r) for r in rows], "pairs": pairs,
          "seconds": round(time.perf_counter() - t0, 1)}, STUDY_RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()
