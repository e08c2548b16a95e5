"""Classification metrics with honest uncertainty: point estimates, bootstrap CIs, calibration.

Conventions (chosen so a JSON report never hides an undefined number behind a fake zero):

* A per-class value that is 0/0 (recall or AUROC of a class absent from ``y_true``, precision
  of a class never predicted) is reported as ``None``, and macro averages skip it. For macro-F1
  this equals scikit-learn's default ``f1_score(y_true, y_pred, average="macro")``, which only
  averages over classes seen in ``y_true`` or ``y_pred``.
* Balanced accuracy averages recall over classes present in ``y_true`` (scikit-learn's rule),
  and each bootstrap resample does the same over the classes present *in that resample*.
  Dropping a resample that misses a rare class instead would bias the interval towards
  resamples rich in that class, so we keep every resample.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

# what a finished run's metrics.json says, below train so that prune and gan quote it too
from medxfer.runs import SHIFT_ALPHA as SHIFT_ALPHA
from medxfer.runs import SHIFT_MIN_GAP as SHIFT_MIN_GAP
from medxfer.runs import run_summary as run_summary
from medxfer.runs import split_shift

# float32 softmax outputs drift from 1 by ~1e-7; anything beyond this is not a probability row.
ROW_SUM_TOL = 1e-3


def _validate(
    y_true: np.ndarray, probs: np.ndarray, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels as int64, row-renormalised float64 probs)`` or raise ``ValueError``."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n_samples, n_classes), got shape {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} samples but probs has {len(p)} rows")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    k = p.shape[1]
    if n_classes is not None and k != n_classes:
        raise ValueError(f"probs has {k} columns but there are {n_classes} class names")
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {k}")
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true labels must lie in [0, {k - 1}], got [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    sums = p.sum(axis=1)
    if np.max(np.abs(sums - 1.0)) > ROW_SUM_TOL:
        raise ValueError("probs rows must sum to 1 (pass softmax outputs, not logits)")
    # Renormalise away float32 drift so scikit-learn's strict log_loss check stays quiet.
    return y, p / sums[:, None]


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def reliability_bins(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin ``(counts, accuracy, mean confidence)`` of the top-class confidence.

    ``n_bins`` equal-width bins on [0, 1], right-closed ``(lo, hi]`` (the first also takes 0),
    as in Guo et al. 2017. Empty bins report accuracy and confidence 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _validate(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, conf, side="left")
    counts = np.bincount(bins, minlength=n_bins)
    nonempty = counts > 0
    acc = np.bincount(bins, weights=correct, minlength=n_bins)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    np.divide(acc, counts, out=acc, where=nonempty)
    np.divide(mean_conf, counts, out=mean_conf, where=nonempty)
    return counts, acc, mean_conf


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.

    Bins as in :func:`reliability_bins`.
    """
    counts, acc, conf = reliability_bins(y_true, probs, n_bins)
    return float(np.sum(counts * np.abs(acc - conf)) / counts.sum())


