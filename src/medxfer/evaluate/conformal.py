"""Split-conformal prediction sets (crepes) calibrated on the validation split.

Two nonconformity scores (``trust.conformal_score``): LAC's ``1 - p(class)`` (crepes'
``hinge``; the smallest sets), and APS's (adaptive prediction sets, Romano et al. 2020, without
randomisation): the probability mass of the classes ranked above the class plus its own. Under
a shift that flattens the softmax, LAC lets fewer classes in, APS more. A class enters an
image's set when its p-value, against the validation images' scores for their true class, is at
least ``1 - coverage``: then the set holds the true class with probability >= ``coverage`` for
images exchangeable with validation. Class-conditional (Mondrian) calibration compares a
candidate class only with validation images of that class, so the guarantee holds per class.
P-values are unsmoothed, so sets are deterministic.

A set may be empty: no class is plausible enough at that coverage (for an accurate model, the
images least like any class). Filling empty sets with the predicted class would break the
upper half of the guarantee: coverage then never falls below accuracy, so a model more accurate
than the coverage asks over-covers. ``validation_crossfit`` measures both rules on the
validation split only (calibrate on one half, count on the other), and the trust step records
it.
"""

from __future__ import annotations

import math

import numpy as np

SCORES = ("lac", "aps")


def nonconformity(probs: np.ndarray, score: str = "lac") -> np.ndarray:
    """(N, C) nonconformity of every class of every image: LAC ``1 - p`` (crepes' ``hinge``) or
    APS, the mass of the classes ranked above the class plus its own (ties: lower index
    first)."""
    if score == "lac":
        from crepes.extras import hinge

        return np.asarray(hinge(probs), np.float64)
    if score != "aps":
        raise ValueError(f"unknown conformal score {score!r}: {', '.join(SCORES)}")
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs.astype(np.float64), order, axis=1)
    out = np.empty(probs.shape, np.float64)
    np.put_along_axis(out, order, np.cumsum(ranked, axis=1), axis=1)
    return out


def calibration_scores(probs: np.ndarray, labels: np.ndarray, score: str = "lac") -> np.ndarray:
    """Nonconformity of each calibration image's true class (LAC: ``1 - p(true class)``)."""
    labels = np.asarray(labels)
    return np.asarray(nonconformity(probs, score)[np.arange(len(labels)), labels], np.float64)


def prediction_sets(
    cal_scores: np.ndarray,
    cal_labels: np.ndarray,
    probs: np.ndarray,
    coverage: float,
    class_conditional: bool = False,
    never_empty: bool = False,
    score: str = "lac",
) -> np.ndarray:
    """Boolean (N, C): which classes are in each image's conformal set (``never_empty``: put
    the predicted class into an empty set, for comparison only); ``cal_scores`` are
    ``calibration_scores`` with the same ``score``."""
    from crepes import ConformalClassifier

    alphas = nonconformity(probs, score)  # (N, C)
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
    if never_empty:
        empty = ~sets.any(1)
        sets[empty, probs[empty].argmax(1)] = True
    return sets


def validation_crossfit(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    class_conditional: bool = False,
    repeats: int = 20,
    seed: int = 0,
    score: str = "lac",
) -> dict[str, dict[str, float]]:
    """Coverage, mean set size and empty fraction of the standard sets and of never-empty sets,
    each calibrated on a random half of the (validation) images and counted on the other half,
    averaged over ``repeats`` splits."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict[str, float]]] = {"standard": [], "never_empty": []}
    for _ in range(repeats):
        perm = rng.permutation(len(labels))
        cal, held = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        scores = calibration_scores(probs[cal], labels[cal], score)
        for name in out:
            sets = prediction_sets(scores, labels[cal], probs[held], coverage, class_conditional,
                                   never_empty=name == "never_empty", score=score)  # fmt: skip
            hit = sets[np.arange(len(held)), labels[held]]
            out[name].append({"coverage": float(hit.mean()),
                              "mean_set_size": float(sets.sum(1).mean()),
                              "empty": float((~sets.any(1)).mean())})  # fmt: skip
    return {
        name: {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
        for name, rows in out.items()
    }


def thresholds(
    cal_scores: np.ndarray, cal_labels: np.ndarray, n_classes: int, coverage: float,
    class_conditional: bool = False,
) -> list[float]:  # fmt: skip
    """The largest nonconformity (LAC: ``1 - p``) a class may have and still enter the set (one
    value, or one per class when class-conditional): the ceil((n + 1) coverage)-th smallest
    calibration score, inf when there are too few calibration images for that coverage. For
    reading only: the sets themselves come from crepes."""
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
        "empty": float((~sets.any(1)).mean()),
        "singletons": float((sets.sum(1) == 1).mean()),
    }
