"""Worker processes that are never a fork of this process.

A ``fork`` copies the calling process with every lock exactly as its other threads held it at
that instant: torch's OpenMP pool, rich's progress refresh thread, a half-finished import. A
child that then needs one of those locks waits forever; Python 3.12 warns about forking a
multi-threaded process and 3.14 no longer forks by default. medxfer's processes are
multi-threaded as soon as a model or a progress bar exists, so its workers come from a fork
server (a clean single-threaded process that imports what they need once, then forks them) or,
where there is none, from ``spawn``.

``process_map`` is the ordered parallel ``map`` of ``medxfer audit``. (The decode cache needs no
processes: Pillow decodes and resizes without the GIL, so it uses threads.) It runs on
:class:`concurrent.futures.ProcessPoolExecutor`, which reports a worker that died (killed, out of
memory) as an error, where ``multiprocessing.Pool`` would wait for its results forever.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import TypeVar

from medxfer.errors import MedxferError

T = TypeVar("T")
R = TypeVar("R")

_PRELOAD: set[str] = set()


def fresh_context(*preload: str) -> ForkServerContext | SpawnContext:
    """A start method that never forks this process: the fork server where the platform has one
    (importing ``preload`` modules once, if it is not running yet), else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    _PRELOAD.update(preload)  # one server for all callers: it preloads what any of them asked
    ctx.set_forkserver_preload(sorted(_PRELOAD))
    return ctx


def _enter(cwd: str) -> None:
    os.chdir(cwd)  # a fork server's children start in the server's folder: relative paths hold


def process_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    chunksize: int = 32,
    preload: tuple[str, ...] = (),
    what: str = "worker",
) -> Iterator[R]:
    """``map(fn, items)`` in ``workers`` fresh processes, results in order as they finish.

    ``fn`` must be a module-level function (or a ``functools.partial`` of one). A worker that
    dies ends the map with a :class:`MedxferError`, never a hang."""
    ctx = fresh_context(*preload)
    pool = ProcessPoolExecutor(workers, ctx, initializer=_enter, initargs=(os.getcwd(),))
    try:
        yield from pool.map(fn, items, chunksize=chunksize)
    except BrokenProcessPool as err:
        raise MedxferError(
            f"a {what} process died before it finished ({err})",
            "look for an out-of-memory kill (dmesg), or run with one worker",
        ) from err
    finally:  # stopped early (an error, Ctrl-C): drop the work not started yet
        pool.shutdown(wait=True, cancel_futures=True)
