"""A ``fit`` callback for tests that kill a run after one epoch (not a test module itself)."""

from __future__ import annotations

from typing import Any

from medxfer.train.callbacks import Callback


class Stopped(Exception):
    """What ``StopAfterOneEpoch`` raises unless told otherwise."""


class StopAfterOneEpoch(Callback):
    """Raise ``error`` at the end of the first epoch ``fit`` trains (saved in last.pt, so a
    resume continues after it): a run killed there."""

    def __init__(self, error: type[BaseException] = Stopped) -> None:
        self.error = error

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        raise self.error
