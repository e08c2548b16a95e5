"""The handlers of ``medxfer run`` and ``medxfer paper-table`` (parsers live in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def cmd_run(args: argparse.Namespace) -> int:
    from medxfer.experiment import load_experiment, run_experiment

    exp = load_experiment(args.experiment, list(args.overrides))
    cells = exp.cells()
    if len(cells) > 1:
        console.print(f"{len(cells)} cells: {', '.join(c.name for c in cells)}")
    out = run_experiment(exp)
    report = out / "report.html"
    if report.exists():
        console.print(f"report: {report}")
    print(out)
    return 0


def cmd_paper_table(args: argparse.Namespace) -> int:
    from medxfer.report.paper import write_table

    folders = [Path(d) for d in args.experiments]
    out_json, md, n = write_table(folders, Path(args.out or folders[0] / "paper-table.json"))
    console.print(f"{n} row(s); markdown: {md}")
    print(out_json)
    return 0
