from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

# Under pytest-xdist (two workers: pyproject.toml's addopts) each worker, and every process its
# tests start, computes on one thread, so that two workers fill two cores without
# oversubscribing them (7 minutes instead of 12 on 2 cores). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own decode cache; torch hub points to an empty folder (no downloads)."""
    monkeypatch.setenv("MEDXFER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medxfer.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "set", size=64, seed=0)


@pytest.fixture
def bench_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Imports a module of bench/ or studies/ by name, without keeping what bench/_common.py
    installs process-wide (its excepthook and SIGTERM handler) past the test."""
    hook, term = sys.excepthook, signal.getsignal(signal.SIGTERM)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.syspath_prepend(str(REPO / "studies"))
    yield importlib.import_module
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, term)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent (only present on the developers' machines)")
    return path


os.environ.setdefault("OMP_NUM_THREADS", "2")
