"""WGAN-GP losses (Gulrajani et al. 2017) as pure functions of a critic and tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

CriticFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def gradient_penalty(
    critic: CriticFn,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    weight: float = 10.0,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``weight * mean_i (||grad_x D(x_i)||_2 - 1)^2`` at ``x_i = eps_i real_i + (1-eps_i) fake_i``.

    ``eps`` (B,) ~ U(0, 1) unless given. The graph is kept (``create_graph``) so the penalty
    trains the critic; it is a square, hence never negative.
    """
    b = real.shape[0]
    if eps is None:
        eps = torch.rand(b, generator=generator).to(real.device, real.dtype)
    e = eps.view(b, *([1] * (real.dim() - 1)))
    x = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    scores = critic(x, labels)
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return weight * ((norms - 1.0) ** 2).mean()


def critic_loss(
    real_scores: torch.Tensor, fake_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise without the penalty, Wasserstein estimate E[D(real)] - E[D(fake)])."""
    w = real_scores.mean() - fake_scores.mean()
    return -w, w.detach()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.mean()


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's term (Mao et al. 2019) for a batch whose halves share their labels: 1 / (mean
    absolute image difference / mean absolute z difference between the halves). Small when
    different noise makes different images; large when the generator ignores z."""
    half = len(fake) // 2
    images = (fake[:half] - fake[half : 2 * half]).abs().mean()
    noise = (z[:half] - z[half : 2 * half]).abs().mean()
    return 1.0 / (images / noise + eps)
