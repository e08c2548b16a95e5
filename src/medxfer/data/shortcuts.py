"""Can the label be told from image statistics that say little about anatomy?

Datasets assembled from several sources often give each class its own source: its own scanner,
export software, framing and file format. A network then has an easier cue than the finding:
how bright the image is, how much black border it has, how it was compressed. It scores well on
a test split drawn from the same sources and fails at a hospital whose images differ in that
cue, with no warning. (Known examples: hospital tokens and portable-scanner markers in chest
X-rays, Zech et al. 2018; the public brain tumour MRI sets, whose classes come from different
collections.)

This check describes every image by a few global numbers (``CUES``): its size and aspect, the
box and share of its non-background pixels, the file's bytes per pixel, and its intensity
statistics. A gradient-boosted classifier (scikit-learn) learns the label from them alone, in
stratified 5-fold cross-validation on the training images (grouped by patient when patients are
known), and its balanced accuracy is compared with chance; when it is flagged, each group of
cues is scored alone to say which one carries it. Where the dataset has a test split,
the same classifier fitted on all training images is also scored there: a high score says the
test split shares the cue, so a test score cannot reveal a model that leans on it.

A high score is a reason to look, not a proof: global intensity does carry some anatomy (a
large opacity brightens a chest X-ray). It is strongest as evidence when the finding is small
and the score is high anyway.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

# name -> group; the order is the order of the vector ``cues`` returns
CUES: dict[str, str] = {
    "log_width": "framing",
    "log_height": "framing",
    "aspect": "framing",
    "foreground_fraction": "framing",
    "foreground_box_height": "framing",
    "foreground_box_width": "framing",
    "bytes_per_pixel": "file",
    "mean": "intensity",
    "std": "intensity",
    "p01": "intensity",
    "p50": "intensity",
    "p99": "intensity",
    "foreground_mean": "intensity",
    "foreground_std": "intensity",
    "at_minimum": "intensity",
    "at_maximum": "intensity",
}
GROUPS = ("framing", "file", "intensity")
FOLDS = 5
MAX_IMAGES = 20_000  # more training images: a stratified, seeded sample of this many is used
MIN_PER_CLASS = 2 * FOLDS  # fewer training images in a class: the check is not run
# flagged when the balanced accuracy closes this share of the gap between chance and 1
FLAG_LIFT = 0.5


def foreground(img: np.ndarray) -> np.ndarray:
    """Boolean mask of ``img``'s foreground: above 5% of its range over its darkest value
    (black borders and air are background). All background when the image is flat."""
    lo, hi = float(img.min()), float(img.max())
    return img > lo + 0.05 * (hi - lo) if hi > lo else np.zeros(img.shape, bool)


def foreground_box(fg: np.ndarray) -> tuple[int, int, int, int] | None:
    """Rows and columns ``(start, stop, start, stop)`` of the bounding box of mask ``fg``, or
    None when it is empty."""
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def cues(arr: np.ndarray, path: str) -> np.ndarray:
    """The ``CUES`` of one decoded image (uint8, (H, W) or (H, W, 3)) read from ``path``."""
    gray = np.round(arr.mean(axis=2)).astype(np.uint8) if arr.ndim == 3 else arr
    g = gray.astype(np.float32) / 255.0
    h, w = g.shape
    lo, hi = float(g.min()), float(g.max())
    fg = foreground(g)
    box = foreground_box(fg)
    box_h, box_w = ((box[1] - box[0]) / h, (box[3] - box[2]) / w) if box else (0.0, 0.0)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    cumulative = np.cumsum(np.bincount(gray.ravel(), minlength=256)) / gray.size
    p01, p50, p99 = np.searchsorted(cumulative, [0.01, 0.5, 0.99]) / 255.0
    fg_vals = g[fg]
    return np.array(
        [math.log(w), math.log(h), h / w, fg.mean(), box_h, box_w, size / (h * w),
         g.mean(), g.std(), p01, p50, p99,
         fg_vals.mean() if fg_vals.size else 0.0, fg_vals.std() if fg_vals.size else 0.0,
         (g <= lo).mean(), (g >= hi).mean()],
        np.float32,
    )  # fmt: skip


def cue_classifier(n: int) -> Any:
    """Gradient-boosted trees for ``n`` training images (smaller leaves for small sets)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    leaf = min(20, max(2, n // 20))
    return HistGradientBoostingClassifier(max_iter=50, min_samples_leaf=leaf, random_state=0)


def _cv_predict(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict

    if groups is not None:
        cv: Any = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=0)
        return np.asarray(cross_val_predict(cue_classifier(len(y)), x, y, cv=cv, groups=groups))
    cv = StratifiedKFold(FOLDS, shuffle=True, random_state=0)
    return np.asarray(cross_val_predict(cue_classifier(len(y)), x, y, cv=cv))


def _recall(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    return {c: round(float((pred[y == i] == i).mean()), 4) if (y == i).any() else None
            for i, c in enumerate(classes)}  # fmt: skip


def shortcut_check(
    labels: list[str],
    splits: list[str],
    vectors: np.ndarray,
    patients: list[str] | None = None,
) -> dict[str, Any]:
    """How well ``vectors`` (one ``cues`` row per readable image) tell ``labels`` apart: on the
    training images (split ``train`` or unassigned) by cross-validation, and on the test split
    by a classifier fitted on all of them. JSON-able; ``checked`` false says why not."""
    from sklearn.metrics import balanced_accuracy_score

    train = np.array([s in ("train", "") for s in splits], bool)
    if train.sum() > MAX_IMAGES:
        from sklearn.model_selection import train_test_split

        rows = np.flatnonzero(train)
        keep, _ = train_test_split(rows, train_size=MAX_IMAGES, random_state=0,
                                   stratify=[labels[i] for i in rows])  # fmt: skip
        train = np.zeros_like(train)
        train[keep] = True
    test = np.array([s == "test" for s in splits], bool)
    classes = sorted({lab for lab, t in zip(labels, train, strict=True) if t})
    counts = {c: sum(1 for lab, t in zip(labels, train, strict=True) if t and lab == c)
              for c in classes}  # fmt: skip
    if len(classes) < 2 or min(counts.values()) < MIN_PER_CLASS:
        why = f"needs two or more classes with {MIN_PER_CLASS}+ training images each"
        return {"checked": False, "why": why}
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(lab, -1) for lab in labels])
    x = np.nan_to_num(np.asarray(vectors, np.float32))
    groups = None
    if patients is not None and all(patients[i] for i in np.flatnonzero(train)):
        names = sorted({patients[i] for i in np.flatnonzero(train)})
        if len(names) >= FOLDS:
            lookup = {p: k for k, p in enumerate(names)}
            groups = np.array([lookup[patients[i]] for i in np.flatnonzero(train)])
    chance = 1.0 / len(classes)
    out: dict[str, Any] = {
        "checked": True,
        "images": int(train.sum()),
        "classes": classes,
        "folds": FOLDS,
        "grouped_by_patient": groups is not None,
        "chance": round(chance, 4),
        "cues": list(CUES),
    }
    pred = _cv_predict(x[train], y[train], groups)
    bacc = float(balanced_accuracy_score(y[train], pred))
    out["balanced_accuracy"] = round(bacc, 4)
    out["lift"] = round((bacc - chance) / (1.0 - chance), 4)
    out["flagged"] = out["lift"] >= FLAG_LIFT
    out["recall"] = _recall(y[train], pred, classes)
    out["by_group"] = None  # which cues carry it: measured only to explain a flag
    if out["flagged"]:
        out["by_group"] = {}
        for group in GROUPS:
            cols = [i for i, g in enumerate(CUES.values()) if g == group]
            p = _cv_predict(x[train][:, cols], y[train], groups)
            out["by_group"][group] = round(float(balanced_accuracy_score(y[train], p)), 4)
    known = test & (y >= 0)
    if known.sum() and len(set(y[known].tolist())) >= 2:
        model = cue_classifier(int(train.sum())).fit(x[train], y[train])
        tp = np.asarray(model.predict(x[known]))
        out["test"] = {
            "images": int(known.sum()),
            "balanced_accuracy": round(float(balanced_accuracy_score(y[known], tp)), 4),
            "recall": _recall(y[known], tp, classes),
        }
    return out
