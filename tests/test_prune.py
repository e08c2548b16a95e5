"""Lottery-ticket pruning: exact sparsity, masks that only shrink, zeros that stay zero, exact
rewinding, controls, resume, export, and one tiny lottery end to end on the synthetic set."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from stopping import StopAfterOneEpoch, Stopped
from subproc import run as run_diagnosed
from torch import nn

from medxfer.cli import main
from medxfer.config import ExperimentConfig, load_config
from medxfer.errors import MedxferError
from medxfer.evaluate.finish import evaluate_trained, fit_and_evaluate
from medxfer.models import create_model
from medxfer.prune.export import (
    compact,
    export_run,
    latency_report,
    load_compact_model,
    onnx_check,
)
from medxfer.prune.lottery import (
    SaveInit,
    StartMasked,
    finetune_config,
    rewind_state,
    run_dir,
    run_lottery,
    trained_state,
)
from medxfer.prune.magnitude import (
    attach,
    global_magnitude_prune,
    make_permanent,
    mask_of,
    plain_state_dict,
    prune_count,
)
from medxfer.prune.mask import Mask, check_fits, random_like
from medxfer.prune.plan import Settings, bind_folder, kept_schedule, make_settings

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=3",
    "train.batch_size=8", "train.steps_per_epoch=1", "train.eval_batch_size=128",
    "eval.n_bootstrap=20", "train.optimizer=sgd",  # SGD: half of AdamW's state to checkpoint
]  # fmt: skip
STUDIES = Path(__file__).resolve().parents[1] / "studies"
LOTTERY = ["--levels", "1", "--fraction", "0.2", "--rewind", "epoch:1"]


def _resnet(num_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet18", weights="none", num_classes=num_classes).model


def _tiny(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """Conv / BatchNorm / Linear like the backbones, small enough for unit tests on 2 cores."""
    torch.manual_seed(seed)
    layers = {
        "conv1": nn.Conv2d(3, 8, 3), "bn1": nn.BatchNorm2d(8), "relu": nn.ReLU(),
        "conv2": nn.Conv2d(8, 16, 3, bias=False), "bn2": nn.BatchNorm2d(16),
        "pool": nn.AdaptiveAvgPool2d(1), "flat": nn.Flatten(), "fc": nn.Linear(16, num_classes),
    }  # fmt: skip
    return nn.Sequential(OrderedDict(layers))


@pytest.fixture(scope="module")
def lottery(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny lottery through the CLI: dense level 0 (3 epochs), ticket + 2 controls at 20%."""
    out = tmp_path_factory.mktemp("lottery") / "lth"
    with pytest.MonkeyPatch.context() as mp:  # module scope: set what conftest sets per test
        mp.setenv("MEDXFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        assert main(["prune", "--data", str(synth_root), "--out", str(out), *LOTTERY, *FAST]) == 0
        yield out


# ---------------------------------------------------------------- masks and pruning, no training


def test_mask_covers_conv_and_linear_and_saves(tmp_path: Path) -> None:
    model = _tiny()
    mask = Mask.dense(model, exclude=["fc"])
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert list(mask) == [f"{n}.weight" for n in convs] and mask.sparsity == 0.0
    assert "fc.weight" in Mask.dense(model)
    pruned = global_magnitude_prune(model, mask, 0.3)
    pruned.save(tmp_path / "m.pt")
    back = Mask.load(tmp_path / "m.pt")
    assert back.keys() == pruned.keys() and all(torch.equal(back[k], pruned[k]) for k in back)
    assert back.sparsity == (back.total - back.kept) / back.total
    rnd = random_like(pruned, seed=1)
    assert rnd.kept_per_layer() == pruned.kept_per_layer() and rnd.per_layer() == back.per_layer()
    assert not all(torch.equal(rnd[k], pruned[k]) for k in rnd)


def test_global_prune_exact_count_one_threshold_masks_shrink() -> None:
    model = _tiny()
    weights = plain_state_dict(model)
    mask = Mask.dense(model, exclude=["fc"])
    for _ in range(3):
        new = global_magnitude_prune(weights, mask, 0.2)
        assert mask.kept - new.kept == round(0.2 * mask.kept)  # exact, to the weight
        assert new.is_subset_of(mask)  # masks only shrink
        removed = torch.cat([weights[k].abs()[mask[k] & ~new[k]] for k in new])
        kept = torch.cat([weights[k].abs()[new[k]] for k in new])
        assert removed.max() <= kept.min()  # one global threshold across layers
        mask = new


def test_ties_are_broken_deterministically() -> None:
    weights = {"a.weight": torch.ones(4, 5), "b.weight": torch.ones(3, 2)}
    mask = Mask({k: torch.ones(v.shape, dtype=torch.bool) for k, v in weights.items()})
    first, second = prune_count(weights, mask, 7), prune_count(weights, mask, 7)
    assert first.kept == 26 - 7 and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_pruned_weights_stay_zero_through_training(optimizer: str) -> None:
    model = _tiny().to(memory_format=torch.channels_last)
    mask = global_magnitude_prune(model, Mask.dense(model, exclude=["fc"]), 0.5)
    attach(model, mask)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    )
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    before = plain_state_dict(model)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = plain_state_dict(model)
    assert all(not state[k][~m].any() for k, m in mask.items())  # effective weights
    for k, m in mask.items():  # and the optimizer never moved the underlying ones either
        assert not model.get_submodule(k.removesuffix(".weight")).weight_orig[~m].any()
    assert any(not torch.equal(state[k][m], before[k][m]) for k, m in mask.items())
    # checkpoints keep the plain layout: a model without pruning loads them and agrees
    assert set(state) == set(_tiny().state_dict())
    plain = _tiny(seed=1).to(memory_format=torch.channels_last).eval()
    plain.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    # ...and so does a freshly pruned one (what --resume does), with the same mask
    again = attach(_tiny(seed=2), mask)
    again.load_state_dict(model.state_dict())
    assert all(torch.equal(mask_of(again)[k], m) for k, m in mask.items())
    make_permanent(model)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    assert all(not model.state_dict()[k][~m].any() for k, m in mask.items())


