"""One GAN: generator, critic, their optimizers, the EMA copy, and one training step.

The critic is the WGAN-GP's (``gan.critic=plain``, the paper's) or a head on frozen pretrained
features trained with the hinge loss (``gan.critic=projected``, medxfer.gan.projected).

Step ``t`` draws all its randomness (real batches, flips, z, interpolation weights) from a
generator seeded by (seed, t), so a run resumed from the checkpoint of step ``k`` replays steps
k+1... exactly as an uninterrupted run does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from medxfer.config import GanConfig
from medxfer.gan.augment import diff_augment
from medxfer.gan.data import GanData, to_unit
from medxfer.gan.losses import critic_loss, generator_loss, gradient_penalty, mode_seeking_loss
from medxfer.gan.networks import Critic, Generator, build_pair
from medxfer.gan.projected import ProjectedCritic, hinge_critic_loss


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class GanLoop:
    """One GAN (conditional over ``n_classes``, or unconditional when it is 1) and its state."""

    def __init__(
        self,
        gc: GanConfig,
        data: GanData,
        images: torch.Tensor,
        labels: torch.Tensor,
        n_classes: int,
        device: torch.device,
        hflip: bool,
    ) -> None:
        torch.manual_seed(gc.seed)
        self.gc, self.device, self.hflip = gc, device, hflip
        self.images, self.labels = images.to(device), labels.to(device)
        self.g, plain = build_pair(
            image_size=gc.image_size,
            channels=data.channels,
            n_classes=n_classes,
            z_dim=gc.z_dim,
            width=gc.width,
        )
        self.projected = gc.critic == "projected"
        self.d: Critic | ProjectedCritic = plain
        if self.projected:  # frozen Lite0 features, hinge loss, no gradient penalty
            self.d = ProjectedCritic(
                image_size=gc.image_size, channels=data.channels, n_classes=n_classes
            )
        self.g.to(device)
        self.d.to(device)
        self.ema = copy.deepcopy(self.g).eval() if gc.ema > 0 else None
        betas = (gc.beta1, gc.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=gc.lr, betas=betas)
        trained = [p for p in self.d.parameters() if p.requires_grad]
        self.opt_d = torch.optim.Adam(trained, lr=gc.lr, betas=betas)
        self.step, self.seconds, self.history = 0, 0.0, list[dict[str, float]]()

    def _real(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.images), (self.gc.batch_size,), generator=g)
        flip = torch.rand(self.gc.batch_size, generator=g) < 0.5
        idx = idx.to(self.device)
        x = to_unit(self.images[idx])
        if self.hflip:
            x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(3), x)
        return x, self.labels[idx]

    def _z(self, g: torch.Generator) -> torch.Tensor:
        return torch.randn(self.gc.batch_size, self.gc.z_dim, generator=g).to(self.device)

    def train_step(self) -> dict[str, float]:
        g = step_generator(self.gc.seed, self.step)
        for _ in range(self.gc.n_critic):
            real, y = self._real(g)
            with torch.no_grad():
                fake = self.g(self._z(g), y)
            if self.gc.diffaugment:  # the same augmentation before every critic call
                real, fake = diff_augment(real, g), diff_augment(fake, g)
            if self.projected:
                loss, w = hinge_critic_loss(self.d(real, y), self.d(fake, y))
                gp = torch.zeros((), device=self.device)
            else:
                loss, w = critic_loss(self.d(real, y), self.d(fake, y))
                gp = gradient_penalty(self.d, real, fake, y, weight=self.gc.gp_weight, generator=g)
            self.opt_d.zero_grad(set_to_none=True)
            (loss + gp).backward()
            self.opt_d.step()
        _, y = self._real(g)  # labels drawn with the data's class frequencies
        z = self._z(g)
        if self.gc.diversity > 0:  # two noise vectors per label: the halves share their labels
            half = len(y) // 2
            y = torch.cat([y[:half], y[:half], y[2 * half :]])
        fake = self.g(z, y)
        ms = mode_seeking_loss(fake, z) if self.gc.diversity > 0 else fake.new_zeros(())
        if self.gc.diffaugment:  # differentiable: the generator learns through it
            fake = diff_augment(fake, g)
        g_loss = generator_loss(self.d(fake, y)) + self.gc.diversity * ms
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        if self.ema is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.g.parameters(), strict=True):
                    pe.lerp_(p, 1.0 - self.gc.ema)
                for be, b in zip(self.ema.buffers(), self.g.buffers(), strict=True):
                    be.copy_(b)
        self.step += 1
        row = {
            "step": self.step,
            "critic_loss": float((loss + gp).detach()),
            "wasserstein": float(w),
            "gp": float(gp.detach()),
            "g_loss": float(g_loss.detach()),
        }
        if self.gc.diversity > 0:
            row["mode_seeking"] = float(ms.detach())
        self.history.append(row)
        return row

    def final(self) -> Generator:
        return (self.ema if self.ema is not None else self.g).eval()

    def state(self, fingerprint: str) -> dict[str, Any]:
        return {
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "fingerprint": fingerprint,
        }

    def load(self, st: dict[str, Any]) -> None:
        self.g.load_state_dict(st["g"])
        self.d.load_state_dict(st["d"])
        if self.ema is not None and st["ema"] is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.step, self.seconds, self.history = st["step"], st["seconds"], st["history"]
