"""Run folders: ``<out_dir>/<name>-<config fingerprint>``; complete when metrics.json exists."""

from __future__ import annotations

import shutil
from pathlib import Path

from medxfer.config import ExperimentConfig
from medxfer.errors import MedxferError


def run_dir_for(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.name}-{cfg.fingerprint()}"


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> bool:
    """Decide what to do with an existing folder. Returns True when training should resume."""
    if not run_dir.exists():
        return False
    if force:
        shutil.rmtree(run_dir)
        return False
    if is_complete(run_dir):
        return True  # resume of a complete run only re-reads its results
    if resume:
        return True
    if (run_dir / "last.pt").exists():
        raise MedxferError(
            f"{run_dir} holds an unfinished run of this config",
            "add --resume to continue it, or --force to start again",
        )
    return False
