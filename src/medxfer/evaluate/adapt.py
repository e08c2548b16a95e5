"""``medxfer adapt``: re-estimate a model's BatchNorm statistics on unlabelled images of a new site.

A network with BatchNorm normalizes every feature map with a mean and variance estimated on the
training images. Images from another scanner, protocol or hospital shift those statistics, and
a model that sees them through the training statistics can be systematically off. Re-estimating
only the statistics on the new images, with every learned weight left as it was, is AdaBN (Li
et al., "Revisiting batch normalization for practical domain adaptation", ICLR workshop 2017);
Schneider et al. (NeurIPS 2020) showed it recovers much of the accuracy lost to covariate
shift, given enough images. It needs no labels, no training data and no gradient step.

Done here as it must be for the estimate to mean anything:

- **Shuffled, near-equal batches.** BatchNorm's running variance is the average of the
  per-batch variances. Images that arrive sorted by class (a folder per class) make every batch
  one class, the variance between classes is lost, and the statistics are wrong; the first
  probe of this module did exactly that on the chest X-ray test split and scored a gain that a
  shuffled estimate does not reproduce. Images are shuffled with a fixed seed and cut into
  batches of near-equal size (none of one image).
- **Only the BatchNorm layers in training mode**, cumulative averages, weights untouched
  (``medxfer.train.batchnorm``, shared with the recalibration every training run ends with).
- **A labelled check when labels exist.** When the folder holds one subfolder per class (the
  layout medxfer trains from), the command also estimates what adaptation does to accuracy
  without scoring an image whose statistics it used: stratified folds, statistics from the other
  folds, scored on this one (cross-fitting), against the unadapted model on the same images,
  with a paired bootstrap interval of the difference.

Where it can hurt: with few images (the statistics are noisy), with a batch of images that
mixes sites, or where the new site's class mix alone differs (the statistics then follow the mix,
not the site). It was measured on both datasets' official test splits (studies/bn_statistics.py).

``method="tent"`` adapts by TENT instead (``medxfer.evaluate.tent``: entropy minimization of
the BatchNorm scale and shift, then the same re-estimate); the labelled check cross-fits
whichever method was chosen, and a guard flags a collapse of the predicted class mix (both
methods).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medxfer.errors import MedxferError
from medxfer.evaluate.metrics import paired_bootstrap_difference
from medxfer.evaluate.tent import Adapter, guard, make_adapter, mean_entropy
from medxfer.train.batchnorm import batchnorm_layers, recompute_batchnorm

MIN_IMAGES = 100  # fewer than this: the statistics are noisy, said in the output
METHODS = ("adabn", "tent")


def batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into ``ceil(n / batch_size)`` batches of
    near-equal size: none of a single image when ``n >= 2`` (BatchNorm cannot train on it)."""
    order = np.random.default_rng(seed).permutation(n)
    return [b for b in np.array_split(order, max(math.ceil(n / batch_size), 1)) if len(b)]


