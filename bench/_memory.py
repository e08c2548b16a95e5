"""Memory of a process tree from /proc, sampled while a command runs (for bench/scale.py).

``measure`` runs a command and returns its wall time, its peak RSS from ``wait4``
(``ru_maxrss``, i.e. ``VmHWM``, mapped file pages included) and, per process of its tree, the
peaks of ``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile`` and ``RssShmem`` sampled every 0.1 s,
its torchrun rank (``LOCAL_RANK``, -1 for none), its command line and the files under a given
folder it mapped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from _common import REPO

MB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return found


class Sampler(threading.Thread):
    """Peak /proc memory numbers of a process tree, and which cache files each process maps."""

    def __init__(self, pid: int, cache_dir: Path, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.cache_dir, self.every = pid, str(cache_dir), every
        self.peaks: dict[int, dict[str, int]] = {}
        self.rank: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.maps: dict[int, set[str]] = {}
        self.done = threading.Event()

    def _identify(self, pid: int) -> None:
        """The torchrun rank (-1: none) and command line; read again until the process has a
        rank, since a process sampled between fork and exec still shows its parent's."""
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [int(e.split(b"=")[1]) for e in env if e.startswith(b"LOCAL_RANK=")]
            self.rank[pid] = ranks[0] if ranks else -1
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            self.cmd[pid] = b" ".join(argv).decode(errors="replace")[:300]
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        tick = 0
        while not self.done.is_set():
            for pid in _tree(self.pid):
                if self.rank.get(pid, -1) < 0:
                    self._identify(pid)
                peak = self.peaks.setdefault(pid, {})
                for key, value in _status(pid).items():
                    peak[key] = max(peak.get(key, 0), value)
                if tick % 10 == 0:
                    try:
                        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
                        files = {ln.split()[-1] for ln in lines if self.cache_dir in ln}
                        self.maps.setdefault(pid, set()).update(files)
                    except OSError:
                        pass
            tick += 1
            self.done.wait(self.every)


def measure(cmd: list[str], env: dict[str, str], log: Path, cache_dir: Path) -> dict[str, Any]:
    """Run ``cmd``; its wall time, its peak RSS (ru_maxrss) and the sampled /proc peaks."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        sampler = Sampler(proc.pid, cache_dir)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # stopped: so is the whole tree (torchrun's workers have sessions
            for pid in reversed(_tree(proc.pid)):  # of their own, out of reach of killpg)
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            proc.wait()
            raise
        finally:
            sampler.done.set()
            sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    procs = [
        {"rank": sampler.rank.get(pid, -1), "command": sampler.cmd.get(pid, ""),
         "maps_cache": sorted(sampler.maps.get(pid, ())),
         **{f"{k}_mb": round(v / MB, 1) for k, v in peak.items()}}
        for pid, peak in sampler.peaks.items() if peak
    ]  # fmt: skip
    return {"seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "processes": procs}  # fmt: skip
