"""Train a WGAN-GP on the training split, resumably; write ``generator.pt`` when done.

The loop, per generator step ``t`` (all randomness from a generator seeded by (seed, t), so a
run resumed from the checkpoint of step ``k`` replays steps k+1... exactly):

1. ``n_critic`` times: draw a real batch (and its labels), fake = G(z, labels); with
   ``gan.diffaugment`` both go through DiffAugment (medxfer.gan.augment); minimise
   D(fake) - D(real) + gp_weight * gradient_penalty over the critic.
2. Draw labels and z; minimise -D(aug(G(z, y))) over the generator; update the EMA copy.
3. Every ``checkpoint_every`` steps save ``state.pt``; every ``sample_every`` steps a grid.

Stops after ``gan.steps`` generator steps or ``gan.max_minutes`` of training (summed over
resumes). ``conditional=false`` trains one unconditional GAN per minority class instead.
``gan.recipe`` (RECIPES) fills the keys still at their defaults with a named schedule.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medxfer.config import ExperimentConfig, GanConfig, with_values
from medxfer.errors import MedxferError
from medxfer.gan.data import GanData, classes_to_model, load_train_split, resolve_device
from medxfer.gan.loop import GanLoop, step_generator
from medxfer.gan.networks import Generator, check_image_size
from medxfer.runs import make_run_dir
from medxfer.train.checkpoint import atomic_save, atomic_write_json, load_checkpoint

StepCallback = Callable[[int, dict[str, float]], None]
console = Console(stderr=True)
_RUN_KEYS = ("steps", "max_minutes", "sample_every", "checkpoint_every", "device")


RECIPES: dict[str, dict[str, Any]] = {  # documented at GanConfig.recipe
    "cpu-64": {"image_size": 64, "width": 16, "batch_size": 32, "n_critic": 5, "ema": 0.995,
               "steps": 100_000, "max_minutes": 60.0, "diffaugment": True,
               "sample_every": 250, "checkpoint_every": 50},
    "gpu-128": {"image_size": 128, "width": 64, "batch_size": 64, "n_critic": 5, "ema": 0.999,
                "steps": 20_000, "max_minutes": 60.0, "diffaugment": True,
                "sample_every": 1000, "checkpoint_every": 500, "device": "auto"},
    "cpu-64-projected": {"image_size": 64, "critic": "projected", "width": 32, "batch_size": 32,
                         "n_critic": 1, "lr": 2e-4, "beta2": 0.99, "ema": 0.995,
                         "diversity": 1.0, "steps": 100_000, "max_minutes": 60.0,
                         "diffaugment": True, "sample_every": 250, "checkpoint_every": 50},
}  # fmt: skip


def with_recipe(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``gan.recipe``'s values in every gan key still at its default."""
    name = cfg.gan.recipe
    if not name:
        return cfg
    if name not in RECIPES:
        raise MedxferError(f"gan.recipe={name!r} is unknown", f"use one of {', '.join(RECIPES)}")
    default = GanConfig()
    unset = {f"gan.{key}": value for key, value in RECIPES[name].items()
             if getattr(cfg.gan, key) == getattr(default, key)}  # fmt: skip
    return with_values(cfg, unset)


def gan_fingerprint(cfg: ExperimentConfig) -> str:
    """What the trained generator depends on (not the budget, the device, the cadence or the
    gate, which judges the samples after training)."""
    cfg = with_recipe(cfg)
    skip = (*_RUN_KEYS, "recipe", "gate_fallback", "gate_images", "gate_size")
    g = {k: v for k, v in asdict(cfg.gan).items() if k not in skip}
    for key, before in (("critic", "plain"), ("diversity", 0.0)):
        if g[key] == before:  # added later: generators trained before keep their hash
            g.pop(key)
    d = {k: v for k, v in asdict(cfg.data).items() if k not in ("synthetic", "synthetic_ratio")}
    if not d["group_near_duplicates"]:  # added later: generators trained before keep their hash
        d.pop("group_near_duplicates")
    blob = json.dumps({"gan": g, "data": d, "hflip": cfg.augment.hflip}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_gan_config(gc: GanConfig) -> None:
    """Settings a user can get wrong, refused before any data is read."""
    check_image_size(gc.image_size)
    if gc.steps < 1 or gc.n_critic < 1 or gc.lr <= 0 or gc.batch_size < 2:
        raise MedxferError(
            "gan.steps, gan.n_critic and gan.lr must be positive and gan.batch_size at least 2",
            "e.g. gan.steps=5000 gan.n_critic=5 gan.lr=1e-4 gan.batch_size=64",
        )
    if gc.gate_fallback not in ("oversample", "class_weight", "none"):
        raise MedxferError(
            f"gan.gate_fallback={gc.gate_fallback!r} is not a strategy",
            "use oversample, class_weight or none",
        )
    if gc.diversity < 0:
        raise MedxferError(f"gan.diversity={gc.diversity} is negative", "use 0 (off) or e.g. 1")
    if gc.sample_every < 1 or gc.checkpoint_every < 1 or not 0 <= gc.ema < 1:
        raise MedxferError(
            "gan.sample_every and gan.checkpoint_every must be positive and gan.ema in [0, 1)",
            "e.g. gan.ema=0.999 or gan.ema=0 (off)",
        )


def _save_grid(loop: GanLoop, path: Path, n_classes: int, per_row: int = 8) -> None:
    from torchvision.utils import save_image

    g = step_generator(loop.gc.seed, -1)  # the same z at every grid: progress is comparable
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
        name = "WGAN-GP" if gc.critic == "plain" else "GAN, projected critic,"
        task = progress.add_task(f"{name} {label}", total=gc.steps, completed=loop.step, stats="")
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
        console.print(f"resuming GAN {escape(str(folder))} after step {loop.step}", soft_wrap=True)
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
    cfg = with_recipe(cfg)
    check_gan_config(cfg.gan)
    final = run_dir / "generator.pt"
    if resume and final.exists():
        return final
    data = load_train_split(cfg, cfg.gan.image_size)
    targets = classes_to_model(data, conditional=cfg.gan.conditional, min_images=cfg.gan.min_images)
    make_run_dir(run_dir, "gan")
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