def adapt_batchnorm(
    model: nn.Module,
    meta: dict[str, Any],
    images: np.ndarray,
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``images``
    (uint8 at the model's size, preprocessed as ``medxfer predict`` does); ``model`` is left
    unchanged and the copy is in eval mode."""
    from medxfer.evaluate.predict import preprocess_arrays

    if len(images) < 2:
        raise MedxferError("adaptation needs at least 2 images", "pass a folder of new images")
    adapted = copy.deepcopy(model).eval()
    if not batchnorm_layers(adapted):
        raise MedxferError("this model has no BatchNorm layers: there is nothing to re-estimate")
    order = batches(len(images), batch_size, seed)
    recompute_batchnorm(adapted, (preprocess_arrays(meta, images[np.sort(i)]) for i in order))
    return adapted


def cross_fitted_check(
    model: nn.Module,
    meta: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = 2,
    batch_size: int = 64,
    seed: int = 0,
    n_bootstrap: int = 2000,
    log: Callable[[str], None] = lambda line: None,
    before: np.ndarray | None = None,
    adapter: Adapter | None = None,
) -> dict[str, Any]:
    """What adaptation does to accuracy on labelled images, no image scored by a model whose
    statistics it shaped: stratified ``folds``, each scored after adapting on the others, against
    the unadapted model on the same images (``before``: its probabilities, if already computed);
    a paired percentile bootstrap of the differences. ``adapter(model, meta, images)``: the
    adaptation (default AdaBN with ``batch_size`` and ``seed``)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    from medxfer.evaluate.predict import probs_of_arrays

    k = len(meta["classes"])
    if len(labels) < 2 * folds:
        raise MedxferError(f"the labelled check needs at least {2 * folds} images")
    counts = np.bincount(labels, minlength=k)
    stratify = counts[counts > 0].min() >= folds
    splitter = (StratifiedKFold if stratify else KFold)(folds, shuffle=True, random_state=seed)
    if before is None:
        before = probs_of_arrays(model, meta, images, batch_size=batch_size)
    after = np.zeros_like(before)
    for fold, (fit_idx, score_idx) in enumerate(splitter.split(images, labels)):
        log(f"labelled check: fold {fold + 1} of {folds}")
        if adapter is None:
            adapted = adapt_batchnorm(model, meta, images[fit_idx], batch_size=batch_size,
                                      seed=seed)  # fmt: skip
        else:
            adapted = adapter(model, meta, images[fit_idx])
        after[score_idx] = probs_of_arrays(adapted, meta, images[score_idx], batch_size=batch_size)
    p0, p1 = before.argmax(1), after.argmax(1)

    def side(pred: np.ndarray) -> dict[str, Any]:
        recalls = [float((pred[labels == j] == j).mean()) if (labels == j).any() else None
                   for j in range(k)]  # fmt: skip
        return {
            "accuracy": float((pred == labels).mean()),
            "balanced_accuracy": statistics.fmean(r for r in recalls if r is not None),
            "recall": dict(zip(meta["classes"], recalls, strict=True)),
        }

    return {
        "folds": folds,
        "stratified": bool(stratify),
        "n_images": len(labels),
        "unadapted": side(p0),
        "adapted": side(p1),
        **paired_bootstrap_difference(labels, p0, p1, k, n_bootstrap=n_bootstrap, seed=seed),
    }


def folder_labels(target: Path, files: list[Path], classes: list[str]) -> list[int] | None:
    """Labels from the folder layout medxfer trains from (``target/<class>/...``), when every
    file lies under a subfolder named after one of the model's classes; else None."""
    if target.is_file():
        return None
    out = []
    for f in files:
        top = f.relative_to(target).parts[0]
        if top not in classes or top == f.name:
            return None
        out.append(classes.index(top))
    return out


def adapt_run(
    checkpoint: Path,
    target: Path,
    out_dir: Path,
    *,
    batch_size: int = 64,
    seed: int = 0,
    folds: int = 2,
    method: str = "adabn",
    steps: int = 0,
    lr: float = 1e-3,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """``medxfer adapt``: the model of ``checkpoint`` (a run folder or model file) adapted to the
    images under ``target`` by ``method`` (adabn, or tent with ``steps`` and ``lr``), written to
    ``out_dir`` in a form every medxfer command loads (``best.pt``, or ``model.pt`` for a
    structured-pruned model), with ``adapt.json``."""
    from medxfer.evaluate.predict import (
        collect_inputs,
        load_trained_with_format,
        model_file,
        probs_of_arrays,
        read_arrays,
    )
    from medxfer.prune.structured import FORMAT as STRUCTURED_FORMAT
    from medxfer.prune.structured import save_structured
    from medxfer.train.checkpoint import atomic_save, atomic_write_json, ensure_dir

    if batch_size < 2 or folds < 2:
        raise MedxferError(
            f"batch size and folds must be at least 2, got {batch_size} and {folds}",
            "BatchNorm statistics need batches of 2 or more; cross-fitting needs 2 or more folds",
        )
    if method not in METHODS:
        raise MedxferError(f"unknown adaptation method {method!r}", f"use one of {list(METHODS)}")
    if method == "tent" and (steps < 0 or not lr > 0):
        raise MedxferError(f"TENT needs steps >= 0 and lr > 0, got {steps} and {lr}",
                           "e.g. --steps 0 (one pass) --lr 1e-3")  # fmt: skip
    adapter, trace = make_adapter(method, batch_size=batch_size, seed=seed, steps=steps, lr=lr)
    model, meta, fmt = load_trained_with_format(checkpoint)
    source = model_file(checkpoint)
    files = collect_inputs(target)
    log(f"reading {len(files)} files from {target}")
    arrays, errors = read_arrays(meta, files)
    readable = [f for f in files if f not in errors]
    if len(arrays) < 2:
        raise MedxferError(f"{target} has fewer than 2 readable images", "adaptation needs a set")
    images = np.stack(arrays)
    classes = list(meta["classes"])
    log(f"adapting ({method}) on {len(images)} images")
    adapted = adapter(model, meta, images)
    probs0 = probs_of_arrays(model, meta, images, batch_size=batch_size)
    probs1 = probs_of_arrays(adapted, meta, images, batch_size=batch_size)
    p0, p1 = probs0.argmax(1), probs1.argmax(1)
    labels = folder_labels(target, readable, classes)
    check = None
    if labels is not None and len(labels) >= 2 * folds:
        check = cross_fitted_check(model, meta, images, np.asarray(labels), folds=folds,
                                   batch_size=batch_size, seed=seed, log=log,
                                   before=probs0, adapter=adapter)  # fmt: skip
    record: dict[str, Any] = {
        "source_model": str(source),
        "images": str(target),
        "n_images": len(images),
        "unreadable": {str(f): e for f, e in errors.items()},
        "method": method,
        "batchnorm_layers": len(batchnorm_layers(adapted)),
        "batch_size": batch_size,
        "seed": seed,
        "tent": (
            {"steps": len(trace), "lr": lr, "optimizer": "adam", "step_entropy": trace}
            if method == "tent"
            else None
        ),
        "mean_entropy_unadapted": mean_entropy(probs0),
        "mean_entropy_adapted": mean_entropy(probs1),
        "label_shift_guard": guard(source.parent, p0, p1, len(classes)),
        "predicted_share_unadapted": dict(
            zip(classes, (np.bincount(p0, minlength=len(classes)) / len(p0)).tolist(), strict=True)
        ),
        "predicted_share_adapted": dict(
            zip(classes, (np.bincount(p1, minlength=len(classes)) / len(p1)).tolist(), strict=True)
        ),
        "predictions_changed": float((p0 != p1).mean()),
        "few_images": len(images) < MIN_IMAGES,
        "labelled_images": 0 if labels is None else len(labels),
        "labelled_check": check,
    }
    ensure_dir(out_dir)
    provenance = ("source_model", "images", "n_images", "seed", "method")
    new_meta = dict(meta) | {"adapted": {k: record[k] for k in provenance}}
    if fmt == STRUCTURED_FORMAT:
        path = out_dir / "model.pt"
        save_structured(path, adapted, new_meta)  # weights + the recipe of the cut
    else:  # dense, a pruned level (mask folded in) or the compact export: a plain state dict
        path = out_dir / "best.pt"
        atomic_save({"model": adapted.state_dict(), "meta": new_meta}, path)
    record["model"] = str(path)
    atomic_write_json(record, out_dir / "adapt.json")
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """What ``medxfer adapt`` prints."""
    what = (
        f"re-estimated {record['batchnorm_layers']} BatchNorm layers"
        if record.get("method", "adabn") == "adabn"
        else f"TENT: {record['tent']['steps']} steps on the scale and shift of "
        f"{record['batchnorm_layers']} BatchNorm layers, statistics re-estimated,"
    )
    lines = [
        f"{what} from {record['n_images']} images of {record['images']}; "
        f"{100 * record['predictions_changed']:.1f}% of their predictions changed"
    ]
    g = record.get("label_shift_guard")
    if g and g["fired"]:
        lines.append(
            f"[yellow]warning:[/] the predicted class mix collapsed: "
            f"{g['effective_classes_adapted']:.2f} effective classes after adaptation against "
            f"{g['effective_classes_reference']:.2f} in the {g['reference']} (guard: below "
            f"{g['threshold']:.2f} x); a label shift or a collapse; keep the original model "
            "unless labelled images of this site show a gain"
        )
    if record["few_images"]:
        lines.append(
            f"[yellow]warning:[/] fewer than {MIN_IMAGES} images: the statistics are noisy and "
            "the adapted model may be worse"
        )
    check = record["labelled_check"]
    if check is None:
        why = (
            f"only {record['labelled_images']} labelled images, too few for the labelled check"
            if record["labelled_images"]
            else "no labels (the folder is not one subfolder per class)"
        )
        lines.append(
            f"{why}: what adaptation does to accuracy here is not measured; check it on "
            "labelled images of the same site"
        )
        return lines
    lo, hi = check["accuracy_difference_ci95"]
    blo, bhi = check["balanced_accuracy_difference_ci95"]
    a0, a1 = check["unadapted"], check["adapted"]
    lines.append(
        f"labelled check ({check['folds']}-fold cross-fitted: statistics from the other folds, "
        f"scored on this one): accuracy {a0['accuracy']:.3f} -> {a1['accuracy']:.3f} "
        f"({100 * check['accuracy_difference']:+.1f} points, 95% CI [{100 * lo:+.1f}, "
        f"{100 * hi:+.1f}]); balanced accuracy {a0['balanced_accuracy']:.3f} -> "
        f"{a1['balanced_accuracy']:.3f} ({100 * check['balanced_accuracy_difference']:+.1f}, "
        f"[{100 * blo:+.1f}, {100 * bhi:+.1f}])"
    )
    lines.append(
        "recall per class: "
        + ", ".join(f"{c} {_fmt(a0['recall'][c])} -> {_fmt(a1['recall'][c])}" for c in a0["recall"])
    )
    if lo > 0:
        lines.append("adaptation helped on these images")
    elif hi < 0:
        lines.append("[yellow]adaptation hurt on these images: keep the original model[/]")
    else:
        lines.append("no clear difference on these images (the interval spans 0)")
    return lines


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