def _bootstrap_stats(
    y: np.ndarray, correct: np.ndarray, n_classes: int, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and balanced accuracy for each row of resample indices ``idx`` (B, n)."""
    n_boot = idx.shape[0]
    hits = correct[idx]
    acc = hits.mean(axis=1)
    # One bincount over (resample, class) keys gives per-resample class totals and hits.
    keys = (np.arange(n_boot)[:, None] * n_classes + y[idx]).ravel()
    size = n_boot * n_classes
    totals = np.bincount(keys, minlength=size).reshape(n_boot, n_classes)
    tp = np.bincount(keys, weights=hits.ravel(), minlength=size).reshape(n_boot, n_classes)
    present = totals > 0
    recall = np.divide(tp, totals, out=np.zeros_like(tp), where=present)
    bal = recall.sum(axis=1) / present.sum(axis=1)  # every resample has >= 1 class present
    return acc, bal


def _checked(
    y_true: np.ndarray, preds: list[np.ndarray], n_classes: int, n_bootstrap: int,
    confidence: float,
) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    y = np.asarray(y_true, dtype=np.int64)
    out = [np.asarray(p, dtype=np.int64) for p in preds]
    if y.ndim != 1 or len(y) == 0 or any(p.shape != y.shape for p in out):
        raise ValueError("y_true and y_pred must be non-empty 1-D arrays of equal length")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true labels must lie in [0, {n_classes - 1}]")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return y, out


def _resampled(
    y: np.ndarray, preds: list[np.ndarray], n_classes: int, n_bootstrap: int, seed: int,
    chunk: int,
) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Accuracy and balanced accuracy of every prediction vector on the same resamples of the
    images (drawn in chunks of ``chunk`` to bound memory on big sets)."""
    rng = np.random.default_rng(seed)
    corrects = [(y == p).astype(np.float64) for p in preds]
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in preds]
    for start in range(0, n_bootstrap, chunk):
        idx = rng.integers(0, len(y), size=(min(chunk, n_bootstrap - start), len(y)))
        for part, correct in zip(parts, corrects, strict=True):
            part.append(_bootstrap_stats(y, correct, n_classes, idx))
    return [(np.concatenate([a for a, _ in part]), np.concatenate([b for _, b in part]))
            for part in parts]  # fmt: skip


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    return [float(v) for v in np.percentile(values, [tail, 100.0 - tail])]


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 250,
) -> dict[str, list[float]]:
    """Percentile-bootstrap CIs for accuracy and balanced accuracy, resampling samples.

    Returns ``{"accuracy": [lo, hi], "balanced_accuracy": [lo, hi]}``. Deterministic for a
    given ``seed``; resamples are drawn in chunks of ``chunk`` to bound memory on big sets.
    """
    y, preds = _checked(y_true, [y_pred], n_classes, n_bootstrap, confidence)
    [(acc, bal)] = _resampled(y, preds, n_classes, n_bootstrap, seed, chunk)
    return {"accuracy": _interval(acc, confidence),
            "balanced_accuracy": _interval(bal, confidence)}  # fmt: skip


def paired_bootstrap_difference(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n_classes: int,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 250,
) -> dict[str, Any]:
    """B minus A on the same images: the differences of accuracy and balanced accuracy, each
    with a paired percentile-bootstrap interval (both scored on every resample of the images).

    Balanced accuracy skips classes absent from a resample, as everywhere in medxfer.
    """
    y, (a, b) = _checked(y_true, [pred_a, pred_b], n_classes, n_bootstrap, confidence)
    (acc_a, bal_a), (acc_b, bal_b) = _resampled(y, [a, b], n_classes, n_bootstrap, seed, chunk)
    return {
        "accuracy_difference": float((b == y).mean() - (a == y).mean()),
        "accuracy_difference_ci95": _interval(acc_b - acc_a, confidence),
        "balanced_accuracy_difference": _balanced_accuracy(y, b) - _balanced_accuracy(y, a),
        "balanced_accuracy_difference_ci95": _interval(bal_b - bal_a, confidence),
        "n_bootstrap": n_bootstrap,
    }


