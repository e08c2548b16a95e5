"""Collect finished experiment folders into the paper's results table.

    python studies/paper_table.py runs/experiments/cpu-brain-tumor runs/experiments/cpu-pneumonia \
        --ran-on runs/bench/gpu/paper/experiments/paper-brain-tumor="lent NVIDIA H200 ..."

writes studies/results/paper-table/paper-table.json (``rows``: dataset, arch, weights, tuned,
pruned, sparsity, test accuracy and balanced accuracy with 95% intervals, the command, where
it ran) and paper-table.md; the table itself is ``medxfer paper-table``'s. Each experiment
also gets its stage times (from its ``stages/*.json`` markers: every part of a resumed
stage). Without folders: every folder under runs/experiments/. Folders not named in
``--ran-on`` ran here.

``--keep-committed`` adds the given experiments to the committed table instead of replacing
it: its rows, stage times and notes stay for every experiment not given again (their folders
may be gone, e.g. a lent GPU's), and each call's command is kept in ``commands``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import REPO, STUDY_RESULTS, machine

from medxfer.cli import main
from medxfer.experiment.spec import STAGES
from medxfer.report.paper import write_rows


def order(marker: Path) -> int:
    return STAGES.index(marker.stem) if marker.stem in STAGES else len(STAGES)


def lottery_training_seconds(cell: Path) -> float:
    """The training time (epochs only, from each run's metrics.json) of every pruned-level run
    in the cell's lottery, however many invocations trained them; 0 without a prune stage."""
    marker = cell / "stages" / "prune.json"
    if not marker.exists():
        return 0.0
    # by position in the cell, not the stored paths: a folder may have moved (GPU runs)
    folder = cell / Path(json.loads(marker.read_text())["outputs"]["dir"]).name
    return sum(
        json.loads(m.read_text())["train_seconds"]
        for m in folder.glob("level_*/*/metrics.json")
        if m.parent.parent.name != "level_0"
    )


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
        runs = lottery_training_seconds(cell)
        total = sum(stages.values()) + max(0.0, runs - stages.get("prune", 0.0))
        out[str(cell.relative_to(folder)) or "."] = {
            "stages": stages,
            # a prune stage rerun that only added runs (prune.finetune) is timed by its marker
            # for the added runs alone; this sums the epochs of every run in its lottery
            "prune_runs_training_seconds": round(runs, 1),
            "total_seconds": round(total, 1),
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
    ap.add_argument("--keep-committed", action="store_true",
                    help="add to the committed paper-table.json, not replace it")  # fmt: skip
    args = ap.parse_args()
    dirs = args.experiments or sorted((REPO / "runs" / "experiments").glob("*"))
    where = {}
    for item in args.ran_on:
        folder, _, text = item.partition("=")
        where[Path(folder).resolve().name] = text
        if Path(folder) not in dirs:
            dirs.append(Path(folder))
    out = STUDY_RESULTS / "paper-table" / "paper-table.json"
    kept = json.loads(out.read_text()) if args.keep_committed else {}
    kept_md = out.with_suffix(".md").read_text() if kept else ""
    rc = main(["paper-table", *map(str, dirs), "--out", str(out)])
    if rc:
        return rc
    given = {Path(d).resolve().name for d in dirs}
    if kept:
        clash = given & set(kept["experiments"])
        if clash:  # its rows would be replaced by folders that may hold other runs
            out.write_text(json.dumps(kept, indent=2))
            out.with_suffix(".md").write_text(kept_md)  # `paper-table` rewrote both
            sys.exit(f"experiment name(s) {sorted(clash)} already in the committed table: "
                     "copy the folder to a new name")  # fmt: skip
        rows = [r for r in kept["rows"] if r["experiment"] not in given]
        write_rows(rows + json.loads(out.read_text())["rows"], out)
    here = machine()
    here_text = f"this machine: {here.get('cpu_model')}, {here['cpu_count']} CPU cores, no GPU"
    data = json.loads(out.read_text())
    for row in data["rows"]:
        if row["experiment"] in given:
            row["ran_on"] = where.get(row["experiment"], here_text)
    data["experiments"] = kept.get("experiments", {}) | {
        Path(d).resolve().name: {
            "ran_on": where.get(Path(d).resolve().name, here_text),
            "cells": stage_seconds(Path(d)),
        }
        for d in dirs
    }
    data["notes"] = kept.get("notes") or [
        "stage times count every part of a stage that was stopped and resumed, except the "
        "stages listed under stages_timed_by_last_part_only (markers written before medxfer "
        "recorded the parts): there only the last part counts; where a prune stage was rerun "
        "only to add runs (prune.finetune), its marker times the added runs alone, and the "
        "total counts the training time of every run in its lottery instead",
    ]
    data["notes"] += args.note
    command = " ".join([Path(sys.executable).name, *sys.argv])
    data["commands"] = [*kept.get("commands", [kept["command"]] if kept else []), command]
    data["command"] = command  # the last call; "commands" lists every call that built the table
    data["machine"] = here  # where the last call ran
    out.write_text(json.dumps(data, indent=2))
    md = out.with_suffix(".md")
    lines = ["\nWhere each study ran, and the time of its stages (seconds):\n"]
    for name, e in data["experiments"].items():
        for cell, t in e["cells"].items():
            label = name if cell == "." else f"{name}/{cell}"
            runs = t["prune_runs_training_seconds"]
            parts = ", ".join(
                f"{k} {v:.0f}" + (f" (its runs trained {runs:.0f} in all)" if k == "prune"
                                  and runs > v else "")
                for k, v in t["stages"].items()
            )  # fmt: skip
            lines.append(f"- {label}: {e['ran_on']}; {parts}; total {t['total_seconds']:.0f}")
    lines += ["\nNotes:\n", *[f"- {n}" for n in data["notes"]]]
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main_())
