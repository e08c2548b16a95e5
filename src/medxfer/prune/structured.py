"""Structured L1-norm channel pruning: whole filters removed (Torch-Pruning), then fine-tuned.

Unlike the lottery's unstructured masks, this makes the network physically smaller: in every
group of coupled layers (a conv, its BatchNorm, the depthwise conv and the next layer's input
channels, the branches of a residual sum) the channels with the smallest L1 norm are removed,
the same fraction in every layer (Li et al. 2017), so dense CPU kernels do less work. The
classification head keeps its outputs. The pruned network is fine-tuned with ``fit``.
With ``structured.steps = k > 1`` the cut is reached in k equal steps, each fine-tuned
before the next one scores the channels (iterative pruning; steps 1..k-1 in ``step_<i>/``).
With ``structured.soft = s > 0`` the whole network first trains s epochs with the
channels to cut zeroed at each epoch's start and free to grow back (soft filter pruning, in
``soft/``); the cut is then made on its last weights.

    run_structured(Path("runs/brain-…"), Path("runs/brain-…-structured"), ratio=0.4)

The fine-tune run folder is a normal run (config, checkpoints, metrics.json); ``model.pt`` holds
the pruned weights and, in its meta, the recipe (ratio, steps) that rebuilds the thinner network
from the registered architecture; it reloads with ``load_structured``; ``structured.json``
compares params, MACs, latency and accuracy.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medxfer.config import ExperimentConfig, config_from_dict, load_config, with_values
from medxfer.errors import MedxferError
from medxfer.models import create_model
from medxfer.models.registry import entry
from medxfer.prune.export import measure_latency, onnxruntime_latency
from medxfer.prune.lottery import finetune_config
from medxfer.prune.magnitude import fold_reparam
from medxfer.runs import is_complete, make_run_dir
from medxfer.train.callbacks import Callback
from medxfer.train.checkpoint import atomic_save, atomic_write_json, load_checkpoint
from medxfer.train.distill import Teacher
from medxfer.train.loop import fit
from medxfer.train.record import check_reuse
from medxfer.train.trained import Evaluate

State = dict[str, torch.Tensor]
console = Console(stderr=True)
MODEL_FILE = "model.pt"
FORMAT = "medxfer-structured-v2"  # weights + the recipe of the cut
LEGACY_FORMAT = "medxfer-structured-v1"  # a pickled module (older medxfer)


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise MedxferError(
            "structured pruning needs Torch-Pruning", "pip install 'medxfer[prune]'"
        ) from None
    return torch_pruning


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise MedxferError(
            f"channel pruning ratio {ratio} is not in (0, 1)", "e.g. --ratio 0.4 (40% of channels)"
        )


def _example(model: nn.Module, image_size: int) -> torch.Tensor:
    return torch.randn(1, 3, image_size, image_size, device=next(model.parameters()).device)


def count(model: nn.Module, image_size: int) -> dict[str, int]:
    """Multiply-accumulates of one image and parameters (Torch-Pruning's counter)."""
    tp = _tp()
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model.eval(), _example(model, image_size))
    model.train(was_training)
    return {"macs": int(macs), "params": int(params)}


def prune_channels(model: nn.Module, head: str, ratio: float, image_size: int) -> nn.Module:
    """In place: remove ``ratio`` of the channels of every coupled group by L1 norm.

    Parameters keep their identity (only their data shrinks), so an optimizer built on the
    model before pruning, as ``fit`` builds it, updates the pruned tensors.
    """
    tp = _tp()
    check_ratio(ratio)
    params = {(id(m), n): p for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    was_training = model.training
    model.eval()  # tracing runs a forward: BatchNorm statistics must not move
    with warnings.catch_warnings():  # Torch-Pruning warns about layers it leaves alone
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, _example(model, image_size), importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=[model.get_submodule(head)], round_to=8,
        )  # fmt: skip
        pruner.step()
    del pruner  # its traced graph holds autograd nodes that remember the old shapes
    gc.collect()
    model.train(was_training)
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            old = params.get((id(m), name))
            if old is not None and old is not p:
                old.data = p.data  # same Parameter object, new (smaller) tensor
                setattr(m, name, old)
    return model


