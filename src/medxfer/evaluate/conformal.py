"""Split-conformal prediction sets (crepes) calibrated on the validation split.

The nonconformity score is LAC's ``1 - p(class)`` (crepes' ``hinge``). A class enters an
image's set when its p-value, against the validation images' scores for their true class, is at
least ``1 - coverage``: then the set holds the true class with probability >= ``coverage`` for
images exchangeable with validation. Class-conditional (Mondrian) calibration compares a
candidate class only with validation images of that class, so the guarantee holds per class.
P-values are unsmoothed, so sets are deterministic. A set is never empty: where LAC rules out
every class, the predicted class stays in it (coverage can only rise).
"""

from __future__ import annotations

import math

import numpy as np


def calibration_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LAC nonconformity of each calibration image's true class: ``1 - p(true class)``."""
    from crepes.extras import hinge

    return np.asarray(hinge(probs, np.arange(probs.shape[1]), labels), np.float64)


def prediction_sets(
    cal_scores: np.ndarray,
    cal_labels: np.ndarray,
    probs: np.ndarray,
    coverage: float,
    class_conditional: bool = False,
) -> np.ndarray:
    """Boolean (N, C): which classes are in each image's conformal set."""
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    alphas = np.asarray(hinge(probs), np.float64)  # (N, C): 1 - p for every class
    if not class_conditional:
        cc = ConformalClassifier().fit(cal_scores)
        sets = np.asarray(cc.predict_set(alphas, confidence=coverage, smoothing=False), bool)
    else:
        cc = ConformalClassifier().fit(cal_scores, bins=np.asarray(cal_labels))
        sets = np.zeros(probs.shape, bool)
        for c in range(probs.shape[1]):
            col = alphas[:, [c]]
            got = cc.predict_set(col, bins=np.full(len(col), c), confidence=coverage,
                                 smoothing=False)  # fmt: skip
            sets[:, c] = np.asarray(got, bool)[:, 0]
    # LAC leaves a set empty when no class is plausible enough (a model more accurate than
    # the coverage asks); the predicted class is put in it, which can only raise coverage.
    empty = ~sets.any(1)
    sets[empty, probs[empty].argmax(1)] = True
    return sets


def thresholds(
    cal_scores: np.ndarray, cal_labels: np.ndarray, n_classes: int, coverage: float,
    class_conditional: bool = False,
) -> list[float]:  # fmt: skip
    """The largest ``1 - p`` a class may have and still enter the set (one value, or one per
    class when class-conditional): the ceil((n + 1) coverage)-th smallest calibration score,
    inf when there are too few calibration images for that coverage. For reading only: the
    sets themselves come from crepes."""
    groups = (
        [cal_scores[cal_labels == c] for c in range(n_classes)]
        if class_conditional
        else [cal_scores]
    )
    out = []
    for g in groups:
        rank = math.ceil((len(g) + 1) * coverage)
        out.append(float(np.sort(g)[rank - 1]) if rank <= len(g) else math.inf)
    return out


def coverage_report(sets: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, object]:
    """Coverage (overall and per class) and mean set size of ``sets`` on labelled images."""
    hit = sets[np.arange(len(labels)), labels]
    per_class = {
        name: (float(hit[labels == c].mean()) if (labels == c).any() else None)
        for c, name in enumerate(classes)
    }
    return {
        "coverage": float(hit.mean()),
        "coverage_per_class": per_class,
        "mean_set_size": float(sets.sum(1).mean()),
        "singletons": float((sets.sum(1) == 1).mean()),
    }
