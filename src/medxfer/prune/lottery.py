"""Iterative magnitude pruning with rewinding (the lottery ticket procedure) on top of ``fit``.

Level 0 trains the dense network and keeps its starting point (``init.pt``: ImageNet backbone +
freshly initialised head) and, for late rewinding, its state after K epochs. Level k prunes the
previous ticket's final weights (global magnitude; or the epoch validation chose, with
``weights="best"``), rewinds the survivors and retrains under
the mask. Controls that tell whether the ticket is special: the same mask with randomly
re-initialised weights, and a random mask with the same per-layer sparsity on the rewound
weights; optionally the classic baseline: keep the pruned trained weights and fine-tune, and
the same fine-tune with the dense level-0 model as a distillation teacher (``distill``). With
``ticket_distill`` the ticket and its controls retrain with that teacher too (a distilled
lottery: still one schedule and one teacher for all three, so they differ only in weights or
mask).
Ticket and controls share one schedule (with ``epoch:K`` all retrain epochs K..E-1 from the
LR at epoch K), so they differ only in their weights or their mask.

Every run is a normal run folder (``level_k/<kind>/``: config, checkpoints, metrics.json) plus
``mask.pt``; complete runs are skipped and interrupted ones resume, so a killed lottery is
continued by running the same command again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from medxfer.config import ExperimentConfig, with_values
from medxfer.errors import MedxferError
from medxfer.models import create_model
from medxfer.models.registry import entry
from medxfer.prune.magnitude import attach, fold_reparam, plain_state_dict, prune_count
from medxfer.prune.mask import Mask, random_like
from medxfer.prune.plan import (
    Settings,
    bind_folder,
    kept_schedule,
    lottery_config,
    make_settings,
)
from medxfer.runs import is_complete
from medxfer.train.callbacks import Callback
from medxfer.train.checkpoint import (
    atomic_save,
    atomic_write_json,
    load_checkpoint,
    shipped_weights,
)
from medxfer.train.distill import Teacher
from medxfer.train.loop import fit, refuse_average
from medxfer.train.record import check_reuse
from medxfer.train.trained import Evaluate

console = Console(stderr=True)
State = dict[str, torch.Tensor]


def run_dir(out_dir: Path, level: int, kind: str) -> Path:
    return out_dir / f"level_{level}" / kind


def trained_state(run: Path, weights: str = "last") -> State:
    """The weights of a finished run (plain layout): its final epoch (``last``) or the epoch
    validation chose (``best``); a clear error when there are none."""
    if not (run / "last.pt").exists():
        raise MedxferError(f"{run} was never trained (no last.pt)", "train it before pruning it")
    if not is_complete(run):
        raise MedxferError(f"training of {run} did not finish", "run the same command again")
    return fold_reparam(shipped_weights(load_checkpoint(run / f"{weights}.pt")))


def _train(
    cfg: ExperimentConfig,
    run: Path,
    callbacks: Sequence[Callback],
    evaluate: Evaluate,
    start_epoch: int = 0,
    teacher: Teacher | None = None,
) -> None:
    """Train (or resume) ``run`` with ``callbacks`` (the run's own first, which prepares the
    model), then evaluate it; a complete run is only checked."""
    if is_complete(run):
        check_reuse(cfg, run)
        console.print(f"already complete: {escape(str(run))}", soft_wrap=True)
        return
    trained = fit(cfg, run, resume=(run / "last.pt").exists(), callbacks=callbacks,
                  start_epoch=start_epoch, teacher=teacher)  # fmt: skip
    evaluate(trained, warn_shift=False, trust=False)


def blank_model(arch: str, state: State) -> nn.Module:
    """``arch`` without weights, its head sized for ``state`` (as many classes as it has)."""
    n_classes = state[f"{entry(arch).head}.weight"].shape[0]
    return create_model(arch, weights="none", num_classes=n_classes).model


class SaveInit(Callback):
    """``fit``'s callback for a dense run that a lottery may later adopt as its level 0: keeps
    the starting weights (ImageNet backbone + fresh head) in ``run/init.pt``."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def prepare_model(self, model: nn.Module) -> None:
        if not (self.run / "init.pt").exists():
            self.run.mkdir(parents=True, exist_ok=True)
            atomic_save(plain_state_dict(model), self.run / "init.pt")


