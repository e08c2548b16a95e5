"""``subprocess.run`` for tests: a command that outlives its timeout fails the test with every
thread's Python stack (faulthandler on SIGABRT), not a bare ``TimeoutExpired``, so a hang seen
once on CI names its line (not a test module itself)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its output captured as text, like ``subprocess.run``."""
    full_env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack, then exits
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"`{shlex.join(cmd)}` still ran after {timeout} s; its stacks:\n{err[-8000:]}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
