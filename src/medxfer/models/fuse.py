"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm2d after a Conv2d is an affine map per channel, so it can be merged
into the convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass
over the activations fewer per convolution, the same outputs up to float rounding. onnxruntime
does this itself when it optimizes a graph; eager PyTorch does not, and at batch 1 on a CPU
those passes are a large share of the time (measured: README, Architecture, "CPU compute
settings"; studies/results/inference-layout/fold-brain-tumor-mri-160px.json).

Which BatchNorm follows which convolution is read from the modules' registration order (the
next child of the same parent), the way torchvision's, timm's and medxfer's backbones are
written; the forward is not traced. Registration order does not prove data flow, so the folded
copy is checked against the original on an example batch and discarded on any mismatch.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BatchNorm once its affine map is folded: timm's ``BatchNormAct2d``
    keeps its dropout and activation, a plain BatchNorm becomes the identity."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _fold_pairs(model: nn.Module) -> int:
    n = 0
    for parent in list(model.modules()):
        kids = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(kids):
            if (
                type(conv) is nn.Conv2d
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, _after_bn(bn))
                n += 1
    return n


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, example: torch.Tensor, tol: float = 1e-4
) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every BatchNorm2d that directly follows a Conv2d
    folded into it, and the number folded. The copy's outputs on ``example`` must equal the
    original's within ``tol`` x (1 + their largest magnitude); otherwise (a BatchNorm that was
    not fed by the convolution registered before it) the original is returned with 0."""
    model = model.eval()
    folded = copy.deepcopy(model)
    n = _fold_pairs(folded)
    if n == 0:
        return model, 0
    want, got = model(example), folded(example)
    if not torch.allclose(got, want, rtol=0.0, atol=tol * (1.0 + float(want.abs().max()))):
        return model, 0
    return folded, n
