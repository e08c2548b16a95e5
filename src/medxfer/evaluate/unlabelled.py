"""``medxfer shift``: do new, unlabelled images look like the validation split to the model?

A clinician who deploys a model at another site, scanner or period has images but no labels,
and every number medxfer reports (and every choice it made: tuned values, checkpoint, pruned
level) comes from validation images carved from the training split. This module compares what
the model outputs on the new images with what it outputs on that validation split, without
labels for the new images:

- **Black-box shift detection** (BBSD; Lipton et al., ICML 2018; Rabanser et al., "Failing
  Loudly", NeurIPS 2019, where it was the best of the detectors compared): one two-sample
  Kolmogorov-Smirnov test per class on the softmax probability, Bonferroni-corrected over the
  classes. Shifted when the smallest p-value is below ``alpha / k``. A chi-square test of the
  predicted class counts is reported beside it.
- **Estimated accuracy** by average thresholded confidence (ATC; Garg et al., ICLR 2022) with
  the negative-entropy score: the threshold at which the share of validation images scoring
  below it equals the validation error; the estimate is the share of new images scoring at or
  above it. Mean top-class confidence on both sets is given too.
- **Estimated class mix** by black-box shift estimation (BBSE; Lipton et al. 2018): the
  validation confusion matrix inverted against the predicted class shares on the new images.
  It assumes only the class mix changed (the images of each class look as they did); where a
  class's images look different too (chest X-ray's `normal` test images, measured by
  bench/shift_check.py) it can land farther from the truth than validation's own mix. So
  the assumption is tested: the new outputs against validation's outputs mixed by class in
  the estimated proportions (largest KS distance over classes; p-value from a parametric
  bootstrap that re-estimates the mix), and the command says when the mix is not to be trusted.

None of these can prove the absence of a shift that leaves the model's outputs unchanged, and
the accuracy estimate is a heuristic whose error grows with the shift; the output says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medxfer.errors import MedxferError

ALPHA = 0.05  # family-wise level of the per-class KS tests (Bonferroni over classes)


def negative_entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return np.asarray((p * np.log(p)).sum(axis=1))


def atc_accuracy(
    ref_probs: np.ndarray, ref_labels: np.ndarray, probs: np.ndarray
) -> dict[str, float]:
    """Average thresholded confidence (negative entropy): the estimated accuracy on ``probs``."""
    ref_scores = negative_entropy(ref_probs)
    ref_acc = float((ref_probs.argmax(1) == ref_labels).mean())
    # the share of validation scores below the threshold equals the validation error
    threshold = float(np.quantile(ref_scores, 1.0 - ref_acc))
    estimate = float((negative_entropy(probs) >= threshold).mean())
    return {"reference_accuracy": ref_acc, "threshold": threshold, "estimated_accuracy": estimate}


def bbse_class_shares(
    ref_probs: np.ndarray, ref_labels: np.ndarray, probs: np.ndarray, k: int
) -> np.ndarray:
    """Black-box shift estimation: the class mix of the new images, assuming p(x | y) is the
    validation split's. Solves ``mu = M q`` with ``M[i, j] = P(predicted i | true j)`` on
    validation and ``mu`` the predicted shares on the new images; clipped and renormalized."""
    pred = ref_probs.argmax(1)
    m = np.zeros((k, k))
    for j in range(k):
        rows = pred[ref_labels == j]
        if len(rows):
            m[:, j] = np.bincount(rows, minlength=k) / len(rows)
        else:
            m[j, j] = 1.0  # a class absent from validation: assume it is always recognised
    mu = np.bincount(probs.argmax(1), minlength=k) / max(len(probs), 1)
    q = np.linalg.lstsq(m, mu, rcond=None)[0]
    q = np.clip(q, 0.0, None)
    return q / q.sum() if q.sum() > 0 else np.full(k, 1.0 / k)


def _bbse_mix(
    ref_probs: np.ndarray, ref_labels: np.ndarray, probs: np.ndarray, present: np.ndarray
) -> np.ndarray:
    """BBSE's mix over the classes validation holds (the others cannot be drawn from)."""
    mix = bbse_class_shares(ref_probs, ref_labels, probs, len(present)) * present
    return mix / mix.sum() if mix.sum() > 0 else present / present.sum()


