"""The quality gate: which classes' synthetic images may enter training at all.

Computed on the training split only (never validation or test), per synthesised class:

    two-sample accuracy   held-out accuracy of a classifier telling real from synthetic
                          (EfficientNet-Lite features, see feature_variant):
                          at most TWO_SAMPLE_MAX
    TSTR / TRTR           the class's recall when the classifier learns that class from
                          synthetic images instead of real ones, over its recall with real
                          ones (fit on half the real training images, scored on the other
                          half): at least TSTR_RATIO_MIN
    FID ratio             FID(synthetic, real half A) / FID(real half B, real half A), the
                          same sample sizes: at most FID_RATIO_MAX (KID reported beside it)
    memorised             synthetic images that are near-copies of a training image: none

A near-copy: its pixel-correlation distance (1 - Pearson r, at the GAN's resolution) to the
nearest training image of its class is below half the 1st percentile of the same distance
between real training images and their nearest other training image (exact duplicates in the
data left out of that percentile). Every synthetic image is checked, not a subsample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medxfer.gan.distances import fid, kid, two_sample_accuracy

TWO_SAMPLE_MAX = 0.85
TSTR_RATIO_MIN = 0.75
FID_RATIO_MAX = 5.0
MEMORISED_MAX = 0
MIN_REAL = 20  # fewer real training images in a class: too few to judge, the class fails
MIN_SYNTHETIC = 10
COPY_QUANTILE = 0.01
COPY_FACTOR = 0.5
FALLBACKS = {
    "oversample": ["train.weighted_sampling=true"],
    "class_weight": ["train.class_weight=true"],
    "none": [],
}


def thresholds() -> dict[str, float]:
    return {
        "two_sample_accuracy_max": TWO_SAMPLE_MAX,
        "tstr_over_trtr_min": TSTR_RATIO_MIN,
        "fid_over_real_vs_real_max": FID_RATIO_MAX,
        "memorised_max": MEMORISED_MAX,
    }


def _unit_rows(images: torch.Tensor) -> np.ndarray:
    """uint8 images -> rows of zero mean and unit norm (dot product = Pearson r)."""
    x = images.reshape(len(images), -1).double().numpy()
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_distance(
    queries: torch.Tensor, reference: torch.Tensor, *, leave_one_out: bool = False
) -> np.ndarray:
    """1 - Pearson r of each query image to its nearest reference image (pixels)."""
    q, r = _unit_rows(queries), _unit_rows(reference)
    out = np.empty(len(q))
    for start in range(0, len(q), 512):
        sim = q[start : start + 512] @ r.T
        if leave_one_out:
            rows = np.arange(start, min(start + 512, len(q)))
            sim[rows - start, rows] = -np.inf
        out[start : start + 512] = 1.0 - sim.max(1)
    return out


def memorisation(real: torch.Tensor, synth: torch.Tensor) -> dict[str, Any]:
    """Near-copies of ``real`` (one class's training images) among ``synth``."""
    real_nn = nearest_distance(real, real, leave_one_out=True)
    distinct = real_nn[real_nn > 1e-6]
    base = float(np.quantile(distinct, COPY_QUANTILE)) if len(distinct) else 0.0
    threshold = COPY_FACTOR * base
    synth_nn = nearest_distance(synth, real)
    copies = np.flatnonzero(synth_nn < threshold)
    return {
        "memorised": len(copies),
        "memorised_index": copies[:20].tolist(),
        "copy_threshold": threshold,
        "real_nn_distance_p01": base,
        "synthetic_nn_distance_min": float(synth_nn.min()) if len(synth_nn) else None,
        "n_checked": len(synth),
    }


def tstr_by_class(
    real: dict[str, np.ndarray], synth: dict[str, np.ndarray], seed: int
) -> dict[str, dict[str, float]]:
    """Per synthesised class: its recall on held-out real training images when the classifier
    learnt it from synthetic images (TSTR) or from real ones (TRTR), other classes real."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    classes = list(real)
    fit, score = {}, {}
    for c in classes:
        perm = rng.permutation(len(real[c]))
        fit[c], score[c] = real[c][perm[: len(perm) // 2]], real[c][perm[len(perm) // 2 :]]
    x_score = np.concatenate([score[c] for c in classes])
    y_score = np.concatenate([np.full(len(score[c]), i) for i, c in enumerate(classes)])

    def recall(train: dict[str, np.ndarray], c: str) -> float:
        x = np.concatenate([train[k] for k in classes])
        y = np.concatenate([np.full(len(train[k]), i) for i, k in enumerate(classes)])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        pred = clf.fit(x, y).predict(x_score)
        mine = y_score == classes.index(c)
        return float((pred[mine] == classes.index(c)).mean())

    out = {}
    for c, s in synth.items():
        n = min(len(fit[c]), len(s))
        swapped = fit | {c: s[rng.permutation(len(s))[:n]]}
        out[c] = {"tstr_recall": recall(swapped, c), "trtr_recall": recall(fit, c)}
    return out


def verdict(m: dict[str, Any]) -> list[str]:
    """Why a class fails (empty: it passes)."""
    if m.get("skipped"):
        return [m["skipped"]]
    why = []
    if m["two_sample_accuracy"] > TWO_SAMPLE_MAX:
        why.append(f"two-sample accuracy {m['two_sample_accuracy']:.3f} > {TWO_SAMPLE_MAX}")
    if m["tstr_recall"] < TSTR_RATIO_MIN * m["trtr_recall"]:
        why.append(
            f"TSTR recall {m['tstr_recall']:.3f} < {TSTR_RATIO_MIN} x TRTR {m['trtr_recall']:.3f}"
        )
    if not m["fid_ratio"] <= FID_RATIO_MAX:
        why.append(f"FID {m['fid_ratio']:.1f} x real-vs-real > {FID_RATIO_MAX:g}")
    if m["memorised"] > MEMORISED_MAX:
        why.append(f"{m['memorised']} near-copies of training images")
    return why


def _distances(real: np.ndarray, synth: np.ndarray, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    half_a, half_b = real[perm[: len(real) // 2]], real[perm[len(real) // 2 :]]
    s = synth[rng.permutation(len(synth))[: len(half_b)]]
    f_s, f_r = fid(s, half_a), fid(half_b, half_a)
    return {
        "n_compared": min(len(s), len(half_b)),
        "fid_synthetic_vs_real": f_s,
        "fid_real_vs_real": f_r,
        "fid_ratio": f_s / f_r if f_r > 0 else float("inf"),
        "kid_synthetic_vs_real": kid(s, half_a, seed=seed),
        "kid_real_vs_real": kid(half_b, half_a, seed=seed),
        "two_sample_accuracy": two_sample_accuracy(real, synth, seed),
    }


def _features(groups: dict[str, torch.Tensor], size: int, variant: int) -> dict[str, np.ndarray]:
    """Lite features of every group in one pass (one model build)."""
    from medxfer.gan.quality import lite0_features

    names = [k for k, v in groups.items() if len(v)]
    if not names:
        return {}
    feats = lite0_features(torch.cat([groups[k] for k in names]), size=size, variant=variant)
    ends = np.cumsum([len(groups[k]) for k in names])
    return dict(zip(names, np.split(feats, ends[:-1]), strict=True))


def run_gate(
    real: dict[str, torch.Tensor],
    synth: dict[str, torch.Tensor],
    *,
    n_images: int = 150,
    size: int = 96,
    seed: int = 0,
    variant: int = 0,
) -> dict[str, Any]:
    """Judge each class of ``synth`` (uint8 images) against ``real`` (the training split's
    images of every class, same resolution); FID/KID/two-sample/TSTR on at most ``n_images``
    per class, memorisation on all of them; features by EfficientNet-Lite``variant``."""
    import time

    from medxfer.gan.quality import extractor

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x[torch.from_numpy(np.sort(rng.permutation(len(x))[:n_images]))]

    judged = [c for c, s in synth.items() if len(s) >= MIN_SYNTHETIC and len(real[c]) >= MIN_REAL]
    feats = _features(
        {f"real/{c}": pick(x) for c, x in real.items()}
        | {f"synth/{c}": pick(synth[c]) for c in judged},
        size,
        variant,
    )
    real_f = {c: feats[f"real/{c}"] for c in real if f"real/{c}" in feats}
    tstr = tstr_by_class(real_f, {c: feats[f"synth/{c}"] for c in judged}, seed)
    per_class: dict[str, Any] = {}
    for c, s in synth.items():
        m: dict[str, Any] = {"n_real": len(real[c]), "n_synthetic": len(s)}
        if c in judged:
            m |= _distances(real_f[c], feats[f"synth/{c}"], seed) | tstr[c]
            m |= memorisation(real[c], s)
        else:
            m["skipped"] = (
                f"too few images to judge (needs {MIN_REAL} real and {MIN_SYNTHETIC} synthetic)"
            )
        m["reasons"] = verdict(m)
        m["passed"] = not m["reasons"]
        per_class[c] = m
    return {
        "split": "training split only (real images the GAN learnt from; never val or test)",
        "thresholds": thresholds(),
        "extractor": extractor(size, variant),
        "per_class": per_class,
        "passed": [c for c, m in per_class.items() if m["passed"]],
        "failed": [c for c, m in per_class.items() if not m["passed"]],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fallback(gate: dict[str, Any], strategy: str) -> list[str]:
    """The overrides of the fallback strategy when any class failed the gate, else none."""
    if strategy not in FALLBACKS:
        from medxfer.errors import MedxferError

        raise MedxferError(
            f"gan.gate_fallback={strategy!r} is not a strategy",
            f"use one of {', '.join(FALLBACKS)}",
        )
    return list(FALLBACKS[strategy]) if gate["failed"] else []


def describe(gate: dict[str, Any], strategy: str) -> list[str]:
    """Plain sentences for the console and the report."""
    lines = []
    for c, m in gate["per_class"].items():
        word = "passes" if m["passed"] else "FAILS"
        lines.append(f"class {c}: {word} the gate" + ("" if m["passed"] else ": " + "; ".join(
            m["reasons"])))  # fmt: skip
    if gate["failed"]:
        over = " ".join(FALLBACKS.get(strategy, [])) or "no imbalance fix"
        lines.append(
            f"no synthetic image of {', '.join(gate['failed'])} goes into training; "
            f"falling back to {strategy} ({over})"
        )
    return lines
