"""Study workers: one or more processes running trials against one storage.

Exactly ``n`` finished trials, however many workers: ``MaxTrialsCallback`` stops a worker once
the study holds ``n`` complete + pruned trials (``BusyStop`` already when the missing ones are
running elsewhere). Two workers may still ask for a trial at the same moment, so ``Guard`` runs
a trial only if fewer than ``n`` trials with lower numbers are queued, running or finished;
otherwise it is recorded as FAIL with the user attribute ``surplus`` (counted apart in the
summary). The storage numbers trials in order, so of any ``n + 1`` finished trials the last
numbered saw the other ``n`` when it started, and was not run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from medxfer.config import ExperimentConfig, TuneConfig
from medxfer.parallel import fresh_context
from medxfer.train.trained import Evaluate
from medxfer.tune.objective import Objective
from medxfer.tune.search_space import Param
from medxfer.tune.storage import open_storage, worker_id

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BUSY = (TrialState.RUNNING, *FINISHED)
CLAIMED = (TrialState.WAITING, *BUSY)


@dataclass
class Job:
    """Everything a worker process needs (picklable: it crosses a spawn)."""

    cfg: ExperimentConfig
    params: list[Param]
    study_dir: Path
    study_name: str
    storage: str | None
    n_trials: int
    timeout: float | None
    evaluate: Evaluate  # a module-level function (medxfer.evaluate.finish.evaluate_trained)


class SurplusTrial(Exception):
    """The study already has its trials; this one is not run."""


class Guard:
    """Wrap the objective: record the worker, refuse surplus trials, mark interruptions."""

    def __init__(self, objective: Objective, n_trials: int) -> None:
        self.objective = objective
        self.n_trials = n_trials

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        study = trial.study
        claimed = study.get_trials(deepcopy=False, states=CLAIMED)
        if sum(t.number < trial.number for t in claimed) >= self.n_trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise SurplusTrial(f"the study already has {self.n_trials} trials")
        try:
            return self.objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except optuna.TrialPruned:
            raise
        except Exception as err:
            if "error" not in trial.user_attrs:
                trial.set_user_attr("error", repr(err))
            raise


class BusyStop:
    """Stop this worker when the trials still missing are all running in other workers
    (this saves the surplus trial it would start next)."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if len(study.get_trials(deepcopy=False, states=BUSY)) >= self.n_trials:
            study.stop()


class FailureStop:
    """Stop this worker after ``limit`` failed trials in a row (a broken setup, not bad luck)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        failed = trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus")
        self.in_a_row = self.in_a_row + 1 if failed else 0
        if self.in_a_row >= self.limit:
            logging.getLogger("medxfer.tune").error(
                f"{self.in_a_row} trials failed in a row; this worker stops (see trials.csv)"
            )
            study.stop()


def make_sampler(t: TuneConfig, worker: int, n_existing: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded; the seed also depends on the worker and on the trials already in the study,
    so parallel workers and a resumed study do not replay the same random start."""
    return optuna.samplers.TPESampler(seed=t.seed + 1000 * worker + n_existing, constant_liar=True)


def make_pruner(t: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=t.startup_trials, n_warmup_steps=t.warmup_epochs
        )
    if t.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(epochs, 1), reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def work(
    job: Job, worker: int = 0, threads: int = 0, env: tuple[str, dict[str, str]] | None = None
) -> None:
    """One worker: run trials until the study holds ``job.n_trials`` finished ones.

    ``env``: the parent's working folder and environment (a fork server's children start with
    the server's, which may be older)."""
    if env is not None:
        os.chdir(env[0])
        os.environ.clear()
        os.environ.update(env[1])
    storage = open_storage(job.storage, job.study_dir)
    name = job.study_name
    existing = len(optuna.load_study(study_name=name, storage=storage).trials)
    epochs = job.cfg.tune.epochs or job.cfg.train.epochs
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(job.cfg.tune, worker, existing),
        pruner=make_pruner(job.cfg.tune, epochs),
    )
    if len(study.get_trials(deepcopy=False, states=BUSY)) >= job.n_trials:
        return
    objective = Objective(
        job.cfg, job.params, job.study_dir, evaluate=job.evaluate, threads=threads
    )
    study.optimize(
        Guard(objective, job.n_trials),
        timeout=job.timeout,
        catch=(Exception,),
        callbacks=[
            MaxTrialsCallback(job.n_trials, states=FINISHED),
            BusyStop(job.n_trials),
            FailureStop(job.cfg.tune.max_failures),
        ],
        gc_after_trial=True,
    )


def default_threads(n_workers: int) -> int:
    """Torch threads per worker when several share this machine's cores (0 = torch default)."""
    return 0 if n_workers <= 1 else max(1, (os.cpu_count() or 1) // n_workers)


def run(job: Job, n_workers: int) -> list[int]:
    """Run ``n_workers`` workers (in this process when 1); return their exit codes."""
    if n_workers == 1:
        work(job)
        return [0]
    ctx = fresh_context(__name__)  # never a fork of this process: its torch threads may run
    threads = default_threads(n_workers)
    env = (os.getcwd(), dict(os.environ))
    procs = [
        ctx.Process(target=work, args=(job, i, threads, env), name=f"medxfer-tune-{i}")
        for i in range(n_workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [p.exitcode if p.exitcode is not None else -1 for p in procs]
