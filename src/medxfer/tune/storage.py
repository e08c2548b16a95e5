"""Study storage and recovery of interrupted trials.

- ``open_storage(None, study_dir)``: an Optuna journal file ``<study_dir>/study.journal`` (safe
  for several processes on one machine); a plain path: a journal file there; a URL
  (``postgresql://user:pw@host/db``): an RDB storage with heartbeats, for several machines.
- ``recover_interrupted``: a trial left RUNNING by a worker that no longer exists (killed, machine
  rebooted) is marked FAIL and its parameters are queued again; so is a trial stopped by Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from medxfer.errors import MedxferError

MAX_RETRY = 2  # times the parameters of one interrupted trial are tried again
ORPHAN_SECONDS = 60.0  # a RUNNING trial without an owner this old is considered dead
HEARTBEAT_S, GRACE_S = 60, 180  # RDB storages: a trial without a heartbeat for GRACE_S is dead


def retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    """Queue a failed trial's parameters again (``RetryHeartbeatStaleTrialCallback`` from 4.9)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", RetryFailedTrialCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecated-name warnings
        callback: Callable[[optuna.Study, FrozenTrial], None] = cls(max_retry=MAX_RETRY)
    return callback


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def describe(spec: str | None, study_dir: Path) -> str:
    """The storage for messages and the summary, with any password hidden."""
    if not spec:
        return str(study_dir / "study.journal")
    if "://" not in spec:
        return spec
    try:
        from sqlalchemy.engine import make_url

        return make_url(spec).render_as_string(hide_password=True)
    except Exception:
        return spec.split("://")[0] + "://..."


def open_storage(spec: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    if spec and "://" in spec:
        return _rdb(spec)
    path = Path(spec) if spec else study_dir / "study.journal"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise MedxferError(
            f"cannot open the study journal {path}: {err.strerror or err}",
            "give --storage a writable file path or a database URL",
        ) from None


def _with_driver(url: str) -> str:
    """``postgresql://`` names no driver, and SQLAlchemy's default changed (psycopg2 in 2.0,
    psycopg 3 in 2.1): use whichever of the two is installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    rest = url.split("://", 1)[1]
    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return url


def _rdb(given: str) -> optuna.storages.BaseStorage:
    url, shown = _with_driver(given), describe(given, Path())
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):
        engine["connect_args"] = {"connect_timeout": 10}
    params = inspect.signature(RDBStorage).parameters
    cb = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else None
    retry = {cb or "failed_trial_callback": retry_callback()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                **retry,  # type: ignore[arg-type]
            )
    except ImportError as err:
        raise MedxferError(
            f"the database driver for {shown} is not installed ({err})",
            "pip install psycopg2-binary (PostgreSQL) or the driver the URL names",
        ) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedxferError(
            f"cannot reach the study storage {shown}: {first}",
            "check that the database server runs and the URL (user, password, host, port, db)",
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphan(trial: FrozenTrial, now: datetime) -> bool:
    """A RUNNING trial whose worker process is gone (known only for workers on this host)."""
    owner = trial.user_attrs.get("worker")
    if owner is None:
        started = trial.datetime_start or now
        return (now - started).total_seconds() > ORPHAN_SECONDS
    host, _, pid = str(owner).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _retried(trials: list[FrozenTrial]) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _should_retry(t: FrozenTrial, done: set[int]) -> bool:
    """Failed by a kill or Ctrl-C, not by an error of its own (those would fail again)."""
    if t.state != TrialState.FAIL or t.number in done:
        return False
    if len(t.system_attrs.get("retry_history", [])) >= MAX_RETRY:
        return False
    return bool(t.user_attrs.get("interrupted")) or not {"error", "surplus"} & set(t.user_attrs)


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail orphaned RUNNING trials; queue the parameters of interrupted trials once more.

    Returns the numbers of the trials queued again. Call it while no worker of this study runs
    on this machine (``run_study`` does, before it starts its workers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RDB heartbeats (also queues the retries)
        now = datetime.now()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if is_orphan(t, now):
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        trials = study.get_trials(deepcopy=False)
        done = _retried(trials)
        retry = retry_callback()
        queued = [t.number for t in trials if _should_retry(t, done)]
        for number in queued:
            retry(study, trials[number])
    return queued
