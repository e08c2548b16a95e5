"""Collect finished experiment folders into the paper's results table.

    python bench/paper_table.py runs/experiments/cpu-brain-tumor runs/experiments/cpu-pneumonia \
        --ran-on runs/bench/gpu/paper/experiments/paper-brain-tumor="lent NVIDIA H200 ..."

writes bench/results/paper-table.json (``rows``: dataset, arch, weights, tuned, pruned, sparsity,
test accuracy and balanced accuracy with 95% intervals, the command, where it ran) and
paper-table.md; the table itself is ``medxfer paper-table``'s. Each experiment also gets its
stage times (from its ``stages/*.json`` markers: every part of a resumed stage). Without
folders: every folder under runs/experiments/. Folders not named in ``--ran-on`` ran here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS, machine

from medxfer.cli import main
from medxfer.experiment.spec import STAGES


def order(marker: Path) -> int:
    return STAGES.index(marker.stem) if marker.stem in STAGES else len(STAGES)


def stage_seconds(folder: Path) -> dict[str, Any]:
    """Per cell: each stage's seconds (its marker) and their sum."""
    out: dict[str, Any] = {}
    for cell in sorted({p.parent.parent for p in folder.rglob("stages/*.json")}):
        stages, last_part_only = {}, []
        for marker in sorted((cell / "stages").glob("*.json"), key=order):
            if marker.name.endswith(".partial.json"):  # a stage still running or killed
                continue
            m = json.loads(marker.read_text())
            stages[marker.stem] = round(m.get("seconds", 0.0), 1)
            if "seconds_parts" not in m:
                last_part_only.append(marker.stem)
        out[str(cell.relative_to(folder)) or "."] = {
            "stages": stages,
            "total_seconds": round(sum(stages.values()), 1),
            # markers written before medxfer kept every part of a resumed stage
            "stages_timed_by_last_part_only": last_part_only,
        }
    return out


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*", type=Path)
    ap.add_argument("--ran-on", action="append", default=[], metavar="DIR=TEXT",
                    help="where the experiment in DIR ran (default: this machine)")  # fmt: skip
    ap.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = ap.parse_args()
    dirs = args.experiments or sorted((REPO / "runs" / "experiments").glob("*"))
    where = {}
    for item in args.ran_on:
        folder, _, text = item.partition("=")
        where[Path(folder).resolve().name] = text
        if Path(folder) not in dirs:
            dirs.append(Path(folder))
    out = RESULTS / "paper-table.json"
    rc = main(["paper-table", *map(str, dirs), "--out", str(out)])
    if rc:
        return rc
    here = machine()
    here_text = f"this machine: {here.get('cpu_model')}, {here['cpu_count']} CPU cores, no GPU"
    data = json.loads(out.read_text())
    for row in data["rows"]:
        row["ran_on"] = where.get(row["experiment"], here_text)
    data["experiments"] = {
        Path(d).resolve().name: {
            "ran_on": where.get(Path(d).resolve().name, here_text),
            "cells": stage_seconds(Path(d)),
        }
        for d in dirs
    }
    data["notes"] = [
        "stage times count every part of a stage that was stopped and resumed, except the "
        "stages listed under stages_timed_by_last_part_only (markers written before medxfer "
        "recorded the parts): there only the last part counts",
        *args.note,
    ]
    data["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    data["machine"] = here
    out.write_text(json.dumps(data, indent=2))
    md = out.with_suffix(".md")
    lines = ["\nWhere each study ran, and the time of its stages (seconds):\n"]
    for name, e in data["experiments"].items():
        for cell, t in e["cells"].items():
            label = name if cell == "." else f"{name}/{cell}"
            parts = ", ".join(f"{k} {v:.0f}" for k, v in t["stages"].items())
            lines.append(f"- {label}: {e['ran_on']}; {parts}; total {t['total_seconds']:.0f}")
    lines += ["\nNotes:\n", *[f"- {n}" for n in data["notes"]]]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main_())
