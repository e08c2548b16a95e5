"""What ``fit`` hands to evaluation: the trained run, its best model in memory, and how to use it.

``fit`` ends after training (the BatchNorm recalibration included, a training step); evaluating
the test split, the figures, the trust step and metrics.json are ``medxfer.evaluate.finish``.
Layers below ``evaluate`` (``prune``, ``tune``, ``gan``) cannot import it, so the commands
above them pass ``evaluate_trained`` in as an ``Evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from medxfer.config import ExperimentConfig
from medxfer.train.compute import Compute
from medxfer.train.setup import Setup


@dataclass(frozen=True)
class TrainedRun:
    """A trained run folder whose model is the best checkpoint (``best_path``, recalibrated
    when ``bn_recalibration`` says it was kept), loaded in ``setup.model`` on every rank."""

    cfg: ExperimentConfig
    run_dir: Path
    best_path: Path
    best_epoch: int  # 0-based, as in the checkpoint
    meta: dict[str, Any]  # the checkpoint's meta (checkpoint_meta)
    history: list[dict[str, Any]]
    seconds: float  # the training time of this call (resumed epochs before it not included)
    bn_recalibration: dict[str, Any] | None
    setup: Setup  # data, loaders and the (possibly DDP-wrapped) model
    compute: Compute  # device, precision and the DDP ranks

    @property
    def model(self) -> nn.Module:
        """The bare network (without a DDP wrapper)."""
        inner = getattr(self.setup.model, "module", self.setup.model)
        assert isinstance(inner, nn.Module)
        return inner


class Evaluate(Protocol):
    """``medxfer.evaluate.finish.evaluate_trained``'s signature: evaluate a trained run, write
    its metrics.json (last) and return the metrics."""

    def __call__(
        self,
        trained: TrainedRun,
        *,
        evaluate_test: bool = True,
        warn_shift: bool = True,
        trust: bool = True,
    ) -> dict[str, Any]: ...
