"""Shared helpers for the benchmarks: machine facts, JSON output, running commands."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


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


def run(cmd: list[str], log: Path | None = None) -> tuple[str, float]:
    """Run a command, echo it, return (stdout, seconds). Raises on failure."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout, seconds


def medxfer_cmd() -> list[str]:
    return [sys.executable, "-m", "medxfer"]


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
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
