"""The benchmarks end bad input the way the command line does: the message and its fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_bad_input_is_one_clear_message(tmp_path: Path) -> None:
    cmd = [sys.executable, "inference_layout.py", "--runs", str(tmp_path / "no-run")]
    r = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: no checkpoint at {tmp_path / 'no-run'}")
    assert "fix: pass a run folder" in r.stderr and "Traceback" not in r.stderr


def test_audit_check_without_its_reference_list(tmp_path: Path) -> None:
    cmd = [sys.executable, "audit_check.py", "--data", str(tmp_path)]
    r = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path} has no train_test_near_duplicates.csv")
