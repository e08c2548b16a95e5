"""Pruning masks as data: ``Mask`` maps a weight's state-dict name to a bool tensor (True = kept).

Masks cover the ``weight`` of every ``Conv2d`` and ``Linear`` (the classification head only when
asked: it has few weights and every one of them maps straight to a class score). They are plain
data so that they can be saved next to a run, compared, and checked against a checkpoint before
anything trains on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.train.checkpoint import atomic_save, load_checkpoint

FORMAT = "medxfer-mask-v1"


def prunable_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """``<module>.weight`` of every Conv2d / Linear whose module is not under ``exclude``."""
    skip = tuple(exclude)
    return [
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
        and not any(name == p or name.startswith(p + ".") for p in skip)
    ]


class Mask(dict[str, torch.Tensor]):
    """Weight name -> bool tensor of the weight's shape; True marks a surviving weight."""

    @classmethod
    def dense(cls, model: nn.Module, exclude: Iterable[str] = ()) -> Mask:
        """Everything kept: the mask of level 0."""
        params = dict(model.named_parameters())
        out = cls()
        for name in prunable_names(model, exclude):
            w = params.get(name, params.get(name + "_orig"))
            assert w is not None, name
            out[name] = torch.ones(w.shape, dtype=torch.bool)
        return out

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.values())

    @property
    def kept(self) -> int:
        return sum(int(m.count_nonzero()) for m in self.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the masked weights that are pruned (global, from exact integer counts)."""
        total = self.total
        return (total - self.kept) / total if total else 0.0

    def per_layer(self) -> dict[str, float]:
        return {k: 1.0 - int(m.count_nonzero()) / m.numel() for k, m in self.items()}

    def kept_per_layer(self) -> dict[str, int]:
        return {k: int(m.count_nonzero()) for k, m in self.items()}

    def is_subset_of(self, other: Mask) -> bool:
        """True when every weight kept here is also kept in ``other`` (masks only shrink)."""
        return self.keys() == other.keys() and all(
            not bool((m & ~other[k]).any()) for k, m in self.items()
        )

    def save(self, path: Path) -> None:
        """Atomic write: a killed process never leaves a half-written mask a resume would trust."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"format": FORMAT, "masks": {k: v.cpu() for k, v in self.items()}}, path)

    @classmethod
    def load(cls, path: Path) -> Mask:
        if not path.exists():
            raise MedxferError(f"no mask at {path}", "run `medxfer prune` to create it")
        obj = load_checkpoint(path)  # weights only; one message for anything else
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise MedxferError(f"{path} is not a medxfer mask file")
        masks = obj["masks"]
        if not all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in masks.values()):
            raise MedxferError(f"{path} holds masks that are not bool tensors")
        return cls(masks)


def random_like(mask: Mask, seed: int) -> Mask:
    """A random mask with exactly the same number of kept weights in every layer."""
    g = torch.Generator().manual_seed(seed)
    out = Mask()
    for name, m in mask.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: int(m.count_nonzero())]] = True
        out[name] = flat.view(m.shape)
    return out


def _weight_shape(state: Mapping[str, torch.Tensor], name: str) -> torch.Size | None:
    for key in (name, name + "_orig"):
        if key in state:
            return state[key].shape
    return None


def check_fits(mask: Mask, target: nn.Module | Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one clear error when ``mask`` names weights ``target`` lacks or has in other shapes.

    ``target`` is a model or a state dict (plain or with torch's ``weight_orig`` keys).
    """
    state = target.state_dict() if isinstance(target, nn.Module) else target
    missing = [k for k in mask if _weight_shape(state, k) is None]
    wrong = [k for k in mask if k not in missing and _weight_shape(state, k) != mask[k].shape]
    if missing or wrong:
        example = (missing + wrong)[0]
        raise MedxferError(
            f"the mask does not fit {what}: {len(missing)} weight(s) missing and {len(wrong)} "
            f"of another shape (e.g. {example})",
            "use the mask made for this architecture and number of classes",
        )
