"""``run_experiment``: every cell of the matrix, every stage in order, done-markers between.

A stage that finishes writes ``<cell>/stages/<stage>.json`` (its fingerprint, outputs and
seconds). A re-run reads the marker and skips the stage when the fingerprint still matches; a
stage that was killed has no marker and is run again, resuming through its own package. Each
call writes ``<cell>/experiment.json`` with what happened to every stage this time.
"""

from __future__ import annotations

import copy
import json
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medxfer.errors import MedxferError
from medxfer.experiment.spec import STAGES, Cell, Experiment
from medxfer.experiment.stages import AFTER, RUN, Context, StageUnavailable, fingerprint
from medxfer.train.checkpoint import atomic_write_json

console = Console(stderr=True)


def command_for(exp: Experiment) -> str:
    parts = ["medxfer", "run", *([str(exp.path)] if exp.path else []), *exp.overrides]
    return shlex.join(parts)


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker


class StageClock:
    """The time a stage has run over all its attempts. While it runs, a daemon thread rewrites
    ``path`` every ``every`` seconds with the earlier parts and this one's time so far, so a
    stage killed in any way (even SIGKILL) and resumed later counts the killed part too (to
    within ``every`` seconds). Parts recorded under another fingerprint are ignored."""

    def __init__(self, path: Path, fingerprint: str, every: float = 15.0) -> None:
        self.path, self.fingerprint, self.every = path, fingerprint, every
        earlier = read_marker(path) or {}
        self.earlier: list[float] = (
            [float(x) for x in earlier.get("parts", [])]
            if earlier.get("fingerprint") == fingerprint else []
        )  # fmt: skip
        self._t0 = 0.0
        self._end: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def parts(self) -> list[float]:
        end = time.perf_counter() if self._end is None else self._end
        return [*self.earlier, end - self._t0]

    @property
    def total(self) -> float:
        return sum(self.parts)

    def _write(self) -> None:
        atomic_write_json({"fingerprint": self.fingerprint, "parts": self.parts}, self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def __enter__(self) -> StageClock:
        self._t0 = time.perf_counter()
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write()  # an exception (Ctrl-C, an error) keeps this part for the next attempt


def run_stage(ctx: Context, stage: str, log: dict[str, Any]) -> None:
    """Run (or skip) one stage; record its status in ``ctx`` and ``log``."""
    if not ctx.exp.stages.on(stage):
        ctx.status[stage] = "off"
        log[stage] = {"status": "off"}
        return
    fp = fingerprint(stage, ctx)
    marker_path = ctx.cell.dir / "stages" / f"{stage}.json"
    marker = read_marker(marker_path)
    ran = None  # a skipped stage: the seconds it took when it ran
    if marker is not None and marker.get("fingerprint") == fp:
        outputs, status, seconds, ran = marker["outputs"], "complete", 0.0, marker.get("seconds")
        console.print(f"[dim]{ctx.cell.name}: {stage} already complete, skipped[/]")
    else:
        console.rule(f"{ctx.cell.name}: {stage}")
        marker_path.parent.mkdir(parents=True, exist_ok=True)
        clock = StageClock(marker_path.with_suffix(".partial.json"), fp)
        try:
            with clock:
                outputs = RUN[stage](ctx)
        except StageUnavailable as why:  # it did not run: no time to carry over
            clock.path.unlink(missing_ok=True)
            ctx.status[stage] = f"unavailable: {why}"
            log[stage] = {"status": "unavailable", "reason": str(why)}
            console.print(f"[bold yellow]{ctx.cell.name}: {why}")
            return
        seconds = clock.total
        status = "done"
        atomic_write_json(
            {
                "stage": stage,
                "fingerprint": fp,
                "outputs": outputs,
                "seconds": seconds,  # every part of a stage that was stopped and resumed
                "seconds_parts": clock.parts,
                "command": ctx.command,
            },
            marker_path,
        )
        clock.path.unlink(missing_ok=True)
    ctx.outputs[stage] = outputs
    ctx.status[stage] = status
    log[stage] = {"status": status, "seconds": seconds, "fingerprint": fp}
    if ran is not None:
        log[stage]["seconds_when_run"] = ran
    if stage in AFTER:
        AFTER[stage](ctx, outputs)


def run_cell(exp: Experiment, ctx: Context) -> dict[str, Any]:
    ctx.cell.dir.mkdir(parents=True, exist_ok=True)
    if not ctx.cfg.data.root:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    log: dict[str, Any] = {}
    t0 = time.perf_counter()
    for stage in STAGES:
        run_stage(ctx, stage, log)
    summary = {
        "experiment": exp.base.name,
        "cell": ctx.cell.name,
        "values": ctx.cell.values,
        "command": ctx.command,
        "stages": log,
        "seconds": time.perf_counter() - t0,  # this invocation
        # every stage's own time (a skipped stage: when it ran; a resumed one: all its parts)
        "stage_seconds_total": sum(
            v.get("seconds_when_run", v.get("seconds", 0.0)) for v in log.values()
        ),
    }
    atomic_write_json(summary, ctx.cell.dir / "experiment.json")
    return summary


def check_data_roots(cells: list[Cell]) -> None:
    """Every cell's data folder exists before the first stage of the first cell runs, so a
    typo in the last cell of a matrix does not surface hours into the experiment."""
    missing = sorted(
        {c.cfg.data.root for c in cells if c.cfg.data.root and not Path(c.cfg.data.root).exists()}
    )
    if missing:
        names = ", ".join(c.name for c in cells if c.cfg.data.root in missing)
        raise MedxferError(
            f"data.root {', '.join(missing)} does not exist (cell {names})",
            "fix the path in the experiment file or pass data.root=/path/to/data",
        )


def run_experiment(exp: Experiment, *, command: str | None = None) -> Path:
    """Run every cell; with several cells also an overview report. Returns the folder."""
    command = command or command_for(exp)
    cells = exp.cells()
    check_data_roots(cells)
    contexts = []
    for cell in cells:
        ctx = Context(exp, cell, copy.deepcopy(cell.cfg), command)
        run_cell(exp, ctx)
        contexts.append(ctx)
    if len(cells) > 1 and exp.stages.report:
        from medxfer.report import write_overview

        write_overview(
            exp.base.name,
            [
                {
                    "cell": c.cell.name,
                    "dir": str(c.cell.dir),
                    "status": c.status,
                    "outputs": c.outputs,
                }
                for c in contexts
            ],
            exp.dir,
            command,
        )
    return exp.dir
