"""Train a WGAN-GP on the training split, resumably; write ``generator.pt`` when done.

The loop, per generator step ``t`` (all randomness from a generator seeded by (seed, t), so a
run resumed from the checkpoint of step ``k`` replays steps k+1... exactly):

1. ``n_critic`` times: draw a real batch (and its labels), fake = G(z, labels); minimise
   D(fake) - D(real) + gp_weight * gradient_penalty over the critic.
2. Draw labels and z; minimise -D(G(z, y)) over the generator; update the EMA copy.
3. Every ``checkpoint_every`` steps save ``state.pt``; every ``sample_every`` steps a grid.

Stops after ``gan.steps`` generator steps or ``gan.max_minutes`` of training (summed over
resumes). ``conditional=false`` trains one unconditional GAN per minority class instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medxfer.config import ExperimentConfig, GanConfig
from medxfer.errors import MedxferError
from medxfer.gan.data import GanData, classes_to_model, load_train_split, resolve_device, to_unit
from medxfer.gan.losses import critic_loss, generator_loss, gradient_penalty
from medxfer.gan.networks import Generator, build_pair, check_image_size
from medxfer.train.checkpoint import atomic_save, atomic_write_json, load_checkpoint

StepCallback = Callable[[int, dict[str, float]], None]
console = Console(stderr=True)
_RUN_KEYS = ("steps", "max_minutes", "sample_every", "checkpoint_every", "device")


def gan_fingerprint(cfg: ExperimentConfig) -> str:
    """What the trained generator depends on (not the budget, the device or the cadence)."""
    g = {k: v for k, v in asdict(cfg.gan).items() if k not in _RUN_KEYS}
    d = {k: v for k, v in asdict(cfg.data).items() if k not in ("synthetic", "synthetic_ratio")}
    blob = json.dumps({"gan": g, "data": d, "hflip": cfg.augment.hflip}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _step_generator(seed: int, step: int) -> torch.Generator:
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
        self.g, self.d = build_pair(
            image_size=gc.image_size,
            channels=data.channels,
            n_classes=n_classes,
            z_dim=gc.z_dim,
            width=gc.width,
        )
        self.g.to(device)
        self.d.to(device)
        self.ema = copy.deepcopy(self.g).eval() if gc.ema > 0 else None
        betas = (gc.beta1, gc.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=gc.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=gc.lr, betas=betas)
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
        g = _step_generator(self.gc.seed, self.step)
        for _ in range(self.gc.n_critic):
            real, y = self._real(g)
            with torch.no_grad():
                fake = self.g(self._z(g), y)
            loss, w = critic_loss(self.d(real, y), self.d(fake, y))
            gp = gradient_penalty(self.d, real, fake, y, weight=self.gc.gp_weight, generator=g)
            self.opt_d.zero_grad(set_to_none=True)
            (loss + gp).backward()
            self.opt_d.step()
        _, y = self._real(g)  # labels drawn with the data's class frequencies
        g_loss = generator_loss(self.d(self.g(self._z(g), y), y))
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


def _save_grid(loop: GanLoop, path: Path, n_classes: int, per_row: int = 8) -> None:
    from torchvision.utils import save_image

    g = _step_generator(loop.gc.seed, -1)  # the same z at every grid: progress is comparable
    z = torch.randn(per_row * n_classes, loop.gc.z_dim, generator=g).to(loop.device)
    y = torch.arange(n_classes).repeat_interleave(per_row).to(loop.device)
    gen = loop.final()
    with torch.no_grad():
        x = gen(z, y if n_classes > 1 else None)
    loop.g.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((x.float().cpu() + 1) / 2, path, nrow=per_row)


def _run_loop(
    loop: GanLoop,
    folder: Path,
    fingerprint: str,
    n_classes: int,
    label: str,
    on_step: StepCallback | None,
) -> str:
    """Train until the step or time budget is used; return why it stopped."""
    gc, state_path = loop.gc, folder / "state.pt"
    budget = gc.max_minutes * 60.0 if gc.max_minutes > 0 else float("inf")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"WGAN-GP {label}", total=gc.steps, completed=loop.step, stats="")
        while loop.step < gc.steps and loop.seconds < budget:
            t0 = time.perf_counter()
            loop.g.train()
            row = loop.train_step()
            loop.seconds += time.perf_counter() - t0
            stats = f"critic {row['critic_loss']:.3f}  W {row['wasserstein']:.3f}"
            progress.update(task, completed=loop.step, stats=stats)
            if loop.step % gc.sample_every == 0:
                _save_grid(loop, folder / "samples" / f"step_{loop.step:06d}.png", n_classes)
            if loop.step % gc.checkpoint_every == 0:
                atomic_save(loop.state(fingerprint), state_path)
            if on_step is not None:
                on_step(loop.step, row)
    atomic_save(loop.state(fingerprint), state_path)
    atomic_write_json(loop.history, folder / "history.json")
    _save_grid(loop, folder / "samples" / "final.png", n_classes)
    return "steps" if loop.step >= gc.steps else "max_minutes"


def _train_one(
    cfg: ExperimentConfig,
    data: GanData,
    folder: Path,
    classes: list[str],
    resume: bool,
    on_step: StepCallback | None,
) -> tuple[Generator, dict[str, Any]]:
    """Train one GAN on the images of ``classes`` (conditional when there are several)."""
    keep = torch.isin(data.labels, torch.tensor([data.classes.index(c) for c in classes]))
    labels = data.labels[keep]
    remap = {data.classes.index(c): i for i, c in enumerate(classes)}  # dataset -> GAN index
    labels = labels.apply_(remap.__getitem__) if len(classes) > 1 else torch.zeros_like(labels)
    device = resolve_device(cfg.gan.device)
    loop = GanLoop(
        cfg.gan, data, data.images[keep], labels, len(classes), device, cfg.augment.hflip
    )
    fp = gan_fingerprint(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.pt"
    if resume and state_path.exists():
        st = load_checkpoint(state_path)
        if st["fingerprint"] != fp:
            raise MedxferError(
                f"{folder} holds a GAN trained with other settings",
                "use another output folder, or --force to start again",
            )
        loop.load(st)
        console.print(f"resuming GAN {folder} after step {loop.step}")
    label = "conditional" if len(classes) > 1 else classes[0]
    stopped = _run_loop(loop, folder, fp, len(classes), label, on_step)
    info = {
        "steps": loop.step,
        "seconds": round(loop.seconds, 1),
        "stopped_by": stopped,
        "device": str(device),
        "last": loop.history[-1] if loop.history else None,
    }
    return loop.final(), info


def train_gan(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = True,
    on_step: StepCallback | None = None,
) -> Path:
    """Train on cfg's training split into ``run_dir``; return ``run_dir/generator.pt``.

    A finished folder (``generator.pt`` present) is returned as it is when ``resume``.
    ``on_step(step, row)`` is called after every generator step (and its checkpoint).
    """
    check_image_size(cfg.gan.image_size)
    final = run_dir / "generator.pt"
    if resume and final.exists():
        return final
    data = load_train_split(cfg, cfg.gan.image_size)
    targets = classes_to_model(data, conditional=cfg.gan.conditional, min_images=cfg.gan.min_images)
    run_dir.mkdir(parents=True, exist_ok=True)
    gens: dict[str, dict[str, torch.Tensor]] = {}
    runs: dict[str, Any] = {}
    if cfg.gan.conditional:
        gen, runs["*"] = _train_one(cfg, data, run_dir, targets, resume, on_step)
        gens["*"] = gen.state_dict()
    else:
        for c in targets:
            gen, runs[c] = _train_one(cfg, data, run_dir / f"class_{c}", [c], resume, on_step)
            gens[c] = gen.state_dict()
    payload = {
        "kind": "medxfer-wgan-gp",
        "mode": "conditional" if cfg.gan.conditional else "per_class",
        "generators": {k: {n: t.cpu() for n, t in v.items()} for k, v in gens.items()},
        "classes": data.classes,
        "modelled": targets,
        "train_counts": data.counts,
        "image_size": cfg.gan.image_size,
        "channels": data.channels,
        "z_dim": cfg.gan.z_dim,
        "width": cfg.gan.width,
        "color": data.color,
        "resize": data.resize,
        "fingerprint": gan_fingerprint(cfg),
        "runs": runs,
        "config": cfg.to_dict(),
    }
    atomic_save(payload, final)
    atomic_write_json({k: v for k, v in payload.items() if k != "generators"}, run_dir / "gan.json")
    console.print(f"generator: {final}")
    return final
