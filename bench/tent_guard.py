"""The constant of the label-shift guard of `medxfer adapt`, chosen on validation outputs.

    python bench/tent_guard.py RUN [RUN ...] [--draws 500]

The guard (``medxfer.evaluate.tent.label_shift_guard``) fires when the effective number of
classes of the adapted predictions on the new images, exp(entropy of the predicted class mix),
is below a constant times that of validation's predictions. Where it should stay quiet and
where it should fire is measured here on each run's stored validation outputs
(``val_predictions.npz``; no official test split), resampled as new "sites" of ``n`` images:

- ``same_mix``: drawn from validation as it is (no label shift: only sampling noise);
- ``balanced``: every class equally often;
- ``shift_85_<class>``: 85% of one class, the rest shared equally (a strong label shift);
- ``single_<class>``: one class only.

The images of each class are validation's, so these are pure label shifts of a model that
behaves at the site as it did on validation (the case the guard is for); a collapse caused by
adaptation itself (TENT making one class win everywhere) lowers the ratio further, and is
tested in tests/test_tent.py. Per case and ``n``: the share of draws where the guard fires at
each candidate constant. Writes bench/results/tent-guard/demo.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from _common import abspath, save

from medxfer.evaluate.tent import label_shift_guard
from medxfer.evaluate.unlabelled import STORED

CANDIDATES = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
SIZES = (50, 160, 500)


def cases(labels: np.ndarray, k: int) -> dict[str, np.ndarray | None]:
    """Class mixes to draw from; None = validation's own images as they are."""
    out: dict[str, np.ndarray | None] = {"same_mix": None, "balanced": np.full(k, 1 / k)}
    for j in range(k):
        if (labels == j).any():
            mix = np.full(k, 0.15 / (k - 1))
            mix[j] = 0.85
            out[f"shift_85_{j}"] = mix
            out[f"single_{j}"] = np.eye(k)[j]
    return out


def draw(rng: np.random.Generator, labels: np.ndarray, mix: np.ndarray | None, n: int
         ) -> np.ndarray:  # fmt: skip
    if mix is None:
        return rng.choice(len(labels), n)
    counts = rng.multinomial(n, mix)
    return np.concatenate([rng.choice(np.flatnonzero(labels == j), c)
                           for j, c in enumerate(counts) if c])  # fmt: skip


def study(run: str, draws: int) -> dict[str, Any]:
    with np.load(abspath(run) / STORED) as saved:
        probs, labels = saved["probs"], saved["labels"]
    k = probs.shape[1]
    pred = probs.argmax(1)
    rng = np.random.default_rng(0)
    table: dict[str, dict[str, Any]] = {}
    for name, mix in cases(labels, k).items():
        for n in SIZES:
            ratios = np.array([
                label_shift_guard(pred[draw(rng, labels, mix, n)], pred, k,
                                  reference="validation")["ratio"]
                for _ in range(draws)
            ])  # fmt: skip
            table[f"{name}/n={n}"] = {
                "ratio_median": float(np.median(ratios)),
                "ratio_p01": float(np.quantile(ratios, 0.01)),
                "fired": {str(c): float((ratios < c).mean()) for c in CANDIDATES},
            }
    eff = label_shift_guard(pred, pred, k, reference="validation")["effective_classes_reference"]
    acc = float((pred == labels).mean())
    return {"run": run, "classes": k, "n_validation": len(labels), "validation_accuracy": acc,
            "validation_effective_classes": eff, "cases": table}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders holding " + STORED)
    ap.add_argument("--draws", type=int, default=500)
    args = ap.parse_args()
    results = [study(r, args.draws) for r in args.runs]
    for res in results:
        print(res["run"], f"validation effective classes {res['validation_effective_classes']:.2f}")
        for case, row in res["cases"].items():
            print(f"  {case:22s} median ratio {row['ratio_median']:.2f}  fired at 0.75: "
                  f"{row['fired']['0.75']:.2f}")  # fmt: skip
    save("tent-guard/demo", {"draws": args.draws, "sizes": list(SIZES), "runs": results})


if __name__ == "__main__":
    main()