def adopt_dense(cfg: ExperimentConfig, out_dir: Path, s: Settings, dense: Path) -> bool:
    """Use a finished dense run (trained with ``SaveInit``) as level 0 instead of training the
    same network again. Only when it trained exactly this config and rewinding needs nothing
    but its start and end (``init`` or ``lr``); returns whether it was adopted."""
    from medxfer.config import load_config

    run = run_dir(out_dir, 0, "dense")
    if is_complete(run):
        return True
    if s.rewind_epoch or not is_complete(dense) or not (dense / "init.pt").exists():
        return False
    if load_config(dense / "config.yaml").fingerprint() != cfg.fingerprint():
        return False
    if run.exists():
        shutil.rmtree(run)  # a half-copied or half-trained level 0
    tmp = run.with_name("dense.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(dense, tmp)
    init: State = load_checkpoint(dense / "init.pt")
    exclude = [] if s.include_head else [entry(cfg.model.arch).head]
    Mask.dense(blank_model(cfg.model.arch, init), exclude).save(tmp / "mask.pt")  # shapes only
    atomic_write_json({"adopted_from": str(dense)}, tmp / "adopted.json")
    atomic_save(init, out_dir / "init.pt")
    tmp.rename(run)
    console.print(f"level 0: adopted the finished dense run {dense}")
    return True


class _Dense(Callback):
    """Level 0's callback: saves the dense mask (shapes only) and ``init.pt`` before training
    and, for ``epoch:K``, the weights after epoch K in ``rewind_file``."""

    def __init__(
        self, run: Path, out_dir: Path, exclude: list[str], k: int, rewind_file: Path
    ) -> None:
        self.run, self.out_dir, self.exclude = run, out_dir, exclude
        self.k, self.rewind_file = k, rewind_file
        self.model: nn.Module | None = None  # the network fit trains, once prepared

    def prepare_model(self, model: nn.Module) -> None:
        self.model = model
        if not (self.run / "mask.pt").exists():
            Mask.dense(model, self.exclude).save(self.run / "mask.pt")
        if not (self.out_dir / "init.pt").exists():
            atomic_save(plain_state_dict(model), self.out_dir / "init.pt")

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        if self.k and epoch == self.k - 1:
            assert self.model is not None  # fit prepares the model before any epoch
            atomic_save(plain_state_dict(self.model), self.rewind_file)


def train_dense(
    cfg: ExperimentConfig,
    out_dir: Path,
    s: Settings,
    callbacks: Sequence[Callback],
    evaluate: Evaluate,
) -> None:
    """Level 0: the dense run; keeps ``init.pt`` and, for ``epoch:K``, ``rewind_epochK.pt``."""
    run, k = run_dir(out_dir, 0, "dense"), s.rewind_epoch
    rewind_file = out_dir / f"rewind_epoch{k}.pt"
    if k and not rewind_file.exists() and _past_epoch(run, k - 1):
        shutil.rmtree(run)  # killed between last.pt and the rewind save (or stopped early)
    exclude = [] if s.include_head else [entry(cfg.model.arch).head]
    _train(cfg, run, (_Dense(run, out_dir, exclude, k, rewind_file), *callbacks), evaluate)
    if k and not rewind_file.exists():
        raise MedxferError(
            f"level 0 ended before epoch {k}, so there is no state to rewind to",
            "turn off train.early_stopping or choose a smaller K in --rewind epoch:K",
        )


def _past_epoch(run: Path, epoch: int) -> bool:
    """Whether ``run`` has finished ``epoch`` (0-based) already."""
    if not (run / "last.pt").exists():
        return False
    return is_complete(run) or load_checkpoint(run / "last.pt")["epoch"] >= epoch


def rewind_state(out_dir: Path, level: int, s: Settings) -> State:
    """Where the ticket of ``level`` restarts from: init, epoch K, or the previous level's
    trained weights (final or best epoch, as ``s.weights``)."""
    if s.rewind == "lr":
        return trained_state(source_dir(out_dir, level), s.weights)
    name = "init.pt" if s.rewind == "init" else f"rewind_epoch{s.rewind_epoch}.pt"
    state: State = load_checkpoint(out_dir / name)
    return state


def random_state(model: nn.Module, cfg: ExperimentConfig, seed: int) -> State:
    """Fresh random weights for ``model``'s architecture (no ImageNet), seeded per level."""
    head = model.get_submodule(entry(cfg.model.arch).head)
    assert isinstance(head, nn.Linear)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(cfg.model.arch, weights="none", num_classes=head.out_features)
    return fresh.model.state_dict()


def source_dir(out_dir: Path, level: int) -> Path:
    """The run whose final weights level ``level`` prunes: the dense run, then each ticket."""
    return run_dir(out_dir, level - 1, "dense" if level == 1 else "ticket")


class StartMasked(Callback):
    """``fit``'s callback for a pruned run: load the starting weights (``state(model)``), then
    attach the mask (zeroing the pruned)."""

    edits_weights = True

    def __init__(self, mask: Mask, state: Callable[[nn.Module], State]) -> None:
        self.mask, self.state = mask, state

    def prepare_model(self, model: nn.Module) -> None:
        try:
            model.load_state_dict(self.state(model))
        except RuntimeError as err:
            first = str(err).splitlines()[1:2] or [str(err)]
            raise MedxferError(
                f"the starting weights do not fit the model: {first[0].strip()}",
                "the lottery folder was made with another model; use another --out or --force",
            ) from None
        attach(model, self.mask)


def _mask(path: Path, make: Callable[[], Mask]) -> Mask:
    """The mask a run was started with (resume) or a new one, saved before training starts."""
    if path.exists():
        return Mask.load(path)
    mask = make()
    mask.save(path)
    return mask


def train_level(
    cfg: ExperimentConfig,
    out_dir: Path,
    level: int,
    kept: int,
    s: Settings,
    callbacks: Sequence[Callback] = (),
    *,
    evaluate: Evaluate,
) -> None:
    """Prune, rewind and retrain the ticket of ``level``, then its controls and baseline."""
    src = source_dir(out_dir, level)

    def new_mask() -> Mask:
        prev = Mask.load(src / "mask.pt")
        return prune_count(trained_state(src, s.weights), prev, prev.kept - kept)

    mask = _mask(run_dir(out_dir, level, "ticket") / "mask.pt", new_mask)
    if mask.kept != kept:
        raise MedxferError(f"{out_dir} level {level} keeps {mask.kept} weights, expected {kept}")
    seed = cfg.train.seed * 1000 + level

    def rewound(_: nn.Module) -> State:
        return rewind_state(out_dir, level, s)

    def reinit(model: nn.Module) -> State:
        return random_state(model, cfg, seed + 500)

    def trained(_: nn.Module) -> State:
        return trained_state(src, s.weights)

    jobs: list[tuple[str, Mask, Callable[[nn.Module], State]]] = [("ticket", mask, rewound)]
    if s.controls:
        path = run_dir(out_dir, level, "random_mask") / "mask.pt"
        jobs += [
            ("random_reinit", mask, reinit),
            ("random_mask", _mask(path, lambda: random_like(mask, seed)), rewound),
        ]
    if s.finetune:
        jobs.append(("finetune", mask, trained))
    if s.distill:
        jobs.append(("distill", mask, trained))
    for kind, kind_mask, state in jobs:
        _train_pruned(cfg, out_dir, level, kind, kind_mask, state, s, callbacks, evaluate)


def _train_pruned(
    cfg: ExperimentConfig,
    out_dir: Path,
    level: int,
    kind: str,
    mask: Mask,
    state: Callable[[nn.Module], State],
    s: Settings,
    callbacks: Sequence[Callback],
    evaluate: Evaluate,
) -> None:
    run = run_dir(out_dir, level, kind)
    # the dense model teaches the distill baseline and, in a distilled lottery, every other run
    weight = {"distill": s.distill, "finetune": 0.0}.get(kind, s.ticket_distill)
    distill = {"weight": weight, "temperature": s.distill_temperature}
    if kind == "distill":  # finished or not, a run distilled otherwise is not reused
        check_run(run, distill)
    if is_complete(run):
        return
    if not (run / "mask.pt").exists():
        mask.save(run / "mask.pt")
    run_cfg, start, teacher = cfg, s.rewind_epoch, None
    if kind in ("finetune", "distill"):
        run_cfg, start = finetune_config(cfg, s.finetune_lr_scale), 0
    info: dict[str, Any] = {
        "level": level, "kind": kind, "rewind": s.rewind, "start_epoch": start,
        "sparsity": mask.sparsity, "kept": mask.kept, "total": mask.total,
        "pruned_from": source_dir(out_dir, level), "weights": s.weights,
    }  # fmt: skip
    if weight:
        info["distill"] = distill | {"teacher": run_dir(out_dir, 0, "dense")}
        teacher = dense_teacher(cfg, out_dir, s, weight)
    atomic_write_json(info, run / "prune.json")
    console.print(f"level {level} {kind}: sparsity {mask.sparsity:.4f}")
    _train(run_cfg, run, (StartMasked(mask, state), *callbacks), evaluate, start, teacher)


def check_run(run: Path, distill: dict[str, Any]) -> None:
    """A distillation run made with another weight or temperature is neither continued nor
    reported as this one."""
    path = run / "prune.json"
    old = json.loads(path.read_text()).get("distill") if path.exists() else None
    keys = ("weight", "temperature")
    if old is not None and any(old.get(k) != distill[k] for k in keys):
        raise MedxferError(
            f"{run} was distilled with weight {old.get('weight')} and temperature "
            f"{old.get('temperature')}, not {distill['weight']} and {distill['temperature']}",
            "use another --out folder, or delete that run folder to train it again",
        )


def dense_teacher(cfg: ExperimentConfig, out_dir: Path, s: Settings, weight: float) -> Teacher:
    """The dense level-0 model (final or best weights, as ``s.weights``) as the teacher of every
    level's distill run (and, with ``ticket_distill``, of its ticket and controls), its soft
    term weighted ``weight``."""
    state = trained_state(run_dir(out_dir, 0, "dense"), s.weights)
    model = blank_model(cfg.model.arch, state)
    model.load_state_dict(state)
    return Teacher(model.eval(), weight, s.distill_temperature)


def finetune_config(cfg: ExperimentConfig, lr_scale: float) -> ExperimentConfig:
    """The fine-tuning baseline: same epochs, ``lr_scale`` times the learning rate, no warm-up."""
    return with_values(cfg, {"train.lr": cfg.train.lr * lr_scale, "train.warmup_epochs": 0.0})


def run_lottery(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    evaluate: Evaluate,
    levels: int,
    fraction: float = 0.2,
    target_sparsity: float | None = None,
    rewind: str = "init",
    controls: bool = True,
    include_head: bool = False,
    finetune: bool = False,
    finetune_lr_scale: float = 0.1,
    distill: float = 0.0,
    distill_temperature: float = 4.0,
    weights: str = "last",
    ticket_distill: float = 0.0,
    callbacks: Sequence[Callback] = (),
    dense_run: Path | None = None,
) -> dict[str, Any]:
    """Run (or continue) the whole lottery in ``out_dir``; returns the ``lottery.json`` summary.

    Every run trains ``lottery_config(cfg)`` (``prune.image_size`` / ``prune.epochs`` applied).
    ``dense_run``: a finished run of that same config (made with ``SaveInit``) becomes level 0
    instead of a second dense training (see ``adopt_dense``). ``evaluate``: what tests each
    run after ``fit`` and writes its metrics.json (``medxfer.evaluate.finish.evaluate_trained``,
    passed in by the command: this layer lies below evaluation)."""
    from medxfer.prune.report import shift_lines, write_summary

    cfg = lottery_config(cfg)
    refuse_average(cfg, "set train.ema=0 for the lottery")  # before the dense run trains
    s = make_settings(
        cfg, levels=levels, fraction=fraction, target_sparsity=target_sparsity, rewind=rewind,
        controls=controls, include_head=include_head, finetune=finetune,
        finetune_lr_scale=finetune_lr_scale, distill=distill,
        distill_temperature=distill_temperature, weights=weights, ticket_distill=ticket_distill,
    )  # fmt: skip
    bind_folder(out_dir, s)
    if dense_run is None or not adopt_dense(cfg, out_dir, s, dense_run):
        train_dense(cfg, out_dir, s, callbacks, evaluate)
    kept = kept_schedule(Mask.load(run_dir(out_dir, 0, "dense") / "mask.pt").total, s)
    for level in range(1, levels + 1):
        train_level(cfg, out_dir, level, kept[level], s, callbacks, evaluate=evaluate)
    summary = write_summary(out_dir, s.levels)
    for line in shift_lines(summary):  # once per lottery; its runs do not each warn
        console.print(f"[yellow]warning:[/] {line}")
    return summary
