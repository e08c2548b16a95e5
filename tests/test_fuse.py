"""BatchNorm folding for inference: same outputs, fewer modules, and no fold when the
registration order lies about the data flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medxfer.evaluate.predict import folded_for_inference
from medxfer.models import create_model
from medxfer.models.fuse import fold_batchnorm


def _randomize_batchnorm(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0", "efficientnet_b0"])
def test_folding_keeps_the_outputs(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, weights="none", num_classes=3).model.eval()
    _randomize_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    folded, n = fold_batchnorm(model, x)
    assert n == n_bn > 0  # every BatchNorm of these backbones follows its convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original kept
    with torch.no_grad():
        y = torch.randn(4, 3, 96, 96)
        torch.testing.assert_close(folded(y), model(y), rtol=1e-4, atol=1e-4)
    meta = {"image_size": 64}
    ready, n2 = folded_for_inference(model, meta)
    assert n2 == n_bn
    conv = next(m for m in ready.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


class _Misleading(nn.Module):
    """A BatchNorm registered right after a convolution but fed by the input, not by it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bn(x)


def test_a_fold_that_changes_the_outputs_is_discarded() -> None:
    model = _Misleading().eval()
    _randomize_batchnorm(model)
    folded, n = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    assert n == 0 and folded is model and isinstance(model.bn, nn.BatchNorm2d)
