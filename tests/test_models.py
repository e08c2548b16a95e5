from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from medxfer.errors import MedxferError
from medxfer.models import backbones, create_model, list_models
from medxfer.models.registry import entry, gradcam_target


def test_registry_lists_the_paper_backbones() -> None:
    assert {"googlenet", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_lite0"} <= set(
        list_models()
    )


@pytest.mark.parametrize("arch", list_models())
def test_builds_forward_backward_head_size(arch: str) -> None:
    torch.manual_seed(0)
    built = create_model(arch, weights="none", num_classes=3)
    model = built.model.train()
    maps: list[torch.Tensor] = []  # what Grad-CAM hooks: spatial feature maps
    gradcam_target(model, arch).register_forward_hook(lambda _m, _i, o: maps.append(o))
    stages: list[torch.Tensor] = []  # what the `layers` trust detector summarises
    for path in entry(arch).stages:
        model.get_submodule(path).register_forward_hook(lambda _m, _i, o: stages.append(o))
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert len(maps) == 1 and maps[0].dim() == 4
    assert len(stages) == len(entry(arch).stages) >= 4 and all(s.dim() == 4 for s in stages)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)  # googlenet: no aux tuple
    out.sum().backward()
    head = model.get_submodule(built.head[0])
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert head.weight.grad is not None
    assert len(built.preprocess.mean) == 3


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_offline_imagenet_weights_load(arch: str) -> None:
    built = create_model(arch, weights="imagenet", num_classes=4)
    import timm

    ref = timm.create_model(arch, num_classes=4)
    sd, rsd = built.model.state_dict(), ref.state_dict()
    # the stem differs from a random init: the checkpoint was loaded
    assert not torch.equal(sd["conv_stem.weight"], rsd["conv_stem.weight"])
    assert built.preprocess.mean == (0.5, 0.5, 0.5)
    assert arch.removeprefix("efficientnet_").replace("_", "-") in built.preprocess.source


def test_offline_imagenet_says_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    with pytest.raises(MedxferError) as err:
        backbones.fetch_imagenet_state_dict("resnet18")
    text = str(err.value)
    assert "resnet18-f37072fd.pth" in text and "checkpoints" in text


def test_unknown_arch() -> None:
    with pytest.raises(MedxferError, match="resnet18"):
        create_model("resnet9000", weights="none", num_classes=2)


def test_state_dict_path_roundtrip_and_wrong_model(tmp_path: Path) -> None:
    a = create_model("resnet18", weights="none", num_classes=3)
    torch.save(a.model.state_dict(), tmp_path / "r18.pt")
    b = create_model("resnet18", weights=str(tmp_path / "r18.pt"), num_classes=3)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    with pytest.raises(MedxferError, match="does not fit"):
        create_model("efficientnet_b0", weights=str(tmp_path / "r18.pt"), num_classes=3)
    ckpt = {"model": a.model.state_dict(), "meta": {"arch": "resnet18"}}
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(MedxferError, match="is for 'resnet18'"):
        create_model("resnet50", weights=str(tmp_path / "best.pt"), num_classes=3)
