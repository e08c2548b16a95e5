"""``fit``'s one hook: ``Callback`` objects, called in order, an exception stopping them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from stopping import StopAfterOneEpoch, Stopped
from torch import nn

from medxfer.config import load_config
from medxfer.train.callbacks import Callback, Callbacks
from medxfer.train.loop import fit

TINY = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=2",
    "train.batch_size=8", "train.eval_batch_size=64", "train.steps_per_epoch=1",
    "train.bn_recalibrate=false", "train.threads=1",
]  # fmt: skip


class Recorder(Callback):
    """Writes every call it gets into ``log`` as (name, method, argument)."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]]) -> None:
        self.name, self.log = name, log
        self.models: list[nn.Module] = []

    def prepare_model(self, model: nn.Module) -> None:
        self.models.append(model)
        self.log.append((self.name, "prepare", None))

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        self.models.append(model)
        self.log.append((self.name, "start", epoch))

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        self.log.append((self.name, "end", (epoch, row["epoch"])))


def test_fan_out_calls_in_order_and_an_exception_stops_the_rest() -> None:
    log: list[tuple[str, str, Any]] = []
    model = nn.Linear(2, 2)
    hooks = Callbacks([Recorder("a", log), Callback(), Recorder("b", log)])
    hooks.prepare_model(model)
    hooks.on_epoch_start(3, model)
    hooks.on_epoch_end(3, {"epoch": 4})
    assert log == [("a", "prepare", None), ("b", "prepare", None), ("a", "start", 3),
                   ("b", "start", 3), ("a", "end", (3, 4)), ("b", "end", (3, 4))]  # fmt: skip
    log.clear()
    stopping = Callbacks([Recorder("a", log), StopAfterOneEpoch(), Recorder("b", log)])
    with pytest.raises(Stopped):
        stopping.on_epoch_end(0, {"epoch": 1})
    assert log == [("a", "end", (0, 1))]  # the callbacks after the raising one never ran
    Callbacks().on_epoch_end(0, {})  # none at all: nothing to do


def test_fit_calls_each_hook_when_it_says_also_after_a_resume(
    synth_root: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, [f"data.root={synth_root}", f"out_dir={tmp_path}", *TINY])
    log: list[tuple[str, str, Any]] = []
    first = Recorder("a", log)
    with pytest.raises(Stopped):
        fit(cfg, tmp_path / "run", callbacks=(first, StopAfterOneEpoch(), Recorder("b", log)))
    assert log == [("a", "prepare", None), ("b", "prepare", None), ("a", "start", 0),
                   ("b", "start", 0), ("a", "end", (0, 1))]  # fmt: skip
    assert first.models[0] is first.models[1]  # the bare network, the same one each time
    log.clear()
    resumed = Recorder("a", log)
    trained = fit(cfg, tmp_path / "run", resume=True, callbacks=(resumed,))
    assert log == [("a", "prepare", None), ("a", "start", 1), ("a", "end", (1, 2))]
    assert all(m is trained.model for m in resumed.models)
