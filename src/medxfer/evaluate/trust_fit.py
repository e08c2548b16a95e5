"""Choices made on validation only: the default detector, the failure score and the thresholds.

* The ``unfamiliar`` detector is the feature distance (Mahalanobis, kNN, ViM) that best tells
  validation images from shifted copies of themselves (uniform noise, inverted intensities,
  blur, resolution loss): mean AUROC over those proxies, ties to the earlier in ``DISTANCES``.
* The failure score combines confidence (MSP) with that distance, either as the mean of their
  percentiles among validation images (``rank_mean``) or as a logistic regression of the error
  on both (``logistic``, measured cross-fitted on validation, then refitted on all of it); the
  one with the lower validation AUGRC is kept. MSP alone is measured beside them for reference.
* Thresholds: ``ood_share`` of the rejection budget ``1 - acceptance`` goes to ``unfamiliar``
  (a validation quantile of the distance), the rest to ``review`` (a threshold on the failure
  score among familiar validation images), so that ``acceptance`` of validation ends ``ok``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medxfer.evaluate.selective import augrc, ood_auroc_fpr95
from medxfer.evaluate.trust_detectors import DETECTORS, DISTANCES

MIN_ERRORS_FOR_LOGISTIC = 10  # fewer validation errors: a 2-feature fit is noise, rank_mean only


def choose_detector(
    val: dict[str, np.ndarray], proxies: dict[str, dict[str, np.ndarray]]
) -> tuple[str, dict[str, Any]]:
    """The distance detector with the best mean AUROC, validation against each proxy shift,
    and the table of every detector's AUROC / FPR@95 per proxy."""
    table: dict[str, dict[str, Any]] = {}
    for name in DETECTORS:
        per = {p: ood_auroc_fpr95(val[name], s[name]) for p, s in proxies.items()}
        table[name] = {
            "auroc": {p: round(a, 4) for p, (a, _) in per.items()},
            "fpr95": {p: round(f, 4) for p, (_, f) in per.items()},
            "mean_auroc": round(float(np.mean([a for a, _ in per.values()])), 4),
        }
    best = max(DISTANCES, key=lambda n: (table[n]["mean_auroc"], -DISTANCES.index(n)))
    return best, table


def percentile(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of ``reference`` (sorted) at or below each value."""
    return np.searchsorted(reference, values, side="right") / max(len(reference), 1)


def failure_score(params: dict[str, Any], msp: np.ndarray, dist: np.ndarray,
                  refs: dict[str, np.ndarray]) -> np.ndarray:  # fmt: skip
    """P(error)-like score, higher = more likely wrong, from ``params`` (``fit_failure``)."""
    if params["method"] == "rank_mean":
        return 0.5 * (percentile(refs["ref_msp"], msp) + percentile(refs["ref_dist"], dist))
    x = _standard(params, msp, dist)
    z = x @ np.asarray(params["coef"]) + float(params["intercept"])
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def _standard(params: dict[str, Any], msp: np.ndarray, dist: np.ndarray) -> np.ndarray:
    x = np.stack([msp, dist], axis=1)
    return (x - np.asarray(params["mean"])) / np.asarray(params["std"])


def _logistic(msp: np.ndarray, dist: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    x = np.stack([msp, dist], axis=1)
    params: dict[str, Any] = {"method": "logistic", "mean": x.mean(0).tolist(),
                              "std": np.clip(x.std(0), 1e-12, None).tolist()}  # fmt: skip
    lr = LogisticRegression().fit(_standard(params, msp, dist), wrong)
    return params | {"coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])}


def fit_failure(
    msp: np.ndarray, dist: np.ndarray, correct: np.ndarray, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The failure score's parameters, and the validation measurements that chose it."""
    from sklearn.model_selection import StratifiedKFold

    wrong = ~correct.astype(bool)
    refs = {"ref_msp": np.sort(msp), "ref_dist": np.sort(dist)}
    rank = {"method": "rank_mean"}
    measured: dict[str, Any] = {
        "msp_augrc": augrc(correct, -msp),
        "rank_mean_augrc": augrc(correct, -failure_score(rank, msp, dist, refs)),
        "validation_errors": int(wrong.sum()),
    }
    if min(int(wrong.sum()), int((~wrong).sum())) < MIN_ERRORS_FOR_LOGISTIC:
        measured["logistic"] = (
            f"not tried: fewer than {MIN_ERRORS_FOR_LOGISTIC} validation errors (or correct "
            "predictions) to fit it on"
        )
        return rank, measured | {"chosen": "rank_mean"}
    crossfit = np.zeros(len(msp))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    for fit_idx, out_idx in folds.split(msp, wrong):
        p = _logistic(msp[fit_idx], dist[fit_idx], wrong[fit_idx])
        crossfit[out_idx] = failure_score(p, msp[out_idx], dist[out_idx], refs)
    measured["logistic_crossfit_augrc"] = augrc(correct, -crossfit)
    if measured["logistic_crossfit_augrc"] < measured["rank_mean_augrc"]:
        return _logistic(msp, dist, wrong), measured | {"chosen": "logistic"}
    return rank, measured | {"chosen": "rank_mean"}


def upper_quantile(values: np.ndarray, q: float) -> float:
    """The smallest value with at least ``q`` of ``values`` at or below it."""
    s = np.sort(values)
    return float(s[min(len(s), max(1, math.ceil(q * len(s)))) - 1])


def thresholds(
    ood: np.ndarray, failure: np.ndarray, acceptance: float, ood_share: float
) -> tuple[float, float]:
    """(unfamiliar threshold on ``ood``, review threshold on ``failure``) such that
    ``1 - ood_share * (1 - acceptance)`` of validation is familiar and ``acceptance`` ends ok."""
    t_ood = upper_quantile(ood, 1.0 - ood_share * (1.0 - acceptance))
    familiar = failure[ood <= t_ood]
    n_ok = max(1, math.ceil(acceptance * len(ood)))
    if n_ok >= len(familiar):
        return t_ood, math.inf
    return t_ood, float(np.sort(familiar)[n_ok - 1])


def flags(ood: np.ndarray, failure: np.ndarray, t_ood: float, t_review: float) -> np.ndarray:
    """``unfamiliar`` beyond the distance threshold, else ``review`` beyond the failure one."""
    return np.where(ood > t_ood, "unfamiliar", np.where(failure > t_review, "review", "ok"))