def test_mask_that_does_not_fit_is_one_clear_error() -> None:
    mask = Mask.dense(_tiny(), exclude=[])
    with pytest.raises(MedxferError, match="does not fit"):
        check_fits(mask, _tiny(num_classes=3), "the checkpoint")  # the head's shape differs
    with pytest.raises(MedxferError, match="does not fit"):
        attach(_resnet(), mask)
    pruned = global_magnitude_prune(_tiny(), Mask.dense(_tiny(), exclude=["fc"]), 0.5)
    with pytest.raises(MedxferError, match="nonzero weights where the mask prunes"):
        compact(plain_state_dict(_tiny(seed=3)), pruned)  # a dense checkpoint, not this mask's


def _lottery(cfg: ExperimentConfig, out: Path, **kw: Any) -> dict[str, Any]:
    """``run_lottery`` evaluating its runs as the commands do."""
    return run_lottery(cfg, out, evaluate=evaluate_trained, **kw)


def _settings(**over: object):  # type: ignore[no-untyped-def]
    kw = {
        "levels": 1,
        "fraction": 0.2,
        "target_sparsity": None,
        "rewind": "init",
        "controls": True,
        "include_head": False,
        "finetune": False,
        "finetune_lr_scale": 0.1,
    }
    return make_settings(load_config(None, FAST), **(kw | over))  # fmt: skip


def test_schedule_and_settings() -> None:
    assert kept_schedule(1000, _settings(levels=3)) == [1000, 800, 640, 512]
    tgt = kept_schedule(12345, _settings(levels=4, target_sparsity=0.9))
    assert tgt[-1] == round(12345 * 0.1) and tgt == sorted(tgt, reverse=True)
    for over, needle in [({"target_sparsity": 1.0}, r"not in \(0, 1\)"),
                         ({"target_sparsity": 0.0}, r"not in \(0, 1\)"),
                         ({"fraction": 1.0}, r"not in \(0, 1\)"),
                         ({"levels": 0}, "at least one"),
                         ({"rewind": "epoch:3"}, "needs more than 3"),
                         ({"rewind": "sometimes"}, "not understood"),
                         ({"distill": 1.5}, r"outside \(0, 1\]"),
                         ({"distill": -0.2}, r"outside \(0, 1\]"),
                         ({"distill": 0.5, "distill_temperature": 0}, "not positive")]:  # fmt: skip
        with pytest.raises(MedxferError, match=needle):
            _settings(**over)
    cfg = load_config(None, ["train.lr=0.002"])
    ft = finetune_config(cfg, 0.1)
    assert ft.train.lr == pytest.approx(0.0002) and ft.train.warmup_epochs == 0
    assert cfg.train.lr == 0.002  # the experiment's own config is untouched


