"""TENT for ``medxfer adapt --method tent``, and the label-shift guard of both methods.

TENT (Wang et al., "Tent: fully test-time adaptation by entropy minimization", ICLR 2021) goes
one step beyond AdaBN: BatchNorm normalizes each batch of the new site's images with that
batch's own statistics, and a few gradient steps lower the mean entropy of the predictions by
changing only the BatchNorm scale and shift (every other weight frozen). Here:

- the model is copied; dropout and stochastic depth stay off (eval mode), only the BatchNorm
  layers run in training mode;
- ``steps`` steps of Adam (``lr``, TENT's optimiser for small batches) over shuffled,
  near-equal batches of the unlabelled images (a fresh shuffle per pass; 0 = one pass, TENT's
  online setting, but at least ``MIN_STEPS``: a site of a few hundred images is only a few
  batches, and three steps of 1e-3 leave the model where AdaBN puts it);
- afterwards the running statistics are re-estimated on the same images (AdaBN) through the
  updated layers, so the saved model predicts one image at a time as it did in its batches.

Entropy minimization has a known failure: it can make the model confident in one class for
everything (a collapse), and any BatchNorm re-estimate follows the class mix of the images, so
a new site whose class mix differs from training (label shift) shifts the statistics for the
wrong reason. ``label_shift_guard`` flags both by the class mix of the adapted predictions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.train.batchnorm import batchnorm_layers, recompute_batchnorm

Adapter = Callable[[nn.Module, dict[str, Any], np.ndarray], nn.Module]
STEPS = 0  # 0 = one pass over the images, one step per batch, at least MIN_STEPS
MIN_STEPS = 20
LR = 1e-3
# the guard fires when the adapted predictions' effective number of classes (exp of the entropy
# of the predicted class mix) falls below this share of the reference mix's (validation's
# predictions when the run stored them, else the unadapted model's on the same images): the
# largest constant without false alarms on resampled validation outputs of synthetic-set runs
# (bench/tent_guard.py, docs/adapt.md)
COLLAPSE_RATIO = 0.75


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row's softmax."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def mean_entropy(probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(1).mean())


def tent_adapt(
    model: nn.Module,
    meta: dict[str, Any],
    images: np.ndarray,
    *,
    batch_size: int = 64,
    steps: int = STEPS,
    lr: float = LR,
    seed: int = 0,
    trace: list[float] | None = None,
) -> nn.Module:
    """A copy of ``model`` adapted to ``images`` (uint8 at the model's size) by TENT, then
    with its BatchNorm statistics re-estimated on them; in eval mode, ``model`` unchanged.
    ``trace``: receives each step's mean entropy (before that step's update)."""
    from medxfer.evaluate.adapt import batches
    from medxfer.evaluate.predict import preprocess_arrays

    if len(images) < 2:
        raise MedxferError("adaptation needs at least 2 images", "pass a folder of new images")
    if steps < 0 or not lr > 0:
        raise MedxferError(f"TENT needs steps >= 0 and lr > 0, got {steps} and {lr}")
    adapted = copy.deepcopy(model).eval()
    layers = [m for m in batchnorm_layers(adapted) if m.affine]
    if not layers:
        raise MedxferError(
            "this model has no BatchNorm layers with a scale and shift: TENT has nothing to "
            "update", "use --method adabn",
        )  # fmt: skip
    params = [p for m in layers for p in (m.weight, m.bias)]
    for p in adapted.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    per_pass = len(batches(len(images), batch_size, seed))
    total = steps or max(per_pass, MIN_STEPS)
    for m in layers:
        m.train()  # normalize with each batch's own statistics
    with torch.enable_grad():
        for step in range(total):
            idx = batches(len(images), batch_size, seed + step // per_pass)[step % per_pass]
            loss = entropy(adapted(preprocess_arrays(meta, images[np.sort(idx)]))).mean()
            if trace is not None:
                trace.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    adapted.eval()
    for p in adapted.parameters():
        p.requires_grad_(False)
    order = batches(len(images), batch_size, seed)
    recompute_batchnorm(adapted, (preprocess_arrays(meta, images[np.sort(i)]) for i in order))
    return adapted


def _effective_classes(shares: np.ndarray) -> float:
    p = shares[shares > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def label_shift_guard(
    adapted_pred: np.ndarray,
    reference_pred: np.ndarray,
    k: int,
    *,
    reference: str,
    threshold: float = COLLAPSE_RATIO,
) -> dict[str, Any]:
    """Does the class mix of the adapted predictions (``adapted_pred``, class indices) collapse
    against ``reference_pred`` (validation's predictions, or the unadapted model's on the same
    images)? Fires when its effective number of classes, exp(entropy of the predicted class
    shares), is below ``threshold`` times the reference's."""
    mix = np.bincount(adapted_pred, minlength=k) / max(len(adapted_pred), 1)
    ref = np.bincount(reference_pred, minlength=k) / max(len(reference_pred), 1)
    eff, eff_ref = _effective_classes(mix), _effective_classes(ref)
    ratio = eff / eff_ref
    return {
        "rule": "fires when exp(entropy of the adapted predicted class mix) < threshold x "
        "that of the reference mix",
        "reference": reference,
        "threshold": threshold,
        "effective_classes_adapted": eff,
        "effective_classes_reference": eff_ref,
        "ratio": ratio,
        "largest_share_adapted": float(mix.max()),
        "fired": bool(ratio < threshold),
    }


def make_adapter(
    method: str, *, batch_size: int, seed: int, steps: int, lr: float
) -> tuple[Adapter, list[float]]:
    """The adaptation as a function of (model, meta, images), and the list that receives TENT's
    per-step entropy on the last call (the full-set adaptation is the first call; the labelled
    check's folds come after it, so the trace is kept from the first call only)."""
    trace: list[float] = []

    def adabn(model: nn.Module, meta: dict[str, Any], images: np.ndarray) -> nn.Module:
        from medxfer.evaluate.adapt import adapt_batchnorm

        return adapt_batchnorm(model, meta, images, batch_size=batch_size, seed=seed)

    def tent(model: nn.Module, meta: dict[str, Any], images: np.ndarray) -> nn.Module:
        steps_seen: list[float] | None = None if trace else trace
        return tent_adapt(model, meta, images, batch_size=batch_size, steps=steps, lr=lr,
                          seed=seed, trace=steps_seen)  # fmt: skip

    return (tent if method == "tent" else adabn), trace


def guard(folder: Path, p0: np.ndarray, p1: np.ndarray, k: int) -> dict[str, Any]:
    """``label_shift_guard`` of the adapted predictions ``p1`` against validation's predictions
    when the run folder stored them, else against the unadapted predictions ``p0``."""
    from medxfer.evaluate.unlabelled import STORED, stored_outputs

    stored = stored_outputs(folder, k)
    if stored is not None:
        return label_shift_guard(p1, stored[0].argmax(1), k, reference=f"validation ({STORED})")
    return label_shift_guard(p1, p0, k, reference="unadapted predictions on these images")