def zero_channels(model: nn.Module, head: str, ratio: float, image_size: int) -> int:
    """In place: zero the channels ``prune_channels`` would remove (their filters, biases and
    BatchNorm scale and shift, in every layer of each coupled group), shapes unchanged, so they
    output nothing yet keep training (soft filter pruning). Returns the channels zeroed."""
    tp = _tp()
    check_ratio(ratio)
    was_training = model.training
    model.eval()
    zeroed = 0
    with warnings.catch_warnings(), torch.enable_grad():  # tracing needs autograd
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, _example(model, image_size), importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio, ignored_layers=[model.get_submodule(head)], round_to=8,
        )  # fmt: skip
        for group in pruner.step(interactive=True):
            for i, (dep, idxs) in enumerate(group):
                if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    continue  # a consumer's input channels: they receive zeros
                zeroed += len(idxs) if i == 0 else 0
                for name in ("weight", "bias"):
                    t = getattr(dep.target.module, name, None)
                    if isinstance(t, torch.Tensor):
                        with torch.no_grad():
                            t[torch.as_tensor(idxs, dtype=torch.long, device=t.device)] = 0
    del pruner
    gc.collect()
    model.train(was_training)
    return zeroed


def soft_ratios(ratio: float, epochs: int) -> list[float]:
    """The share of channels zeroed at the start of each soft epoch: ramped linearly, the whole
    ``ratio`` from the last one on (Torch-Pruning's linear schedule, on the dense widths)."""
    return [ratio * (e + 1) / epochs for e in range(epochs)]


def ratio_for_speedup(model: nn.Module, head: str, image_size: int, speedup: float) -> float:
    """The smallest ratio (a multiple of 1/64) whose pruned copy needs ``speedup`` x fewer MACs."""
    if speedup <= 1.0:
        raise MedxferError(f"MACs speed-up {speedup} must be above 1", "e.g. --speedup 2")
    dense = count(model, image_size)["macs"]

    def reaches(steps: int) -> bool:
        pruned = prune_channels(copy.deepcopy(model), head, steps / 64, image_size)
        return dense / count(pruned, image_size)["macs"] >= speedup

    lo, hi = 0, 48  # above 0.75, rounding channels to 8 can leave small layers unpruned
    if not reaches(hi):
        raise MedxferError(f"even removing 75% of the channels does not cut MACs {speedup}x",
                           "ask for a smaller --speedup or give --ratio")  # fmt: skip
    while hi - lo > 1:  # bisection: reaches(hi) is true and reaches(lo) false (or lo = 0)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi / 64


def dense_source(source: Path) -> tuple[State, dict[str, Any]]:
    """The best weights and meta of a finished run (``train`` or a lottery's dense level)."""
    if not (source / "best.pt").exists() or not is_complete(source):
        raise MedxferError(
            f"{source} was never trained to the end (no best.pt / metrics.json)",
            "pass a finished `medxfer train` run or a lottery's level_0/dense folder",
        )
    best = load_checkpoint(source / "best.pt")
    return fold_reparam(best["model"]), best["meta"]


def step_ratios(ratio: float, steps: int) -> list[float]:
    """The ratio each of ``steps`` prunings removes of the channels still there, so that after
    step ``i`` a ``ratio * i / steps`` share of the dense channels is gone (the linear schedule
    of Torch-Pruning's ``iterative_steps``); one step is ``[ratio]``."""
    gone = [ratio * i / steps for i in range(steps + 1)]
    return [1 - (1 - gone[i]) / (1 - gone[i - 1]) for i in range(1, steps + 1)]


def _replay(
    model: nn.Module, state: State, head: str, ratios: list[float], states: list[State], size: int
) -> nn.Module:
    """In place: the dense weights, then each step's cut followed by the weights that step's
    fine-tune chose (``states``: one per finished step, at most one fewer than ``ratios``).
    Deterministic: each cut is decided by the L1 norms of the weights it is given."""
    model.load_state_dict(state)
    for i, r in enumerate(ratios):
        prune_channels(model, head, r, size)
        if i < len(states):
            model.load_state_dict(states[i])
    return model


def pruned_model(
    arch: str,
    state: State,
    n_classes: int,
    ratio: float,
    size: int,
    *,
    steps: int = 1,
    states: list[State] | None = None,
) -> nn.Module:
    """The dense run's network with its channels pruned (deterministic given the weights); for
    an iterative run, ``states`` are the chosen weights of its first ``steps - 1`` steps."""
    model = create_model(arch, weights="none", num_classes=n_classes).model
    states = states or []
    if len(states) != steps - 1:
        raise MedxferError(
            f"{steps} pruning steps need {steps - 1} sets of weights, got {len(states)}"
        )
    return _replay(model, state, entry(arch).head, step_ratios(ratio, steps), states, size).eval()