# ---------------------------------------------------------------- the lottery itself


def test_lottery_end_to_end(lottery: Path) -> None:
    summary = json.loads((lottery / "lottery.json").read_text())
    assert (lottery / "sparsity_vs_accuracy.png").stat().st_size > 0
    dense = Mask.load(run_dir(lottery, 0, "dense") / "mask.pt")
    ticket = Mask.load(run_dir(lottery, 1, "ticket") / "mask.pt")
    assert dense.total - ticket.kept == round(0.2 * dense.total)  # exact, to the weight
    assert ticket.is_subset_of(dense) and "fc.weight" not in ticket
    level1 = summary["levels"][1]
    assert level1["kept"] == ticket.kept and level1["per_layer"] == ticket.per_layer()
    assert set(level1["runs"]) == {"ticket", "random_reinit", "random_mask"}
    assert {"accuracy", "balanced_accuracy"} <= set(level1["runs"]["ticket"]["test"])
    for level in summary["levels"]:  # every run says which classes val and test disagree on
        for r in level["runs"].values():
            assert isinstance(r["val_test_shifted_classes"], list)
    for kind in ("ticket", "random_reinit", "random_mask"):
        run = run_dir(lottery, 1, kind)
        mask = Mask.load(run / "mask.pt")
        assert mask.kept_per_layer() == ticket.kept_per_layer()  # same per-layer sparsity
        state = torch.load(run / "best.pt", weights_only=True)["model"]
        assert all(not state[k][~m].any() for k, m in mask.items())  # zeros survived training
        history = json.loads((run / "history.json").read_text())
        assert [h["epoch"] for h in history] == [2, 3]  # epoch:1 rewinding retrains epochs 2-3
    assert torch.equal(Mask.load(run_dir(lottery, 1, "random_reinit") / "mask.pt")["conv1.weight"],
                       ticket["conv1.weight"])  # fmt: skip
    rnd = Mask.load(run_dir(lottery, 1, "random_mask") / "mask.pt")
    assert not torch.equal(rnd["layer4.1.conv2.weight"], ticket["layer4.1.conv2.weight"])


def test_lottery_states_a_shifted_class_once_with_its_count() -> None:
    from medxfer.prune.report import shift_lines

    def run(*shifted: str) -> dict[str, object]:
        return {"test": {"accuracy": 0.8}, "val_test_shifted_classes": list(shifted)}

    summary = {"levels": [
        {"runs": {"dense": run("normal")}},
        {"runs": {"ticket": run("normal", "viral"), "random_mask": run()}},
    ]}  # fmt: skip
    lines = shift_lines(summary)
    assert len(lines) == 2
    assert lines[0].startswith("class 'normal'") and "in 2 of 3 runs" in lines[0]
    assert lines[1].startswith("class 'viral'") and "in 1 of 3 runs" in lines[1]
    assert shift_lines({"levels": [{"runs": {"dense": run()}}]}) == []


@pytest.mark.parametrize("rewind", ["init", "epoch:1", "lr"])
def test_rewinding_restores_saved_weights(lottery: Path, rewind: str) -> None:
    s = _settings(rewind=rewind)
    saved = {"init": lottery / "init.pt", "epoch:1": lottery / "rewind_epoch1.pt"}.get(rewind)
    target = (
        torch.load(saved, weights_only=True)
        if saved
        else trained_state(run_dir(lottery, 0, "dense"))
    )
    mask = Mask.load(run_dir(lottery, 1, "ticket") / "mask.pt")
    model = _resnet(seed=5)
    StartMasked(mask, lambda _m: rewind_state(lottery, 1, s)).prepare_model(model)
    got = plain_state_dict(model)
    for key, value in target.items():
        if key in mask:
            assert torch.equal(got[key][mask[key]], value[mask[key]])
            assert not got[key][~mask[key]].any()
        else:
            assert torch.equal(got[key], value), key


