"""Distances between feature sets: FID, KID, a classifier two-sample test, fit-and-score.

Pure functions of ``(n, d)`` float arrays, so they are tested on tiny Gaussians.
"""

from __future__ import annotations

from typing import cast

import numpy as np


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b``.

    With centred features X (n x d) and S = X'X / (n - 1), the eigenvalues of S1 S2 are the
    squared singular values of X1 X2' / sqrt((n1 - 1)(n2 - 1)), so the trace of sqrt(S1 S2) is
    that matrix's nuclear norm, computed on the QR factors of X1 and X2. The same value as
    ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid) without a d x d matrix square root: exact
    when the covariances are singular (fewer images than dimensions) and many times faster.
    """
    x1, x2 = a - a.mean(0), b - b.mean(0)
    c1, c2 = len(a) - 1, len(b) - 1
    r1, r2 = (cast(np.ndarray, np.linalg.qr(x, mode="r")) for x in (x1, x2))  # R factors only
    trace_covmean = np.linalg.svdvals(r1 @ r2.T).sum() / np.sqrt(c1 * c2)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + (x1**2).sum() / c1 + (x2**2).sum() / c2 - 2 * trace_covmean)


def kid(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 50, size: int = 500, seed: int = 0
) -> float:
    """Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel, mean over subsets."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        diag = np.trace(kxx) + np.trace(kyy)
        vals.append((kxx.sum() + kyy.sum() - diag) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def two_sample_accuracy(real: np.ndarray, synth: np.ndarray, seed: int = 0) -> float:
    """5-fold held-out accuracy of logistic regression telling real from synthetic (0.5 = not)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(real), len(synth))
    x = np.concatenate(
        [real[rng.permutation(len(real))[:n]], synth[rng.permutation(len(synth))[:n]]]
    )
    y = np.r_[np.zeros(n), np.ones(n)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=folds).mean())


def fit_score(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)).fit(xtr, ytr)
    pred = clf.predict(xte)
    return {
        "accuracy": float(accuracy_score(yte, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(yte, pred)),
    }
