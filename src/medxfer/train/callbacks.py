"""``Callback``: the one way into ``fit`` from the layers above (pruning, tuning, experiments,
tests). Subclass it and override only what you need; the defaults do nothing.

When ``fit`` calls each method, on every DDP rank and in the order the callbacks were given:

- ``prepare_model(model)``: once per ``fit`` call, on the bare network (no DDP wrapper) after
  it is built and before training starts, also when resuming (before the last checkpoint's
  weights are loaded over it): later stages load a rewound state or attach pruning masks here.
- ``on_epoch_start(epoch, model)``: before each epoch trains (0-based ``epoch``, the bare
  network), also for the first epoch after a resume: soft pruning zeroes channels here.
- ``on_epoch_end(epoch, row)``: after the epoch is validated and saved (``last.pt``, and
  ``best.pt`` when it improved) with its history row, before early stopping is checked.

There is no stop flag: to stop training, raise from a method (an Optuna ``TrialPruned``, a test
that kills a run). The exception leaves ``fit`` and the callbacks after the raising one are not
called; an epoch that ended is already saved, so ``fit(..., resume=True)`` continues after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


class Callback:
    """A hook into ``fit``; every method is a no-op until overridden.

    ``edits_weights``: the callback changes the network's weights or structure while it trains
    (pruning masks, zeroed channels). A moving average of the weights (``train.ema``) would mix
    the edited and unedited ones, so ``fit`` refuses the two together."""

    edits_weights: bool = False

    def prepare_model(self, model: nn.Module) -> None:
        """In place, on the bare network after it is built, before training or resuming."""

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Before epoch ``epoch`` (0-based) trains, on the bare network."""

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        """After epoch ``epoch`` (0-based) is saved; ``row`` is its history row."""


class Callbacks(Callback):
    """Several callbacks as one: each method calls theirs in order; an exception stops the
    fan-out (and ``fit``) there."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = tuple(callbacks)
        self.edits_weights = any(cb.edits_weights for cb in self.callbacks)

    def prepare_model(self, model: nn.Module) -> None:
        for cb in self.callbacks:
            cb.prepare_model(model)

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(epoch, model)

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, row)
