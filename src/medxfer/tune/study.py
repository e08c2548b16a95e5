"""``run_study``: validate, open (or resume) the study, run its workers, write the reports.

Storage: an Optuna journal file in the study folder by default (``<study_dir>/study.journal``),
or any RDB URL (``postgresql://...``) for workers on several machines. A study that is run again
resumes: trials left RUNNING by a killed worker are marked FAIL and their parameters retried,
and workers stop once the study holds exactly ``n_trials`` finished (complete + pruned) trials.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from medxfer.config import ExperimentConfig, drop_later_defaults, save_config
from medxfer.errors import MedxferError
from medxfer.train.trained import Evaluate
from medxfer.tune import workers
from medxfer.tune.objective import METRICS, best_config, direction
from medxfer.tune.report import write_reports
from medxfer.tune.search_space import parse_space
from medxfer.tune.storage import describe, open_storage, recover_interrupted

PRUNERS = ("median", "halving", "hyperband", "none")


@dataclass
class StudyOptions:
    n_trials: int | None = None  # None = tune.n_trials
    storage: str | None = None  # URL or journal file; None = <study_dir>/study.journal
    workers: int = 1
    timeout: float | None = None  # seconds per worker
    study_name: str | None = None  # None = <name>-<hash of config and tune settings>
    retrain: bool = False


def check_settings(cfg: ExperimentConfig, opts: StudyOptions) -> int:
    """Check the tune settings; return the number of trials."""
    t = cfg.tune
    n = t.n_trials if opts.n_trials is None else opts.n_trials
    direction(t.metric)
    problems = {
        "the number of trials must be at least 1": n < 1,
        f"tune.pruner={t.pruner!r} is not one of {list(PRUNERS)}": t.pruner not in PRUNERS,
        "tune.epochs must be >= 0 (0 = train.epochs)": t.epochs < 0,
        "tune.train_subset must be in (0, 1]": not 0 < t.train_subset <= 1,
        "tune.max_failures must be at least 1": t.max_failures < 1,
        "tune.startup_trials and tune.warmup_epochs must be >= 0": t.startup_trials < 0
        or t.warmup_epochs < 0,
        "--workers must be at least 1": opts.workers < 1,
        "--timeout must be positive": opts.timeout is not None and opts.timeout <= 0,
    }
    for message, bad in problems.items():
        if bad:
            raise MedxferError(message, "see the tune section of the config")
    if cfg.data.root and not Path(cfg.data.root).exists():
        raise MedxferError(f"data.root {cfg.data.root} does not exist", "check --data")
    return n


def study_fingerprint(cfg: ExperimentConfig) -> str:
    """What identifies a study: the config and tune settings, not the number of trials."""
    t = drop_later_defaults({"tune": cfg.to_dict()["tune"]})["tune"]
    for key in ("n_trials", "max_failures"):
        t.pop(key)
    blob = json.dumps({"config": cfg.fingerprint(), "tune": t}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def study_dir_for(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.out_dir) / "tune" / name


def open_study(
    cfg: ExperimentConfig, storage: optuna.storages.BaseStorage, name: str
) -> optuna.Study:
    """Create the study, or load it and check it was started with the same settings."""
    study = optuna.create_study(
        study_name=name, storage=storage, direction=direction(cfg.tune.metric), load_if_exists=True
    )
    fp = study_fingerprint(cfg)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", fp)
        study.set_user_attr("metric", cfg.tune.metric)
    elif known != fp:
        raise MedxferError(
            f"study {name!r} was started with another config or search space",
            "use the original config, or another --study-name",
        )
    return study


def run_study(cfg: ExperimentConfig, opts: StudyOptions, *, evaluate: Evaluate) -> dict[str, Any]:
    """Run the study to ``n_trials`` finished trials; return the summary (summary.json).

    ``evaluate``: what evaluates each trial (validation only) and the retrained best config
    after ``fit`` (``medxfer.evaluate.finish.evaluate_trained``, passed in by the command:
    this layer lies below evaluation; a module-level function, as workers are spawned)."""
    n = check_settings(cfg, opts)
    params = parse_space(cfg.tune.space, cfg)
    name = opts.study_name or f"{cfg.name}-{study_fingerprint(cfg)}"
    study_dir = study_dir_for(cfg, name)
    storage = open_storage(opts.storage, study_dir)
    study = open_study(cfg, storage, name)
    save_config(cfg, _mkdir(study_dir) / "config.yaml")
    retried = recover_interrupted(study)
    t0 = time.perf_counter()
    job = workers.Job(cfg, params, study_dir, name, opts.storage, n, opts.timeout, evaluate)
    codes = workers.run(job, opts.workers) if workers.finished(study) < n else []
    study = optuna.load_study(study_name=name, storage=storage)
    extra = {"storage": describe(opts.storage, study_dir), "workers": opts.workers,
             "worker_exit_codes": codes, "retried_trials": retried,
             "wall_seconds": time.perf_counter() - t0, "metric": cfg.tune.metric,
             "direction": METRICS[cfg.tune.metric]}  # fmt: skip
    summary = write_reports(study, cfg, study_dir, n, extra)
    if opts.retrain and summary["best"] is not None:
        summary["retrain"] = retrain(cfg, summary["best"], study_dir, evaluate)
        (study_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def retrain(
    cfg: ExperimentConfig, best: dict[str, Any], study_dir: Path, evaluate: Evaluate
) -> dict[str, Any]:
    """Train the best trial's config with the full budget; evaluate it once on the test split.

    One folder per best trial (``retrain-<number>``): a study extended later may find another."""
    from medxfer.runs import is_complete, prepare_run_dir
    from medxfer.train.loop import fit
    from medxfer.train.record import check_reuse

    run_dir = study_dir / f"retrain-{best['number']}"
    run_cfg = best_config(cfg, best["params"])
    if is_complete(run_dir):
        check_reuse(run_cfg, run_dir)
        results: dict[str, Any] = json.loads((run_dir / "metrics.json").read_text())
    else:
        resume = prepare_run_dir(run_dir, resume=True, force=False)
        results = evaluate(fit(run_cfg, run_dir, resume=resume))
    return {"run_dir": str(run_dir), "test": results.get("test"), "val": results.get("val")}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