def _auroc_per_class(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC per class; ``None`` where the class is absent or is every sample."""
    out: list[float | None] = []
    for k in range(p.shape[1]):
        positives = y == k
        if positives.all() or not positives.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(positives, p[:, k])))
    return out


def _per_class(
    y: np.ndarray, pred: np.ndarray, p: np.ndarray, class_names: list[str]
) -> dict[str, dict[str, Any]]:
    labels = list(range(len(class_names)))
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan
    )
    auroc = _auroc_per_class(y, p)
    return {
        name: {
            "precision": _none_if_nan(prec[k]),
            "recall": _none_if_nan(rec[k]),
            "f1": _none_if_nan(f1[k]),
            "support": int(support[k]),
            "auroc": auroc[k],
        }
        for k, name in enumerate(class_names)
    }


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # scikit-learn warns when a predicted class is absent from y_true; skipping such classes
    # is our documented rule, so the warning is noise in every report of a small test split.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """All evaluation metrics for one split as a JSON-serialisable dict (see module docstring)."""
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be unique, got {class_names}")
    y, p = _validate(y_true, probs, n_classes=len(class_names))
    k = len(class_names)
    pred = p.argmax(axis=1)
    per_class = _per_class(y, pred, p, class_names)
    return {
        "n": len(y),
        "class_names": list(class_names),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "macro_f1": _mean_defined([c["f1"] for c in per_class.values()]),
        "auroc_macro_ovr": _mean_defined([c["auroc"] for c in per_class.values()]),
        "log_loss": float(log_loss(y, p, labels=list(range(k)))),
        "ece": expected_calibration_error(y, p, n_bins=ece_bins),
        "per_class": per_class,
        "per_class_recall": {name: c["recall"] for name, c in per_class.items()},
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
        "ci95": bootstrap_ci(y, pred, k, n_bootstrap=n_bootstrap, seed=seed),
        "n_bootstrap": n_bootstrap,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def format_summary(metrics: dict[str, Any]) -> str:
    """One line for humans, e.g. ``acc 0.912 [0.897, 0.927] · bal-acc 0.905 [...] · ...``."""
    ci = metrics.get("ci95") or {}
    parts = [
        f"acc {_fmt(metrics.get('accuracy'))}{_fmt_ci(ci.get('accuracy'))}",
        f"bal-acc {_fmt(metrics.get('balanced_accuracy'))}{_fmt_ci(ci.get('balanced_accuracy'))}",
        f"macro-F1 {_fmt(metrics.get('macro_f1'))}",
        f"AUROC {_fmt(metrics.get('auroc_macro_ovr'))}",
        f"ECE {_fmt(metrics.get('ece'))}",
    ]
    return " · ".join(parts)


def shift_warnings(val: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """One sentence per class that ``split_shift`` flags, for a command's console output."""
    return [
        f"class {c['class']!r}: recall {c['val_recall']:.3f} on validation, "
        f"{c['test_recall']:.3f} on test (p = {c['p_value']:.1g}): the test split does not look "
        "like validation for this class; validation-based choices may not carry over"
        for c in split_shift(val, test)
        if c["shifted"]
    ]


def by_near_copy(
    has_copy: np.ndarray, labels: np.ndarray, probs: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Accuracy apart for the images that have a near copy among the training images and for
    the rest, each with a 95% Wilson interval: the rest is the closer estimate for images from
    elsewhere, since a near copy of a training image is in effect seen."""
    from scipy.stats import binomtest

    right = probs.argmax(1) == labels

    def part(mask: np.ndarray) -> dict[str, Any]:
        n, k = int(mask.sum()), int(right[mask].sum())
        if n == 0:
            return {"images": 0, "accuracy": None, "ci95": None}
        ci = binomtest(k, n).proportion_ci(method="wilson")
        return {"images": n, "accuracy": round(k / n, 4),
                "ci95": [round(float(ci.low), 4), round(float(ci.high), 4)]}  # fmt: skip

    return {
        "threshold": threshold,
        "share_with_a_near_copy": round(float(has_copy.mean()), 4) if len(has_copy) else None,
        "with_a_near_copy": part(has_copy),
        "without": part(~has_copy),
    }


def format_near_copies(r: dict[str, Any]) -> str:
    """One line: how many test images have a near copy in training, and accuracy apart."""
    w, o = r["with_a_near_copy"], r["without"]
    return (
        f"{w['images']} of {w['images'] + o['images']} test images have a near copy among the "
        f"training images (accuracy {_fmt(w['accuracy'])}); on the other {o['images']}: "
        f"{_fmt(o['accuracy'])}{_fmt_ci(o['ci95'])}"
    )
