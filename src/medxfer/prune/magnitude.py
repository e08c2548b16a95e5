"""Global magnitude pruning (pure: weights + mask in, smaller mask out) and applying masks.

``global_magnitude_prune`` ranks the surviving weights of all masked layers together, so layers
with many small weights lose more (Frankle & Carbin's global variant, which holds up better on
deep networks than pruning every layer by the same fraction). Ties are broken by position (a
stable sort over the layers in mask order, then flat index), so the result is deterministic
and the count removed is exact.

``attach`` uses ``torch.nn.utils.prune.custom_from_mask``: the module's ``weight`` becomes
``weight_orig * weight_mask`` recomputed before every forward, so pruned weights are zero in
every forward and get zero gradient. ``attach`` also zeroes ``weight_orig`` where the mask is
False, so no optimizer (AdamW's decoupled weight decay included) can move them either, and it
registers state-dict hooks so ``model.state_dict()`` stays the plain dense layout (``weight``
with zeros) that ``predict``, ``--resume`` and any other loader expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from medxfer.errors import MedxferError
from medxfer.prune.mask import Mask, check_fits

_HANDLES = "_medxfer_prune_hooks"


def fold_reparam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every ``X_orig`` / ``X_mask`` pair replaced by ``X = orig * mask``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            base = key[: -len("_orig")]
            mask = state[base + "_mask"].bool()
            out[base] = torch.where(mask, value, 0.0).detach()
        else:
            out[key] = value
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the plain layout (pruned weights as zeros): detached CPU copies."""
    return {k: v.detach().to("cpu", copy=True) for k, v in fold_reparam(model.state_dict()).items()}


def n_to_remove(alive: int, fraction: float) -> int:
    """Weights one round removes: ``fraction`` of the survivors, rounded to the nearest."""
    if not 0.0 < fraction < 1.0:
        raise MedxferError(f"pruning fraction {fraction} is not in (0, 1)", "e.g. --fraction 0.2")
    return round(alive * fraction)


def prune_count(weights: Mapping[str, torch.Tensor], mask: Mask, n_remove: int) -> Mask:
    """Remove exactly ``n_remove`` surviving weights: the smallest |w| under one global order."""
    check_fits(mask, weights, "these weights")
    if not 0 <= n_remove <= mask.kept:
        raise MedxferError(f"cannot remove {n_remove} of {mask.kept} surviving weights")
    names = list(mask)
    scores = torch.cat([weights[n].detach().float().abs().cpu()[mask[n]] for n in names])
    order = torch.sort(scores, stable=True).indices
    alive = torch.ones(scores.numel(), dtype=torch.bool)
    alive[order[:n_remove]] = False
    out, pos = Mask(), 0
    for n in names:
        m = mask[n].clone()
        k = int(m.count_nonzero())
        m[m.clone()] = alive[pos : pos + k]
        out[n], pos = m, pos + k
    return out


def global_magnitude_prune(
    model: nn.Module | Mapping[str, torch.Tensor], mask: Mask, fraction: float
) -> Mask:
    """Remove ``fraction`` of the surviving weights (global smallest |w|); masks only shrink."""
    weights = plain_state_dict(model) if isinstance(model, nn.Module) else fold_reparam(model)
    return prune_count(weights, mask, n_to_remove(mask.kept, fraction))


def _module_of(model: nn.Module, weight_name: str) -> nn.Module:
    return model.get_submodule(weight_name.removesuffix(".weight"))


def _state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """Save ``weight`` (orig * mask) instead of the ``weight_orig`` / ``weight_mask`` pair."""
    orig, mask = state.pop(prefix + "weight_orig"), state.pop(prefix + "weight_mask")
    state[prefix + "weight"] = torch.where(mask.bool(), orig, 0.0)


def _load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Accept a plain ``weight``: it loads into ``weight_orig`` under the attached mask."""
    key = prefix + "weight"
    if key in state and prefix + "weight_orig" not in state:
        mask = module.get_buffer("weight_mask")
        w = state.pop(key)
        state[prefix + "weight_orig"] = torch.where(mask.bool().to(w.device), w, 0.0)
        state[prefix + "weight_mask"] = mask


def attach(model: nn.Module, mask: Mask) -> nn.Module:
    """Apply ``mask`` in place (replacing any mask attached before); returns the model."""
    check_fits(mask, model, "the model")
    for name, m in mask.items():
        module = _module_of(model, name)
        if hasattr(module, _HANDLES):
            _remove_one(module)
        w = module.get_parameter("weight")
        keep = m.to(w.device)
        with torch.no_grad():
            w.mul_(keep)  # zero weight_orig too: no optimizer state can grow there
        torch_prune.custom_from_mask(module, "weight", keep)
        handles = (
            module.register_state_dict_post_hook(_state_dict_hook),
            module.register_load_state_dict_pre_hook(_load_hook),
        )
        setattr(module, _HANDLES, handles)
    return model


def _remove_one(module: nn.Module) -> None:
    for h in getattr(module, _HANDLES):
        h.remove()
    delattr(module, _HANDLES)
    torch_prune.remove(module, "weight")


def make_permanent(model: nn.Module) -> nn.Module:
    """Drop the reparametrization: ``weight`` is a plain Parameter again, zeros where pruned."""
    for module in model.modules():
        if hasattr(module, _HANDLES):
            _remove_one(module)
    return model


def mask_of(model: nn.Module) -> Mask:
    """The mask attached to ``model`` (weights without one are not in it)."""
    return Mask(
        {
            f"{name}.weight" if name else "weight": m.get_buffer("weight_mask").bool().cpu()
            for name, m in model.named_modules()
            if hasattr(m, _HANDLES)
        }
    )


def check_pruned(state: Mapping[str, torch.Tensor], mask: Mask, what: str) -> None:
    """Raise when weights that ``mask`` prunes are nonzero in ``state``: it was not pruned so."""
    check_fits(mask, state, what)
    for name, m in mask.items():
        if bool(state[name].detach().cpu()[~m].any()):
            raise MedxferError(
                f"{what} has nonzero weights where the mask prunes them (e.g. {name})",
                "use the mask.pt saved in the same run folder as the checkpoint",
            )
