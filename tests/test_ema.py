"""``train.ema``: a moving average of the weights is validated, checkpointed and shipped, and a
killed run resumes to the same average; pruning refuses it with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stopping import StopAfterOneEpoch, Stopped

from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.evaluate.finish import evaluate_trained, fit_and_evaluate
from medxfer.prune.lottery import run_lottery, trained_state
from medxfer.train.checkpoint import load_checkpoint
from medxfer.train.loop import fit

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.batch_size=16",
    "eval.n_bootstrap=50", "train.eval_batch_size=64", "trust.enabled=false",
]  # fmt: skip


def _cfg(root: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"data.root={root}", f"out_dir={out}", *FAST, *extra])


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_checkpoint_holds_the_average(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path, "train.epochs=1", "train.steps_per_epoch=5",
               "train.ema=0.9", "train.bn_recalibrate=false")  # fmt: skip
    fit_and_evaluate(cfg, tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert last["ema"]["steps"] == 5  # one update per optimizer step
    assert _equal(best["model"], last["ema"]["weights"])  # what was validated is what ships
    assert not _equal(best["model"], last["model"])  # and it is not the trained weights
    # ... nor their plain copy: step 1 copies (warm-up decay 0), later steps average
    w = "fc.weight"
    assert not torch.equal(last["ema"]["weights"][w], last["model"][w])
    # the pruning code reads the average too, as the run's model
    assert _equal(trained_state(tmp_path / "run", "last"), last["ema"]["weights"])


def test_average_follows_timm_decay_schedule(synth_root: Path, tmp_path: Path) -> None:
    """Two steps by hand: the average after step 2 is lerp(step-1 weights, step-2 weights,
    1 - d) with d = 1 - 2^(-2/3) (timm's warm-up at step 2; step 1 copies the weights)."""
    from medxfer.train.callbacks import Callback

    seen: list[dict[str, torch.Tensor]] = []

    class Keep(Callback):
        def prepare_model(self, model: torch.nn.Module) -> None:
            orig = model.forward

            def forward(x: torch.Tensor) -> torch.Tensor:  # weights as each step starts
                seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                return orig(x)

            model.forward = forward  # type: ignore[method-assign]

    cfg = _cfg(synth_root, tmp_path, "train.epochs=1", "train.steps_per_epoch=2",
               "train.ema=0.99", "train.bn_recalibrate=false")  # fmt: skip
    fit(cfg, tmp_path / "run", callbacks=(Keep(),))
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    after1, after2 = seen[1], last["model"]  # the weights after step 1, and after step 2
    d = 1 - 2.0 ** (-2 / 3)
    w = "fc.weight"
    expect = after1[w] * d + after2[w] * (1 - d)
    assert torch.allclose(last["ema"]["weights"][w], expect, atol=1e-6)


def test_resume_with_ema_equals_uninterrupted(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path, "train.epochs=3", "train.steps_per_epoch=4",
               "train.ema=0.95")  # fmt: skip
    fit_and_evaluate(cfg, tmp_path / "straight")
    with pytest.raises(Stopped):
        fit_and_evaluate(cfg, tmp_path / "killed", callbacks=(StopAfterOneEpoch(),))
    fit_and_evaluate(cfg, tmp_path / "killed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["ema"]["steps"] == b["ema"]["steps"] == 12
    assert _equal(a["ema"]["weights"], b["ema"]["weights"]) and _equal(a["model"], b["model"])
    best_a = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    best_b = load_checkpoint(tmp_path / "killed" / "best.pt")["model"]
    assert _equal(best_a, best_b)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())["test"]
    mb = json.loads((tmp_path / "killed" / "metrics.json").read_text())["test"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]


def test_ema_out_of_range_is_refused() -> None:
    with pytest.raises(MedxferError, match=r"train.ema must be in \[0, 1\)"):
        load_config(None, ["train.ema=1.0"])


def test_lottery_refuses_ema_before_training(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path, "train.epochs=1", "train.ema=0.99")
    with pytest.raises(MedxferError, match=r"train\.ema does not combine with pruning"):
        run_lottery(cfg, tmp_path / "lottery", evaluate=evaluate_trained, levels=1)
    assert not (tmp_path / "lottery").exists()  # nothing trained, nothing half-written


def test_fit_refuses_ema_with_a_weight_editing_callback(synth_root: Path, tmp_path: Path) -> None:
    from medxfer.train.callbacks import Callback

    class Masks(Callback):
        edits_weights = True

    cfg = _cfg(synth_root, tmp_path, "train.epochs=1", "train.ema=0.99")
    with pytest.raises(MedxferError, match=r"train\.ema does not combine with pruning"):
        fit(cfg, tmp_path / "run", callbacks=(Masks(),))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