def structure_meta(meta: dict[str, Any], ratio: float, steps: int) -> dict[str, Any]:
    """``meta`` plus the recipe that rebuilds the thinner network: the cut's ratio and steps.
    The shapes it produces depend on the ratios only (the same share of every layer group,
    rounded to 8), not on the weights, so replaying it on any weights of the architecture
    gives the network the stored weights fit."""
    return dict(meta) | {"structure": {"ratio": float(ratio), "steps": int(steps)}}


def save_structured(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights and meta (with its ``structure`` recipe) only: no pickled module."""
    if "structure" not in meta:
        raise MedxferError(
            "this structured model has no pruning recipe (an older file, read with --trust-pickle)",
            "rewrite its run folder first with `medxfer convert RUN --trust-pickle`",
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "model": state, "meta": meta}, path)


def skeleton(meta: dict[str, Any]) -> nn.Module:
    """The thinner network of a structured ``meta`` (untrained weights): the registered
    architecture with the recipe's cut replayed."""
    recipe = meta.get("structure")
    if not isinstance(recipe, dict) or not {"ratio", "steps"} <= set(recipe):
        raise MedxferError("a structured model file without its pruning recipe (meta.structure)")
    ratio, steps = float(recipe["ratio"]), int(recipe["steps"])
    check_ratio(ratio)
    if not 1 <= steps <= 64:
        raise MedxferError(f"a structured model file with {steps} pruning steps (1 to 64 made)")
    arch, size = meta["arch"], int(meta["image_size"])
    model = create_model(arch, weights="none", num_classes=len(meta["classes"])).model
    for r in step_ratios(ratio, steps):
        prune_channels(model, entry(arch).head, r, size)
    return model.eval()


def from_payload(obj: dict[str, Any], path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode pruned module, meta) of a loaded structured file. An older file's pickled
    module is only reachable when the user trusted it (``--trust-pickle``)."""
    meta: dict[str, Any] = obj["meta"]
    if obj.get("format") == LEGACY_FORMAT:
        module: nn.Module = obj["module"]
        return module.eval(), meta
    model = skeleton(meta)
    try:
        model.load_state_dict(obj["model"])
    except (RuntimeError, KeyError) as err:
        raise MedxferError(
            f"{path}: its weights do not fit the network its recipe rebuilds ({str(err)[:200]})"
        ) from None
    return model.eval(), meta


def load_structured(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode pruned module, meta) from ``model.pt`` (a run folder or the file)."""
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.exists():
        raise MedxferError(f"no pruned model at {path}", "run `medxfer prune-structured` first")
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise MedxferError(f"{path} is not a medxfer structured-pruned model")
    return from_payload(obj, path)


def _finetune_cfg(cfg: ExperimentConfig, epochs: int, lr_scale: float) -> ExperimentConfig:
    """Same data and recipe as the dense run, ``lr_scale`` x its LR, ``structured.warmup``
    epochs of warm-up, no freezing, no download."""
    out = finetune_config(cfg, lr_scale)
    return with_values(out, {
        "train.epochs": epochs or cfg.train.epochs,
        "train.warmup_epochs": cfg.structured.warmup,
        "model.weights": "none", "model.freeze": "none",  # prepare loads the dense weights
    })  # fmt: skip


class _Replay(Callback):
    """``fit``'s callback for a fine-tuning step: the cut network (``_replay``) to start from."""

    def __init__(
        self, state: State, head: str, ratios: list[float], states: list[State], size: int
    ) -> None:
        self.state, self.head, self.ratios, self.size = state, head, ratios, size
        self.states = list(states)  # as they are now: the caller appends to its list

    def prepare_model(self, model: nn.Module) -> None:
        _replay(model, self.state, self.head, self.ratios, self.states, self.size)


class _Soft(Callback):
    """``fit``'s callback for soft filter pruning: start from ``state``; before each epoch,
    zero the share of channels ``schedule`` gives that epoch."""

    edits_weights = True

    def __init__(self, state: State, head: str, schedule: list[float], size: int) -> None:
        self.state, self.head, self.schedule, self.size = state, head, schedule, size

    def prepare_model(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        zero_channels(model, self.head, self.schedule[epoch], self.size)


def _step_epochs(total: int, steps: int) -> list[int]:
    """``total`` fine-tuning epochs shared by ``steps`` steps, the remainder to the last."""
    if total < steps:
        raise MedxferError(
            f"{steps} pruning steps need at least {steps} fine-tuning epochs, not {total}",
            "raise --epochs or lower structured.steps",
        )
    return [total // steps] * (steps - 1) + [total - total // steps * (steps - 1)]


def _soft_phase(
    ft: ExperimentConfig,
    run_dir: Path,
    state: State,
    head: str,
    ratio: float,
    size: int,
    epochs: int,
    teacher: Teacher | None,
    evaluate: Evaluate,
) -> tuple[State, dict[str, Any]]:
    """Soft filter pruning of the whole network into ``run_dir`` (a resumable run that never
    sees the test split); returns its last weights, which the cut is made on, and a summary."""
    cfg = with_values(ft, {"train.epochs": epochs})
    schedule = soft_ratios(ratio, epochs)
    if is_complete(run_dir):
        check_reuse(cfg, run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        console.print(f"soft filter pruning: {epochs} epochs on the whole network, "
                      f"{schedule[0]:.0%} to {ratio:.0%} of the channels zeroed")  # fmt: skip
        trained = fit(cfg, run_dir, resume=(run_dir / "last.pt").exists(),
                      callbacks=(_Soft(state, head, schedule, size),), teacher=teacher,
                      recalibrate=False)  # fmt: skip
        metrics = evaluate(trained, evaluate_test=False)
    last = load_checkpoint(run_dir / "last.pt")
    history = last["history"]
    summary = {"epochs": epochs, "zeroed_share": schedule, "lr": cfg.train.lr,
               "val_balanced_accuracy": [h["val_balanced_accuracy"] for h in history],
               "best_epoch": metrics.get("best_epoch")}  # fmt: skip
    return last["model"], summary


def _step_row(ratio: float, epochs: int, metrics: dict[str, Any]) -> dict[str, Any]:
    val = metrics.get("val", {})
    return {"channels_gone": ratio, "epochs": epochs, "best_epoch": metrics.get("best_epoch"),
            "val_balanced_accuracy": val.get("balanced_accuracy")}  # fmt: skip


def _test_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    test = metrics.get("test", {})
    return {f"test_{k}": test.get(k) for k in ("accuracy", "balanced_accuracy")}


def _binding(settings: dict[str, Any]) -> dict[str, Any]:
    """What a structured folder is bound to: source, ratio and the fine-tuning config's
    fingerprint (which ignores keys a later medxfer added at their defaults)."""
    return {**settings, "config": config_from_dict(settings["config"]).fingerprint()}


def _bind(out: Path, settings: dict[str, Any]) -> None:
    path = out / "structured_settings.json"
    if path.exists() and _binding(json.loads(path.read_text())) != _binding(settings):
        raise MedxferError(f"{out} holds a structured run with other settings",
                           "use another --out folder, or --force to start again")  # fmt: skip
    make_run_dir(out, "prune-structured")
    atomic_write_json(settings, path)


def run_structured(
    source: Path,
    out: Path,
    *,
    evaluate: Evaluate,
    overrides: list[str] | None = None,
    latency: bool = True,
    repeats: int = 20,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Prune ``source``'s best weights by channels, fine-tune into ``out``, report (resumable).
    ``command``: the command line, recorded in the report (that of the call that wrote it).

    ``structured.ratio`` (> 0) fixes the ratio; otherwise the smallest ratio that cuts
    MACs by ``structured.speedup`` is used. Returns (and writes) ``structured.json``.
    ``evaluate``: what tests each fine-tuning run after ``fit`` and writes its metrics.json
    (``medxfer.evaluate.finish.evaluate_trained``, passed in by the command).
    """
    state, meta = dense_source(source)
    cfg = load_config(source / "config.yaml", overrides)
    p, arch, size, n = cfg.structured, meta["arch"], int(meta["image_size"]), len(meta["classes"])
    head = entry(arch).head
    dense = create_model(arch, weights="none", num_classes=n).model.eval()
    dense.load_state_dict(state)
    teacher = None  # checked before any work starts
    if p.distill:
        teacher = Teacher(dense, p.distill, p.temperature)
    ratio = p.ratio
    if ratio:
        check_ratio(ratio)
    else:  # the search costs minutes on a busy CPU: a rerun takes the ratio it found before
        old = out / "structured_settings.json"
        found = json.loads(old.read_text()).get("ratio") if old.exists() else None
        ratio = found or ratio_for_speedup(dense, head, size, p.speedup)
    ft = _finetune_cfg(cfg, p.epochs, p.lr_scale)
    settings: dict[str, Any] = {"source": str(source.resolve()), "ratio": ratio,
                                "config": ft.to_dict()}  # fmt: skip
    if teacher is not None:  # the config's fingerprint leaves structured.* out
        settings["distill"] = {"weight": teacher.alpha, "temperature": teacher.temperature}
    steps = p.steps
    if steps > 1:  # folders of one-step runs stay bound as before
        settings["steps"] = steps
    soft = p.soft
    if soft:  # likewise
        settings["soft_epochs"] = soft
    ratios, epochs = step_ratios(ratio, steps), _step_epochs(ft.train.epochs, steps)
    _bind(out, settings)
    start = state  # the weights the cut is made on
    soft_report: dict[str, Any] | None = None
    if soft:
        start, soft_report = _soft_phase(
            ft, out / "soft", state, head, ratio, size, soft, teacher, evaluate
        )
    states: list[State] = []  # the chosen weights of each finished step
    rows: list[dict[str, Any]] = []
    for i in range(steps):  # steps 1..k-1 in out/step_<i>, the last one in out itself
        run_dir = out if i == steps - 1 else out / f"step_{i + 1}"
        step_cfg = with_values(ft, {"train.epochs": epochs[i]})
        if is_complete(run_dir):
            check_reuse(step_cfg, run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            if steps > 1:
                console.print(f"structured step {i + 1}/{steps}: "
                              f"{ratio * (i + 1) / steps:.0%} of the channels removed")  # fmt: skip
            replay = _Replay(start, head, ratios[: i + 1], states, size)
            tested = run_dir == out  # the steps before the last never see the test split
            trained = fit(step_cfg, run_dir, resume=(run_dir / "last.pt").exists(),
                          callbacks=(replay,), teacher=teacher, recalibrate=tested)  # fmt: skip
            metrics = evaluate(trained, evaluate_test=tested, trust=False)
        rows.append(_step_row(ratio * (i + 1) / steps, epochs[i], metrics))
        if run_dir != out:
            states.append(load_checkpoint(run_dir / "best.pt")["model"])
    model = pruned_model(arch, start, n, ratio, size, steps=steps, states=states)
    best = load_checkpoint(out / "best.pt")
    model.load_state_dict(best["model"])
    save_structured(out / MODEL_FILE, model, structure_meta(best["meta"], ratio, steps))
    before, after = count(dense, size), count(model, size)
    dense_metrics = json.loads((source / "metrics.json").read_text())
    report: dict[str, Any] = {
        "source_run": str(source), "run_dir": str(out), "model_file": str(out / MODEL_FILE),
        "method": "L1-norm channel pruning (Torch-Pruning MetaPruner, MagnitudeImportance p=1, "
                  "same ratio per layer group, channels rounded to 8, head outputs kept)",
        "ratio": ratio, "target_macs_speedup": None if p.ratio else p.speedup,
        "dense": before | _test_scores(dense_metrics), "pruned": after | _test_scores(metrics),
        "macs_speedup": before["macs"] / after["macs"],
        "params_fraction": after["params"] / before["params"],
        "finetune": {"epochs": ft.train.epochs, "lr": ft.train.lr,
                     "best_epoch": metrics.get("best_epoch"),
                     "distill": p.distill or None,
                     "temperature": p.temperature if p.distill else None},
    }  # fmt: skip
    if steps > 1:
        report["method"] += f", iteratively in {steps} steps, each fine-tuned before the next"
        report["finetune"]["steps"] = rows
    if command is not None:
        report["command"] = command
    if ft.train.warmup_epochs:
        report["finetune"]["warmup_epochs"] = ft.train.warmup_epochs
    if soft_report is not None:
        report["method"] += (f", after {soft} epochs of soft filter pruning (the channels to cut "
                             "zeroed at each epoch's start, ramped up to the ratio, free to grow "
                             "back)")  # fmt: skip
        report["soft"] = soft_report
    if latency:
        models = {"dense": dense, "structured": model}
        report["latency"] = measure_latency(models, size, repeats=repeats)
        # NHWC, as `medxfer predict` and the training loop run them (oneDNN's preferred layout)
        report["latency"]["channels_last"] = measure_latency(
            models, size, repeats=repeats, channels_last=True
        )
        if importlib.util.find_spec("onnxruntime") is not None:  # the `prune` extra
            (out / "onnx").mkdir(exist_ok=True)  # structured-<size>.onnx: ready to ship
            report["latency"]["onnxruntime"] = onnxruntime_latency(
                models, size, out / "onnx", repeats=repeats
            )
    atomic_write_json(report, out / "structured.json")
    return report