def _mixture_distance(
    ref_probs: np.ndarray, ref_labels: np.ndarray, probs: np.ndarray, mix: np.ndarray
) -> float:
    """Largest gap, over classes and thresholds, between the distribution of one softmax column
    on the new images and the validation columns mixed by class in proportions ``mix`` (the
    KS distance to what a pure label shift with that mix would produce)."""
    k = probs.shape[1]
    present = [j for j in range(k) if (ref_labels == j).any()]
    worst = 0.0
    for c in range(k):
        grid = np.unique(np.concatenate([probs[:, c], ref_probs[:, c]]))
        new_cdf = np.searchsorted(np.sort(probs[:, c]), grid, side="right") / len(probs)
        mixed = np.zeros_like(grid)
        for j in present:
            col = np.sort(ref_probs[ref_labels == j, c])
            mixed += mix[j] * np.searchsorted(col, grid, side="right") / len(col)
        worst = max(worst, float(np.abs(new_cdf - mixed).max()))
    return worst


def label_shift_test(
    ref_probs: np.ndarray,
    ref_labels: np.ndarray,
    probs: np.ndarray,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Does a pure label shift (BBSE's assumption) explain the outputs on the new images?

    Statistic: ``_mixture_distance`` at the BBSE mix. Its null distribution comes from a
    parametric bootstrap: validation cut in random halves within each class, one half the
    reference, new images drawn from the other as a pure label shift with that mix, the mix
    re-estimated each time; the null distances are rescaled from half to the whole reference
    size by the usual sqrt(1/a + 1/b) of a two-sample KS distance. A small p-value says the
    images of some class look different to the model, so the BBSE mix should not be trusted."""
    k = probs.shape[1]
    present = np.array([(ref_labels == j).any() for j in range(k)])
    mix = _bbse_mix(ref_probs, ref_labels, probs, present)
    observed = _mixture_distance(ref_probs, ref_labels, probs, mix)
    rng = np.random.default_rng(seed)
    by_class = {j: np.flatnonzero(ref_labels == j) for j in range(k) if present[j]}
    exceed = 0
    # a KS distance between samples of sizes a and b scales as sqrt(1/a + 1/b): bring the null
    # distances, made with half the reference, to the observed one's reference size
    n_half = sum(max(len(ix) // 2, 1) for ix in by_class.values())
    scale = float(np.sqrt((1 / len(ref_labels) + 1 / len(probs)) / (1 / n_half + 1 / len(probs))))
    for _ in range(n_bootstrap):
        # validation cut in halves within each class: one is the reference, the other the
        # source of the new images, so that no image is on both sides (shared values would
        # shrink the distances and make the test too eager); a class with one image is on both
        halves = {j: rng.permutation(ix) for j, ix in by_class.items()}
        ref_idx = np.concatenate([h[: max(len(h) // 2, 1)] for h in halves.values()])
        counts = rng.multinomial(len(probs), mix)
        new_idx = np.concatenate([rng.choice(halves[j][len(halves[j]) // 2 :], size=n)
                                  for j, n in enumerate(counts) if n])  # fmt: skip
        r_p, r_y, n_p = ref_probs[ref_idx], ref_labels[ref_idx], ref_probs[new_idx]
        m = _bbse_mix(r_p, r_y, n_p, present)
        exceed += _mixture_distance(r_p, r_y, n_p, m) * scale >= observed
    return {
        "statistic": observed,
        "p_value": (1 + exceed) / (1 + n_bootstrap),
        "n_bootstrap": n_bootstrap,
    }


def compare_outputs(
    ref_probs: np.ndarray,
    ref_labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    alpha: float = ALPHA,
    n_bootstrap: int = 200,
) -> dict[str, Any]:
    """The label-free comparison of the model's outputs on new images with validation.
    ``n_bootstrap=0`` skips the test of BBSE's assumption (``label_shift_test``)."""
    k = len(classes)
    if not 0.0 < alpha < 1.0:
        raise MedxferError(f"alpha must lie in (0, 1), not {alpha}", "e.g. --alpha 0.05")
    if ref_probs.shape[1] != k or probs.shape[1] != k:
        raise MedxferError(f"probabilities need {k} columns, one per class")
    if len(probs) < 2 or len(ref_probs) < 2:
        raise MedxferError("the shift check needs at least 2 images on each side")
    ref_pred = np.bincount(ref_probs.argmax(1), minlength=k)
    new_pred = np.bincount(probs.argmax(1), minlength=k)
    table = np.stack([ref_pred, new_pred])
    table = table[:, table.sum(0) > 0]
    chi2_p = float(stats.chi2_contingency(table)[1]) if table.shape[1] > 1 else 1.0
    bbse = bbse_class_shares(ref_probs, ref_labels, probs, k)
    ref_true = np.bincount(ref_labels, minlength=k) / len(ref_labels)
    per_class: list[dict[str, Any]] = []
    ks_p: list[float] = []
    for j, name in enumerate(classes):
        ks = stats.ks_2samp(ref_probs[:, j], probs[:, j])
        ks_p.append(float(ks.pvalue))
        per_class.append({
            "class": name,
            "reference_predicted_share": float(ref_pred[j] / len(ref_probs)),
            "predicted_share": float(new_pred[j] / len(probs)),
            "reference_true_share": float(ref_true[j]),
            "estimated_share": float(bbse[j]),
            "reference_mean_probability": float(ref_probs[:, j].mean()),
            "mean_probability": float(probs[:, j].mean()),
            "ks_statistic": float(ks.statistic),
            "ks_p_value": ks_p[-1],
        })  # fmt: skip
    min_p = min(ks_p)
    return {
        "classes": classes,
        "n_reference": len(ref_probs),
        "n_images": len(probs),
        "alpha": alpha,
        "ks_min_p_value": min_p,
        "shifted": bool(min_p < alpha / k),
        "predicted_shares_chi2_p_value": chi2_p,
        "mean_confidence": {
            "reference": float(ref_probs.max(1).mean()),
            "images": float(probs.max(1).mean()),
        },
        "accuracy": atc_accuracy(ref_probs, ref_labels, probs),
        "label_shift_test": (
            label_shift_test(ref_probs, ref_labels, probs, n_bootstrap=n_bootstrap)
            if n_bootstrap > 0
            else None
        ),
        "per_class": per_class,
    }


STORED = "val_predictions.npz"  # written by every training run beside its metrics.json


def stored_outputs(folder: Path, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The validation outputs a run stored when it finished, if they are comparable with what
    ``medxfer predict`` computes (no test-time flips, full precision); else None."""
    path = folder / STORED
    if not path.exists():
        return None
    with np.load(path) as saved:
        if bool(saved["tta"]) or str(saved["precision"]) != "fp32" or saved["probs"].shape[1] != k:
            return None
        return saved["probs"], saved["labels"]


def reference_outputs(
    model: Any, meta: dict[str, Any], *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The model's probabilities on its run's validation split, rebuilt from the configuration
    stored in the checkpoint, through the same preprocessing as ``medxfer predict``; needs the
    training data (``stored_outputs`` does not)."""
    from medxfer.evaluate.predict import probs_of_arrays

    images, labels = validation_arrays(meta)
    return probs_of_arrays(model, meta, images, batch_size=batch_size), labels


def validation_arrays(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and labels of the validation split of the run that wrote ``meta``,
    rebuilt from the configuration stored in its checkpoint."""
    from medxfer.config import config_from_dict, with_values
    from medxfer.data.prepare import prepare

    if "config" not in meta:
        raise MedxferError(
            "this model file does not record its training configuration",
            "pass the run folder of `medxfer train` or `prune` (its best.pt)",
        )
    # generated images only ever join the training split
    cfg = with_values(config_from_dict(meta["config"]), {"data.synthetic": ""})
    try:
        data = prepare(cfg.data)
    except MedxferError as err:
        raise MedxferError(
            f"cannot rebuild the run's validation split: {err.message}",
            f"run the check where the training data is, or from a run folder holding {STORED} "
            "(written by every training run since it was added; not with eval.tta)",
        ) from None
    if data.classes != list(meta["classes"]):
        raise MedxferError(
            f"the run's data now has classes {data.classes}, the model {meta['classes']}",
            "check data.root in the run's config.yaml",
        )
    idx = data.split_index["val"]
    if len(idx) < 2:
        raise MedxferError("the run's validation split has fewer than 2 images")
    return data.images[idx].numpy(), data.labels[idx].numpy()


def check_images(
    checkpoint: Path,
    target: Path,
    *,
    alpha: float = ALPHA,
    batch_size: int = 64,
    figure: Path | None = None,
) -> dict[str, Any]:
    """``medxfer shift``: the comparison for the images under ``target`` (a folder, an image,
    a DICOM file), read as ``medxfer predict`` reads them; unreadable files are listed.
    ``figure``: also draw each class's output distribution on both sets there."""
    from medxfer.evaluate.predict import collect_inputs, iter_file_probs, load_trained, model_file

    model, meta = load_trained(checkpoint)
    files = collect_inputs(target)
    rows, unreadable = [], {}
    for f, p, error in iter_file_probs(model, meta, files, batch_size=batch_size):
        if p is None:
            unreadable[str(f)] = error
        else:
            rows.append(p)
    if len(rows) < 2:
        raise MedxferError(f"{target} has fewer than 2 readable images", "the check compares sets")
    folder = model_file(checkpoint).parent
    stored = stored_outputs(folder, len(meta["classes"]))
    if stored is not None:
        (ref_probs, ref_labels), source = stored, f"stored: {folder / STORED}"
    else:
        ref_probs, ref_labels = reference_outputs(model, meta, batch_size=batch_size)
        source = "rebuilt from the run's configuration and data"
    probs, classes = np.stack(rows), list(meta["classes"])
    out = compare_outputs(ref_probs, ref_labels, probs, classes, alpha=alpha)
    if figure is not None:
        from medxfer.evaluate.figures import plot_output_shift

        p_values = [c["ks_p_value"] for c in out["per_class"]]
        plot_output_shift(ref_probs, probs, classes, figure, p_values)
        out["figure"] = str(figure)
    return {"model": str(checkpoint), "images": str(target), "unreadable": unreadable,
            "reference": source} | out  # fmt: skip


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``medxfer shift`` prints under its table."""
    acc = result["accuracy"]
    k = len(result["classes"])
    verdict = (
        f"SHIFTED: the model's outputs on these images differ from validation (smallest KS p = "
        f"{result['ks_min_p_value']:.1g} < {result['alpha']:g}/{k}); validation metrics and "
        "every choice made on validation may not hold here"
        if result["shifted"]
        else f"no shift detected (smallest KS p = {result['ks_min_p_value']:.2g} >= "
        f"{result['alpha']:g}/{k}): the outputs look like validation's; this cannot rule out "
        "a shift the model does not see"
    )
    return [
        verdict,
        f"estimated accuracy (ATC, heuristic): {acc['estimated_accuracy']:.3f} against "
        f"{acc['reference_accuracy']:.3f} on validation; mean confidence "
        f"{result['mean_confidence']['images']:.3f} against "
        f"{result['mean_confidence']['reference']:.3f}"
        + (
            " (under a detected shift the estimate is least reliable: a model can be confidently "
            "wrong on images unlike its training images, e.g. noise scores near 1.0)"
            if result["shifted"]
            else ""
        ),
        "estimated class mix (BBSE, assumes only the mix changed): "
        + ", ".join(f"{c['class']} {c['estimated_share']:.2f}" for c in result["per_class"])
        + _assumption(result.get("label_shift_test"), result["alpha"]),
    ]


def _assumption(test: dict[str, float] | None, alpha: float) -> str:
    if not test:
        return ""
    if test["p_value"] < alpha:
        return (
            f"; a change of class mix alone does not explain these outputs (p = "
            f"{test['p_value']:.2g}): the images of some class look different to the model, so "
            "do not trust this mix"
        )
    return f"; a change of class mix alone fits these outputs (p = {test['p_value']:.2g})"
