"""One registry decorator, one ``create_model`` (the timm pattern).

A builder returns the network with ImageNet weights (or none) and its original head; the
registry replaces the head in ONE place (``replace_head``) and attaches the preprocessing that
belongs to the weights, so the mean/std are never copied by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medxfer.errors import MedxferError


@dataclass(frozen=True)
class Preprocess:
    """What the network expects: pixel values in [0, 1] are mapped by (x - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where these numbers come from (the weights' own transforms)


IMAGENET = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torchvision ImageNet")


@dataclass
class Built:
    model: nn.Module
    preprocess: Preprocess
    head: list[str]  # qualified names of the head's modules (trained first, prunable by option)
    arch: str
    weights: str


Builder = Callable[[bool], tuple[nn.Module, Preprocess]]


@dataclass(frozen=True)
class Entry:
    builder: Builder
    head: str  # dotted path of the final nn.Linear
    # The module Grad-CAM hooks: the last block whose feature maps still have a spatial layout,
    # as a dotted path (integers index a Sequential, -1 its last child): ResNet ``layer4.-1``,
    # GoogLeNet ``inception5b``, EfficientNet-B0 ``features.-1`` (conv + BN + SiLU),
    # EfficientNet-Lite0 ``bn2`` (BN + ReLU6 after conv_head).
    gradcam_layer: str
    family: str
    # Dotted paths of the blocks whose outputs the ``layers`` trust detector summarises, from
    # the input end (each block's channel means and standard deviations).
    stages: tuple[str, ...] = ()


_REGISTRY: dict[str, Entry] = {}


def register_model(
    name: str, *, head: str, gradcam_layer: str, family: str, stages: tuple[str, ...] = ()
) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = Entry(fn, head, gradcam_layer, family, stages)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise MedxferError(
            f"unknown architecture {name!r}", f"use one of: {', '.join(list_models())}"
        )
    return _REGISTRY[name]


def gradcam_target(model: nn.Module, arch: str) -> nn.Module:
    """The module of ``model`` that Grad-CAM hooks for ``arch`` (its ``gradcam_layer``)."""
    module: nn.Module = model
    for part in entry(arch).gradcam_layer.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def replace_head(model: nn.Module, path: str, num_classes: int, dropout: float) -> None:
    """Swap the final Linear at ``path`` for a fresh one with ``num_classes`` outputs."""
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    leaf = path.rsplit(".", 1)[-1]
    old = parent.get_submodule(leaf)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"head {path} is {type(old).__name__}, expected Linear")
    new = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(new.weight, std=0.01)  # small init: the pretrained features dominate at first
    nn.init.zeros_(new.bias)
    setattr(parent, leaf, new)
    if dropout >= 0:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        if hasattr(model, "drop_rate"):
            model.drop_rate = dropout  # type: ignore[assignment]


def load_state_dict_file(model: nn.Module, path: Path, arch: str) -> None:
    """Load a user's state dict (or a medxfer checkpoint) and say clearly when it does not fit."""
    if not path.exists():
        raise MedxferError(
            f"weights file {path} does not exist", "use model.weights=imagenet, none, or a path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MedxferError(f"cannot load weights file {path}: {err}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        saved_arch = obj.get("meta", {}).get("arch") if isinstance(obj.get("meta"), dict) else None
        if saved_arch and saved_arch != arch:
            raise MedxferError(
                f"checkpoint {path} is for {saved_arch!r}, not {arch!r}",
                f"set model.arch={saved_arch} or choose a checkpoint trained with {arch}",
            )
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise MedxferError(f"{path} does not hold a state dict")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in obj]
    wrong = [k for k in own if k in obj and obj[k].shape != own[k].shape]
    if len(missing) > len(own) // 2:
        raise MedxferError(
            f"weights file {path} does not fit {arch}: {len(missing)} of {len(own)} tensors "
            "are missing",
            "check model.arch; the file was made for another architecture",
        )
    # A different number of classes only changes the head: keep the fresh head then.
    obj = {k: v for k, v in obj.items() if k in own and k not in wrong}
    if missing or wrong:
        head_only = all(k.split(".")[0] in {"fc", "classifier", "head"} for k in missing + wrong)
        if not head_only:
            raise MedxferError(
                f"weights file {path} does not fit {arch}: "
                f"{len(missing)} missing and {len(wrong)} mis-shaped tensors (e.g. "
                f"{(missing + wrong)[0]})",
                "check model.arch; the file was made for another architecture",
            )
    model.load_state_dict(obj, strict=False)


def create_model(
    arch: str, *, weights: str = "imagenet", num_classes: int, dropout: float = -1.0
) -> Built:
    """Build ``arch`` with ``weights`` (imagenet | none | path) and a ``num_classes`` head."""
    e = entry(arch)
    if num_classes < 2:
        raise MedxferError(f"num_classes must be at least 2, got {num_classes}")
    pretrained = weights == "imagenet"
    # A builder returns its ImageNet weights' preprocessing whether or not it loads them, so a
    # state dict file (fine-tuned from those weights) is used with that same preprocessing.
    model, pre = e.builder(pretrained)
    replace_head(model, e.head, num_classes, dropout)
    if weights not in ("imagenet", "none"):
        load_state_dict_file(model, Path(weights), arch)
    head_modules = [e.head]
    return Built(model, pre, head_modules, arch, weights)
