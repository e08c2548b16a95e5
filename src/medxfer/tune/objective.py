"""One trial = one ``fit`` of the sampled config on train/val; the test split is never touched.

``Objective`` follows the Optuna examples' pattern (a callable class holding config and data):

    study.optimize(Objective(cfg, params, study_dir, evaluate=evaluate_trained), n_trials=20)

Each epoch reports the validation metric to the trial, so the pruner can stop a poor trial early;
the objective value is the best validation metric over the epochs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import optuna

from medxfer.config import ExperimentConfig, with_values
from medxfer.errors import MedxferError
from medxfer.runs import config_inputs, remove_run_dir
from medxfer.train.callbacks import Callback
from medxfer.train.loop import fit
from medxfer.train.trained import Evaluate
from medxfer.tune.search_space import Param, apply_params, suggest

Direction = Literal["maximize", "minimize"]
METRICS: dict[str, Direction] = {
    "val_balanced_accuracy": "maximize",
    "val_accuracy": "maximize",
    "val_loss": "minimize",
}


def direction(metric: str) -> Direction:
    if metric not in METRICS:
        raise MedxferError(f"tune.metric={metric!r} is not known", f"use one of {list(METRICS)}")
    return METRICS[metric]


def trial_config(base: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """The config one trial trains: the sampled values, then the per-trial budget."""
    cfg = apply_params(base, values)
    if base.tune.epochs > 0 and "train.epochs" not in values:
        cfg = with_values(cfg, {"train.epochs": base.tune.epochs})
    subset = min(1.0, cfg.data.train_subset * base.tune.train_subset)
    cfg = with_values(cfg, {"data.train_subset": subset})
    if base.tune.image_size > 0 and "data.image_size" not in values:
        cfg = with_values(cfg, {"data.image_size": base.tune.image_size})
    return cfg


def best_config(base: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """The full-budget config with the best values: what ``medxfer train --config`` gets."""
    return apply_params(base, values)


class Report(Callback):
    """``fit``'s callback in a trial: keep each epoch's ``metric`` (``seen``) and report it to
    the trial; raise ``TrialPruned`` (which stops ``fit``) when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.seen: list[float] = []

    def on_epoch_end(self, epoch: int, row: dict[str, Any]) -> None:
        value = float(row[self.metric])
        self.seen.append(value)
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_after_epoch", epoch + 1)
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {self.metric} {value:.4f}")


def best_of(history: list[float], metric: str) -> float:
    return min(history) if direction(metric) == "minimize" else max(history)


class Objective:
    """Train one sampled config per trial into ``<study_dir>/trials/<number>/``."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        params: list[Param],
        study_dir: Path,
        *,
        evaluate: Evaluate,
        threads: int = 0,
    ) -> None:
        self.cfg = cfg
        self.evaluate = evaluate  # metrics.json of the trial (val only), written after fit
        self.params = params
        self.study_dir = study_dir
        self.metric = cfg.tune.metric
        self.threads = threads  # torch threads per trial when several workers share the CPU
        direction(self.metric)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = trial_config(self.cfg, suggest(trial, self.params))
        if self.threads and cfg.train.threads == 0:
            cfg = with_values(cfg, {"train.threads": self.threads})
        run_dir = self.study_dir / "trials" / str(trial.number)
        if run_dir.exists():  # a leftover of an earlier attempt under this number: start fresh
            remove_run_dir(run_dir, inputs=config_inputs(cfg))
        trial.set_user_attr("trial_dir", str(run_dir))
        report = Report(trial, self.metric)
        try:
            trained = fit(cfg, run_dir, callbacks=(report,), recalibrate=False)
            result = self.evaluate(trained, evaluate_test=False)
        except MedxferError as err:
            trial.set_user_attr("error", err.message)
            raise
        finally:
            (run_dir / "last.pt").unlink(missing_ok=True)  # trials are never resumed
        trial.set_user_attr("epochs_run", result["epochs_run"])
        trial.set_user_attr("best_epoch", result["best_epoch"])
        value = best_of(report.seen, self.metric)
        if not math.isfinite(value):  # diverged: a failed trial, not one to retry
            raise FloatingPointError(f"{self.metric} is {value} (training diverged)")
        return value
