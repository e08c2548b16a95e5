"""Shared helpers of the benchmarks (bench/) and the studies (studies/): machine facts, JSON
output, running commands. A benchmark writes bench/results/<name>/<variant>.json, a study
studies/results/<name>/<variant>.json."""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medxfer.errors import MedxferError

REPO = Path(__file__).resolve().parents[1]
# MEDXFER_BENCH_RESULTS: write elsewhere (the tests do, to leave the committed results alone)
RESULTS = Path(os.environ.get("MEDXFER_BENCH_RESULTS") or REPO / "bench" / "results")
STUDY_RESULTS = Path(os.environ.get("MEDXFER_BENCH_RESULTS") or REPO / "studies" / "results")
SHARED_DATA = REPO.parent / "shared" / "data"


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `kill` of a bench stops what it started


def _medxfer_error_hook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
    """A bench's bad input (a missing run folder, an unknown arch) ends as the medxfer command
    line ends it: the error and its fix, no traceback; anything else as Python reports it."""
    if isinstance(err, MedxferError):
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(kind, err, tb)


sys.excepthook = _medxfer_error_hook


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        info["cpu_model"] = model[0].split(":", 1)[1].strip() if model else None
    except OSError:
        pass
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def training_seconds(lottery: Path) -> float:
    """Every level's training time in a lottery folder (epochs only, each run's metrics.json),
    whichever invocation trained it: a resumed bench call's own wall time misses the rest."""
    runs = lottery.glob("level_*/*/metrics.json")
    return round(sum(json.loads(m.read_text())["train_seconds"] for m in runs), 1)


def run(cmd: list[str], log: Path | None = None) -> tuple[str, float]:
    """Run a command, echo it, return (stdout, seconds). Raises on failure."""
    stdout, seconds, _ = run_timed(cmd, log)
    return stdout, seconds


def run_timed(cmd: list[str], log: Path | None = None) -> tuple[str, float, float]:
    """``run`` that also returns the CPU seconds (user + system) of the command and every
    process it waited for: on a shared machine the load-independent cost of a 1-thread job."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
        except BaseException:  # Ctrl-C, or SIGTERM turned into SystemExit: stop the child too
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if log is not None:
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return stdout, seconds, usage.ru_utime + usage.ru_stime


def abspath(path: str) -> Path:
    """argparse type for paths: absolute against the caller's folder, since the commands a
    bench starts run from the repository root."""
    return Path(path).resolve()


def medxfer_cmd() -> list[str]:
    return [sys.executable, "-m", "medxfer"]


def save(name: str, payload: dict[str, Any], root: Path = RESULTS) -> Path:
    """Writes ``root/<name>.json``; ``name`` is ``<benchmark>/<variant>``."""
    out = root / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **payload,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out
