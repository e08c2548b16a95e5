"""Selective prediction: how good the predictions a model keeps are, as it refuses more.

A confidence ranks images; accepting the ``c`` most confident fraction gives a coverage ``c``
and a risk (error rate among the accepted). The risk–coverage curve summarises this; AURC is
its area, and AUGRC (Traub et al., 2024, "Overcoming common flaws in the evaluation of
selective classification systems") the area under the *generalized* risk, errors accepted / N,
which does not over-weight the few most confident images.
"""

from __future__ import annotations

import numpy as np


def _sorted_errors(correct: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Errors (1.0) ordered from most to least confident (ties broken by a stable sort)."""
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    if correct.shape != confidence.shape or correct.ndim != 1 or len(correct) == 0:
        raise ValueError("correct and confidence must be 1-D arrays of the same, non-zero length")
    order = np.argsort(-confidence, kind="stable")
    return (~correct[order]).astype(np.float64)


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``k / N`` and selective risk (error rate of the ``k`` most confident) for
    k = 1..N."""
    errors = _sorted_errors(correct, confidence)
    k = np.arange(1, len(errors) + 1)
    return k / len(errors), np.cumsum(errors) / k


def aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk–coverage curve: the mean selective risk over coverages k / N."""
    _, risk = risk_coverage(correct, confidence)
    return float(risk.mean())


def augrc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the generalized risk–coverage curve: the mean, over coverages k / N, of the
    errors among the ``k`` most confident divided by N (lower is better)."""
    errors = _sorted_errors(correct, confidence)
    return float((np.cumsum(errors) / len(errors)).mean())


def accepted_accuracy(correct: np.ndarray, accepted: np.ndarray) -> float | None:
    """Accuracy among the accepted images (None when none is accepted)."""
    accepted = np.asarray(accepted, dtype=bool)
    if not accepted.any():
        return None
    return float(np.asarray(correct, dtype=bool)[accepted].mean())


def coverage(accepted: np.ndarray) -> float:
    """Fraction of images accepted."""
    return float(np.asarray(accepted, dtype=bool).mean())


def errors_flagged(correct: np.ndarray, accepted: np.ndarray) -> float | None:
    """Fraction of the errors that were not accepted (None when there is no error)."""
    wrong = ~np.asarray(correct, dtype=bool)
    if not wrong.any():
        return None
    return float((~np.asarray(accepted, dtype=bool))[wrong].mean())


def ood_auroc_fpr95(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[float, float]:
    """AUROC of telling ``scores_out`` (positives, higher = more unusual) from ``scores_in``,
    and the false-positive rate on in-distribution images at 95% true-positive rate."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s_in, s_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError("both score arrays need at least one value")
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def curve_points(
    correct: np.ndarray, confidence: np.ndarray, n: int = 21
) -> dict[str, list[float]]:
    """The risk–coverage curve at ``n`` evenly spaced coverages (for metrics.json, figures)."""
    cov, risk = risk_coverage(correct, confidence)
    idx = np.unique(np.clip(np.round(np.linspace(0, 1, n) * len(cov)).astype(int) - 1, 0, None))
    return {"coverage": cov[idx].round(4).tolist(), "risk": risk[idx].round(4).tolist()}
