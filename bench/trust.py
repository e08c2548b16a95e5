"""How far the per-image trust flags hold: a shift suite built from the data at hand.

    python bench/trust.py RUN [--other-data DIR] [--held-out-class NAME (--held-out-run RUN |
        --train-held-out [OVERRIDE ...])] [--policy-run RUN] [--limit N] [--source-size 256]

RUN is a finished `medxfer train` run; its trust statistics (`medxfer.evaluate.trust`, fitted
on its training and validation images when the run has none) give every threshold. The
official test split is only evaluated: it is the in-distribution set, against

- far-OOD: the other dataset's test images (--other-data; the other shared dataset by default)
  and the synthetic demo set;
- near-OOD: the test images of a class that a second run never saw (--held-out-run; or
  --train-held-out trains it here from a manifest without the class, written to the work
  folder; with neither, the command that trains it is printed and the case is skipped);
- covariate shifts (`medxfer.evaluate.shifts`, severities 1-3, labels kept): applied to the
  test images decoded at --source-size (the brain set's stored 256 px by default), then
  resized to the model's input size as every image is.

--policy-run compares the two augmentation policies: it is the same recipe trained with the
other augment.policy (the dataset configs use robust, so RUN is normally the robust run and
--policy-run the standard one); the summary gives robust minus standard on the severity-3
shifts and the in-distribution cost.

Scored cases are kept in the work folder (--work-dir) and reused by a later call. Writes
bench/results/trust/<dataset>.json (summary keys at the top, full tables below, targets met or
not) and figures in bench/results/trust/<dataset>/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import _trust_figures as figures
import numpy as np
import torch
from _common import REPO, RESULTS, SHARED_DATA, abspath, save
from _trust_cases import covariate_cases, far_cases, held_out_run, near_case, robust_case
from _trust_runs import Run, Scorer, fit_settings, load_run, pick, trust_record
from _trust_tables import Scored, case_row, folder_warnings, print_row, summary, targets
from rich.progress import Progress

from medxfer.errors import MedxferError
from medxfer.evaluate.shifts import LEVELS

OTHER = {"brain-tumor-mri": "chest-xray-pneumonia", "chest-xray-pneumonia": "brain-tumor-mri"}


def dataset_name(base: Run) -> str:
    if base.data.get("synthetic"):
        return "demo"
    root = Path(base.data["root"])
    return root.parent.name if root.suffix.lower() == ".csv" else root.name


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=abspath, help="a finished `medxfer train` run folder")
    p.add_argument(
        "--other-data",
        type=abspath,
        help="far-OOD dataset (default: the other "
        "shared dataset, for a run on brain-tumor-mri or chest-xray-pneumonia)",
    )
    p.add_argument("--held-out-class", help="near-OOD: the class the held-out run never saw")
    p.add_argument("--held-out-run", type=abspath, help="a run trained without that class")
    p.add_argument(
        "--train-held-out",
        nargs="*",
        metavar="OVERRIDE",
        help="train that run here (with these overrides of the run's config)",
    )
    p.add_argument(
        "--policy-run",
        type=abspath,
        help="the same recipe trained with the other augment.policy (robust against standard)",
    )
    p.add_argument("--limit", type=int, default=0, help="images per case (0: all)")
    p.add_argument("--source-size", type=int, default=256, help="size the shifts act at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acceptance", type=float, default=0.95, help="when fitting trust")
    p.add_argument("--coverage", type=float, default=0.90, help="when fitting trust")
    p.add_argument("--class-conditional", action="store_true", help="when fitting trust")
    p.add_argument("--conformal-score", default="lac", choices=["lac", "aps"],
                   help="when fitting trust")  # fmt: skip
    p.add_argument("--detector", default="auto", help="when fitting trust: trust.detector")
    p.add_argument("--refit", action="store_true", help="fit trust again with these settings")
    p.add_argument("--name", help="result name: bench/results/trust/<name>.json")
    p.add_argument(
        "--work-dir",
        type=abspath,
        help="scored cases, held-out run (default: runs/bench/trust-<name>)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.held_out_run is not None and args.train_held_out is not None:
        p.error("give --held-out-run or --train-held-out, not both")
    if (args.held_out_run is not None or args.train_held_out is not None) and not (
        args.held_out_class
    ):
        p.error("--held-out-run and --train-held-out need --held-out-class")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load_run(args.run, trust="refit" if args.refit else "load", fit=fit_settings(args))
    loaded = round(time.perf_counter() - t0, 1)
    trained_on = dataset_name(base)  # the other dataset and the set-size target follow it
    dataset = args.name or trained_on  # the result's name
    if args.source_size < int(base.meta["image_size"]):
        raise MedxferError(
            f"--source-size {args.source_size} is below the model's input size",
            f"use at least {base.meta['image_size']}",
        )
    work = args.work_dir or REPO / "runs" / "bench" / f"trust-{dataset}"
    other = args.other_data or (SHARED_DATA / OTHER[trained_on] if trained_on in OTHER else None)
    settings = json.dumps(
        {"limit": args.limit, "seed": args.seed, "source": args.source_size, "levels": LEVELS}
    )
    idx = pick(len(base.samples), args.limit, args.seed)
    labels, classes = base.labels[idx], list(base.meta["classes"])
    held = held_out_run(base, args, work) if args.held_out_class else None
    with Progress(transient=True) as progress:
        score = Scorer(work, progress, settings)
        ref = score(base, "base", "test", lambda: base.images[idx])
        test = case_row("test", "in-distribution", ref, None, labels, classes)
        progress.console.print(print_row(test))
        source = base.load([base.samples[i].path for i in idx], args.source_size)
        covariate, scored = covariate_cases(score, base, ref, idx, source, args.seed)
        far = far_cases(score, base, ref, other, args.limit, args.seed)
        near = near_case(score, base, held, args.held_out_class, args) if held else None
        robust = None
        if args.policy_run is not None:
            robust = robust_case(
                score, args.policy_run, base, idx, source, covariate, test["accuracy"], args.seed
            )
    shifted = [r for r in covariate if r["kind"] == "covariate"]
    keys = summary(test, shifted, far, near, robust, float(base.trust.record["coverage"]))
    rows = [test, *far, *([near] if near else []), *covariate]
    warned = folder_warnings(rows, base.trust.record)
    worst = min((r for r in shifted if r["severity"] == 3), key=lambda r: r["accuracy"])
    curves = {"test": (ref, labels), worst["case"]: (scored[worst["case"]], labels)}
    drawn = draw(RESULTS / "trust" / dataset, source[0], test, shifted, rows, curves, args.seed)
    size = base.meta["image_size"]
    save(f"trust/{dataset}", keys | {
        "targets": targets(keys, trained_on), "folder_warning": warned, "dataset": dataset,
        "trained_on": trained_on,
        "runs": {"base": str(base.folder), "held_out": near and near["run"],
                 "policy": robust and robust["run"]},
        "data": {"test": base.data["root"], "other": other and str(other),
                 "synthetic": next((r["data"] for r in far if r["case"] == "synthetic"), None)},
        "trust": trust_record(base),
        "settings": json.loads(settings) | {"test_images": len(idx), "shifts_at":
            f"test images decoded at {args.source_size} px, shifted, resized to {size} px"},
        "seconds": {"total": round(time.perf_counter() - t0, 1), "load_and_fit": loaded,
                    "cases": score.seconds},
        "figures": [str(f.relative_to(REPO) if f.is_relative_to(REPO) else f) for f in drawn],
        "test": test, "far_ood": far, "near_ood": near, "covariate": covariate, "robust": robust,
    })  # fmt: skip


def draw(
    out: Path, example: np.ndarray, test: dict[str, Any], shifted: list[dict[str, Any]],
    rows: list[dict[str, Any]], curves: dict[str, tuple[Scored, np.ndarray]], seed: int,
) -> list[Path]:  # fmt: skip
    """The figures of bench/results/trust/<dataset>/."""
    return [
        figures.examples(example, out / "shift-examples.png", seed),
        figures.by_severity(test, shifted, out / "by-severity.png"),
        figures.auroc_heatmap(rows, out / "detector-auroc.png"),
        figures.flag_shares(rows, out / "flags.png"),
        figures.risk_coverage_plot(curves, out / "risk-coverage.png"),
    ]


if __name__ == "__main__":
    main()