def test_resumed_level_equals_uninterrupted(
    lottery: Path, synth_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lth"
    (out / "level_0" / "dense").mkdir(parents=True)
    for name in ("level_0/dense/mask.pt", "level_0/dense/last.pt", "level_0/dense/metrics.json",
                 "rewind_epoch1.pt"):  # fmt: skip
        (out / name).symlink_to(lottery / name)  # level 0 is complete: only read
    cfg = load_config(None, [f"data.root={synth_root}", *FAST])
    kw = {"levels": 1, "rewind": "epoch:1", "controls": False}
    with pytest.raises(Stopped):
        _lottery(cfg, out, callbacks=(StopAfterOneEpoch(),), **kw)
    ticket = run_dir(out, 1, "ticket")
    assert (ticket / "last.pt").exists() and not (ticket / "metrics.json").exists()
    _lottery(cfg, out, **kw)
    a = torch.load(run_dir(lottery, 1, "ticket") / "last.pt", weights_only=True)
    b = torch.load(ticket / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ma = json.loads((run_dir(lottery, 1, "ticket") / "metrics.json").read_text())["test"]
    mb = json.loads((ticket / "metrics.json").read_text())["test"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    with pytest.raises(MedxferError, match="other settings"):
        _lottery(cfg, out, levels=1, rewind="init", controls=False)
    # the controls only add runs: switched on later, the finished ticket is kept
    before = (ticket / "metrics.json").stat().st_mtime_ns
    summary = _lottery(cfg, out, **kw | {"controls": True})
    assert set(summary["levels"][1]["runs"]) == {"ticket", "random_reinit", "random_mask"}
    assert (ticket / "metrics.json").stat().st_mtime_ns == before
    for kind in ("random_reinit", "random_mask"):
        mine = json.loads((run_dir(out, 1, kind) / "metrics.json").read_text())["test"]
        theirs = json.loads((run_dir(lottery, 1, kind) / "metrics.json").read_text())["test"]
        assert mine["confusion_matrix"] == theirs["confusion_matrix"]  # as if on from the start


def test_finetune_baseline_is_added_to_a_finished_lottery(
    lottery: Path, synth_root: Path, tmp_path: Path
) -> None:
    """Switching ``prune.finetune`` on for a finished lottery trains the baseline alone: the
    ticket is not retrained, and the folder stays bound to its other settings."""
    out = tmp_path / "lth"
    shutil.copytree(lottery, out, ignore=shutil.ignore_patterns("random_*", "lottery.json"))
    bound = out / "settings.json"  # bound without the controls, like the copy
    bound.write_text(json.dumps(json.loads(bound.read_text()) | {"controls": False}))
    ticket = run_dir(out, 1, "ticket") / "metrics.json"
    before = ticket.stat().st_mtime_ns
    cfg = load_config(None, [f"data.root={synth_root}", *FAST])
    kw = {"levels": 1, "rewind": "epoch:1", "controls": False}
    summary = _lottery(cfg, out, finetune=True, **kw)
    assert ticket.stat().st_mtime_ns == before  # found complete, not trained again
    assert set(summary["levels"][1]["runs"]) == {"ticket", "finetune"}
    ft = run_dir(out, 1, "finetune")
    trained = load_config(ft / "config.yaml")
    assert trained.train.lr == pytest.approx(cfg.train.lr * 0.1)
    assert (
        Mask.load(ft / "mask.pt").kept_per_layer()
        == Mask.load(run_dir(out, 1, "ticket") / "mask.pt").kept_per_layer()
    )
    history = json.loads((ft / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # from the trained weights, all epochs
    with pytest.raises(MedxferError, match="other settings"):  # other settings still refused
        _lottery(cfg, out, finetune=True, levels=1, rewind="init", controls=False)


def test_distillation_baseline_is_added_and_bound_to_its_settings(
    lottery: Path, synth_root: Path, tmp_path: Path
) -> None:
    """``prune.distill`` adds one run per level beside a finished lottery: the ticket's mask on
    the dense model's trained weights, fine-tuned like ``finetune`` with the dense level-0 model
    as teacher; a rerun with another weight or temperature is refused, not continued."""
    out = tmp_path / "lth"
    shutil.copytree(lottery, out, ignore=shutil.ignore_patterns("random_*", "lottery.json"))
    bound = out / "settings.json"
    bound.write_text(json.dumps(json.loads(bound.read_text()) | {"controls": False}))
    ticket = run_dir(out, 1, "ticket") / "metrics.json"
    before = ticket.stat().st_mtime_ns
    cfg = load_config(None, [f"data.root={synth_root}", *FAST])
    kw = {"levels": 1, "rewind": "epoch:1", "controls": False}
    summary = _lottery(cfg, out, distill=0.7, distill_temperature=2.0, **kw)
    assert ticket.stat().st_mtime_ns == before
    assert set(summary["levels"][1]["runs"]) == {"ticket", "distill"}
    run = run_dir(out, 1, "distill")
    info = json.loads((run / "prune.json").read_text())
    assert info["distill"]["weight"] == 0.7 and info["distill"]["temperature"] == 2.0
    assert Path(info["distill"]["teacher"]) == run_dir(out, 0, "dense")
    assert load_config(run / "config.yaml").train.lr == pytest.approx(cfg.train.lr * 0.1)
    mask = Mask.load(run / "mask.pt")
    assert all(torch.equal(m, Mask.load(run_dir(out, 1, "ticket") / "mask.pt")[k])
               for k, m in mask.items())  # fmt: skip
    best = torch.load(run / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("teacher") for k in best)  # only the student is saved
    assert all(not best[k][~m].any() for k, m in mask.items())  # zeros survived distillation
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the same start as the plain fine-tune, another loss
    plain = _lottery(cfg, out, finetune=True, distill=0.7, distill_temperature=2.0, **kw)
    assert set(plain["levels"][1]["runs"]) == {"ticket", "finetune", "distill"}
    ft = json.loads((run_dir(out, 1, "finetune") / "history.json").read_text())
    assert ft[0]["train_loss"] != pytest.approx(history[0]["train_loss"])
    for other in ({"distill": 0.5}, {"distill": 0.7, "distill_temperature": 4.0}):
        with pytest.raises(MedxferError, match=r"was distilled with weight 0\.7"):
            _lottery(cfg, out, **kw | other)


def test_distilled_lottery_teaches_ticket_and_controls_alike(
    lottery: Path, synth_root: Path, tmp_path: Path
) -> None:
    """``prune.ticket_distill``: the ticket and both controls retrain with the dense level-0
    model as teacher (the same teacher and schedule for all three); the same start and mask as
    the plain lottery's, another loss; the zeros survive; the folder is bound to the weight and
    the temperature, and the weight is checked."""
    out = tmp_path / "lth"
    shutil.copytree(lottery, out, ignore=shutil.ignore_patterns("level_1", "lottery.json",
                                                                "settings.json"))  # fmt: skip
    cfg = load_config(None, [f"data.root={synth_root}", *FAST])
    kw = {"levels": 1, "fraction": 0.2, "rewind": "epoch:1"}
    summary = _lottery(cfg, out, ticket_distill=0.7, distill_temperature=2.0, **kw)
    assert set(summary["levels"][1]["runs"]) == {"ticket", "random_reinit", "random_mask"}
    taught = {"weight": 0.7, "temperature": 2.0}
    for kind in ("ticket", "random_reinit", "random_mask"):
        assert summary["levels"][1]["runs"][kind]["distilled"] == taught
        run, plain = run_dir(out, 1, kind), run_dir(lottery, 1, kind)
        info = json.loads((run / "prune.json").read_text())
        assert info["distill"] == {"weight": 0.7, "temperature": 2.0,
                                   "teacher": str(run_dir(out, 0, "dense"))}  # fmt: skip
        mask = Mask.load(run / "mask.pt")
        assert all(torch.equal(m, Mask.load(plain / "mask.pt")[k]) for k, m in mask.items())
        state = torch.load(run / "best.pt", weights_only=True)["model"]
        assert not any(k.startswith("teacher") for k in state)
        assert all(not state[k][~m].any() for k, m in mask.items())
        history = json.loads((run / "history.json").read_text())
        before = json.loads((plain / "history.json").read_text())
        assert [h["epoch"] for h in history] == [2, 3]
        assert history[0]["train_loss"] != pytest.approx(before[0]["train_loss"])
    assert "distill" not in json.loads((run_dir(lottery, 1, "ticket") / "prune.json").read_text())
    assert "distilled" not in summary["levels"][0]["runs"]["dense"]
    for other in ({}, {"ticket_distill": 0.5}, {"ticket_distill": 0.7}):  # T 4, not 2
        with pytest.raises(MedxferError, match="other settings"):
            _lottery(cfg, out, **kw | other)
    with pytest.raises(MedxferError, match=r"outside \(0, 1\]"):
        _settings(ticket_distill=1.5)


def test_lottery_can_prune_the_epoch_validation_chose(
    lottery: Path, synth_root: Path, tmp_path: Path
) -> None:
    """``prune.weights=best``: the mask comes from the magnitudes of the dense run's best.pt,
    learning-rate rewinding and the fine-tune start from it; a folder is bound to the choice,
    and folders made before it existed count as ``last``."""
    out = tmp_path / "lth"
    shutil.copytree(lottery, out, ignore=shutil.ignore_patterns("level_1", "lottery.json",
                                                                "settings.json"))  # fmt: skip
    dense = run_dir(out, 0, "dense")
    best = torch.load(dense / "best.pt", weights_only=True)
    torch.manual_seed(3)  # a best epoch whose magnitudes surely rank otherwise than the last's
    best["model"] = {k: torch.randn_like(v) if k.endswith(("weight", "weight_orig")) else v
                     for k, v in best["model"].items()}  # fmt: skip
    torch.save(best, dense / "best.pt")
    cfg = load_config(None, [f"data.root={synth_root}", *FAST])
    kw = {"levels": 1, "fraction": 0.2, "rewind": "lr", "controls": False, "finetune": True}
    _lottery(cfg, out, weights="best", **kw)
    full, ticket = Mask.load(dense / "mask.pt"), Mask.load(run_dir(out, 1, "ticket") / "mask.pt")
    chosen = trained_state(dense, "best")
    expected = prune_count(chosen, full, full.kept - ticket.kept)
    assert all(torch.equal(ticket[k], m) for k, m in expected.items())
    final = prune_count(trained_state(dense), full, full.kept - ticket.kept)
    assert any(not torch.equal(ticket[k], m) for k, m in final.items())
    s = _settings(rewind="lr", weights="best")
    assert all(torch.equal(v, chosen[k]) for k, v in rewind_state(out, 1, s).items())
    for kind in ("ticket", "finetune"):
        assert json.loads((run_dir(out, 1, kind) / "prune.json").read_text())["weights"] == "best"
    with pytest.raises(MedxferError, match="other settings"):
        _lottery(cfg, out, **kw)
    with pytest.raises(MedxferError, match="not understood"):
        _settings(weights="final")
    with pytest.raises(MedxferError, match=r"prune\.weights='final' is not allowed"):
        load_config(None, ["prune.weights=final"])  # refused when the file is read
    old = tmp_path / "old"  # made before the setting existed: it was made from the last epoch
    bind_folder(old, _settings())
    bound = json.loads((old / "settings.json").read_text())
    (old / "settings.json").write_text(json.dumps({k: v for k, v in bound.items()
                                                   if k != "weights"}))  # fmt: skip
    bind_folder(old, _settings())
    with pytest.raises(MedxferError, match="other settings"):
        bind_folder(old, _settings(weights="best"))


def test_checkpoint_scores_bench(lottery: Path, tmp_path: Path) -> None:
    """studies/checkpoint_scores.py: the dense final weights evaluated with the run's config, and
    every run of the lottery beside the best and the final dense checkpoint."""
    env = {**os.environ, "MEDXFER_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "checkpoint_scores.py", str(lottery), "--out", "t"]
    r = run_diagnosed(cmd, cwd=STUDIES, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "checkpoint-scores" / "t.json").read_text())
    dense = json.loads((run_dir(lottery, 0, "dense") / "metrics.json").read_text())
    assert out["dense_best"]["test"]["accuracy"] == dense["test"]["accuracy"]
    assert out["dense_final"]["epoch"] == 3 and 0 <= out["dense_final"]["test"]["accuracy"] <= 1
    assert set(out["runs"]) == {"level_0/dense", "level_1/ticket", "level_1/random_reinit",
                                "level_1/random_mask"}  # fmt: skip
    assert out["runs"]["level_0/dense"]["test_agreement_with_dense_best"] == 1.0
    assert out["pruned_weights"] == "last" and "dense_final (last.pt)" in out["note"]
    r = run_diagnosed([sys.executable, "checkpoint_scores.py", str(tmp_path)], cwd=STUDIES,
                       timeout=300)  # fmt: skip
    assert r.returncode == 2 and "holds no finished dense level 0" in r.stderr


def test_export_round_trip(lottery: Path) -> None:
    run = run_dir(lottery, 1, "ticket")
    report = export_run(run, latency=False, onnx=False)
    sizes = report["sizes"]
    assert sizes["compact"]["raw_bytes"] < sizes["dense"]["raw_bytes"]
    assert sizes["kept_weights"] == Mask.load(run / "mask.pt").kept
    best = torch.load(run / "best.pt", weights_only=True)
    restored, meta = load_compact_model(run / "export" / "model.sparse.pt")
    state = restored.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best["model"].items())
    from medxfer.evaluate.predict import load_trained

    original, _ = load_trained(run)  # in the NHWC layout `medxfer predict` runs
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(original(x), restored.to(memory_format=torch.channels_last)(x))
    assert meta["classes"] == best["meta"]["classes"]
    assert json.loads((run / "export" / "export.json").read_text())["sizes"] == sizes


def test_latency_report_says_plainly() -> None:
    pruned = make_permanent(
        attach(_tiny(), global_magnitude_prune(_tiny(), Mask.dense(_tiny()), 0.9))
    )
    report = latency_report(pruned, _tiny(seed=1), 32, batches=(1, 4), repeats=2)
    assert set(report) >= {"batch_1", "batch_4", "note", "threads"}
    assert report["batch_4"]["dense_ms"] > 0 and "faster" in report["note"]


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = attach(_tiny(), global_magnitude_prune(_tiny(), Mask.dense(_tiny()), 0.5))
    result = onnx_check(make_permanent(model), 32, tmp_path / "m.onnx")
    assert result["available"] and result["max_abs_diff"] < 1e-4
    assert result["gzip_bytes"] < result["raw_bytes"]


def test_bad_input_through_the_cli(
    lottery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prune", "--target-sparsity", "1.5", "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "not in (0, 1)" in capsys.readouterr().err
    assert main(["prune", "--distill", "1.5", "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work
    (tmp_path / "untrained").mkdir()
    assert main(["prune", "--export", str(tmp_path / "untrained")]) == 2
    assert "never trained" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir(lottery, 1, "ticket"), foreign)
    Mask.dense(_tiny()).save(foreign / "mask.pt")
    assert main(["prune", "--export", str(foreign), "--no-latency", "--no-onnx"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_cli_lottery_folder_is_named_without_the_added_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``medxfer prune`` without ``--out``: ``--finetune`` / ``--distill`` only add runs, so they
    continue the same folder (as ``medxfer run`` does); ``--weights best`` is another lottery;
    a folder named the way earlier versions named it (with those settings) is still found."""
    import hashlib

    import medxfer.prune.lottery as lottery_mod
    from medxfer.config import lottery_key

    seen: list[Path] = []
    monkeypatch.setattr(lottery_mod, "run_lottery", lambda _cfg, out, **_kw: seen.append(out))
    base = ["prune", *LOTTERY, *FAST, f"out_dir={tmp_path}"]
    for extra in ([], ["--finetune"], ["--distill", "0.5"], ["--weights", "best"],
                  ["--ticket-distill", "0.7"], ["--ticket-distill", "0.7",
                                                "prune.distill_temperature=2"]):  # fmt: skip
        assert main([*base, *extra]) == 0
    plain, finetune, distill, best, taught, taught_t2 = seen
    assert plain == finetune == distill and best != plain and plain.parent == tmp_path
    assert len({plain, best, taught, taught_t2}) == 4  # a distilled lottery is another one
    cfg = load_config(None, [*FAST, "prune.levels=1", "prune.fraction=0.2",
                             "prune.rewind=epoch:1", "prune.finetune=true"])  # fmt: skip
    bound = lottery_key(cfg.prune) | {"target_sparsity": None}
    bound.pop("levels")
    tag = hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()[:8]
    older = tmp_path / plain.name.replace(plain.name.rsplit("-", 1)[1], tag)
    assert older != plain
    older.mkdir()
    assert main([*base, "--finetune"]) == 0 and seen[-1] == older
    plain.mkdir()  # the current name wins once it exists
    assert main([*base, "--finetune"]) == 0 and seen[-1] == plain


def test_lottery_adopts_a_finished_dense_run_and_lottery_overrides(
    synth_root: Path, tmp_path: Path
) -> None:
    """An experiment's train run (made with ``SaveInit``) is the lottery's level 0 when it
    trained the same config: no second dense training; ``prune.epochs`` / ``prune.image_size``
    make a cheaper lottery, which then trains its own level 0."""
    from medxfer.prune.plan import lottery_config

    cfg = load_config(None, [f"data.root={synth_root}", *FAST, "train.epochs=2"])
    dense = tmp_path / "train"
    fit_and_evaluate(cfg, dense, callbacks=(SaveInit(dense),))
    before = (dense / "history.json").read_text()
    out = tmp_path / "lth"
    _lottery(cfg, out, levels=1, fraction=0.3, controls=False, dense_run=dense)
    level0 = run_dir(out, 0, "dense")
    assert json.loads((level0 / "adopted.json").read_text()) == {"adopted_from": str(dense)}
    assert (level0 / "history.json").read_text() == before  # copied, not retrained
    init = torch.load(dense / "init.pt", weights_only=True)
    rewound = rewind_state(out, 1, _init_settings(cfg))
    assert all(torch.equal(v, init[k]) for k, v in rewound.items())
    full, ticket = Mask.load(level0 / "mask.pt"), Mask.load(run_dir(out, 1, "ticket") / "mask.pt")
    assert full.kept == full.total and full.total == ticket.total
    expected = prune_count(trained_state(dense), full, full.kept - ticket.kept)
    assert all(torch.equal(ticket[k], m) for k, m in expected.items())  # pruned from its weights

    cheap = load_config(None, [f"data.root={synth_root}", *FAST, "train.epochs=2",
                               "prune.epochs=1", "prune.image_size=40"])  # fmt: skip
    assert lottery_config(cheap).train.epochs == 1 and lottery_config(cheap).data.image_size == 40
    out2 = tmp_path / "lth-cheap"
    _lottery(cheap, out2, levels=1, fraction=0.3, controls=False, dense_run=dense)
    assert not (run_dir(out2, 0, "dense") / "adopted.json").exists()  # another config: trained
    for kind in ((0, "dense"), (1, "ticket")):
        trained = load_config(run_dir(out2, *kind) / "config.yaml")
        assert (trained.train.epochs, trained.data.image_size) == (1, 40)
    with pytest.raises(MedxferError, match=r"prune\.epochs"):
        load_config(None, ["prune.epochs=-1"])
    with pytest.raises(MedxferError, match=r"prune\.image_size"):
        load_config(None, ["prune.image_size=8"])


def _init_settings(cfg: ExperimentConfig) -> Settings:
    return make_settings(cfg, levels=1, fraction=0.3, target_sparsity=None, rewind="init",
                         controls=False, include_head=False, finetune=False,
                         finetune_lr_scale=0.1)  # fmt: skip
