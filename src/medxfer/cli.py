"""Command line: one subcommand = one library call; prints the run folder.

medxfer train [--config FILE] [--data PATH] [key=value ...] [--resume] [--force]
medxfer predict RUN_OR_CHECKPOINT INPUT [--out preds.csv]
medxfer data audit PATH [--out audit.json]
medxfer data synth OUT
medxfer models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from medxfer.errors import MedxferError

console = Console(stderr=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from medxfer.config import load_config
    from medxfer.runs import is_complete, prepare_run_dir, run_dir_for
    from medxfer.train.loop import fit

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    if args.drop_leaks:
        overrides.append("data.drop_leaks=true")
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_for(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = prepare_run_dir(run_dir, resume=args.resume, force=args.force and is_main)
    if is_complete(run_dir) and not args.force:
        console.print(f"already complete: {run_dir} (use --force to train again)")
        print(run_dir)
        return 0
    if not cfg.data.root and is_main:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    fit(cfg, run_dir, resume=resume)
    if is_main:
        print(run_dir)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medxfer.evaluate.predict import predict_files

    out, n = predict_files(Path(args.checkpoint), Path(args.input), Path(args.out))
    console.print(f"wrote probabilities for {n} file(s)")
    print(out)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from medxfer.data.audit import audit, print_audit
    from medxfer.data.sources import discover
    from medxfer.train.checkpoint import atomic_write_json

    report = audit(discover(args.path), near_threshold=args.threshold, workers=args.workers)
    print_audit(report, console)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, out)
    print(out)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from medxfer.data.synthetic import make_synthetic

    out = make_synthetic(Path(args.out), size=args.size, seed=args.seed)
    console.print("wrote a SYNTHETIC image set (shapes, not medical images)")
    print(out)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from medxfer.models import list_models

    print(json.dumps(list_models()) if args.json else "\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medxfer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a backbone and evaluate it on the test split")
    t.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    t.add_argument("--data", help="dataset folder or CSV manifest (= data.root=...)")
    t.add_argument("--run-dir", help="run folder (default: <out_dir>/<name>-<config hash>)")
    t.add_argument(
        "--drop-leaks",
        action="store_true",
        help="drop train images that duplicate a test image (= data.drop_leaks=true)",
    )
    t.add_argument("--resume", action="store_true", help="continue an interrupted run")
    t.add_argument("--force", action="store_true", help="delete an existing run folder first")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    t.set_defaults(func=_cmd_train)
    pr = sub.add_parser("predict", help="class probabilities for an image, folder or DICOM")
    pr.add_argument("checkpoint", help="a run folder or its best.pt")
    pr.add_argument("input", help="an image, a DICOM file or a folder")
    pr.add_argument("--out", default="predictions.csv")
    pr.set_defaults(func=_cmd_predict)
    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    a = d.add_parser("audit", help="counts, unreadable files, duplicates and leaks across splits")
    a.add_argument("path", help="dataset folder or CSV manifest")
    a.add_argument("--out", default="audit.json")
    a.add_argument("--threshold", type=float, default=0.99, help="near-duplicate correlation")
    a.add_argument("--workers", type=int, default=2)
    a.set_defaults(func=_cmd_audit)
    s = d.add_parser("synth", help="write the small SYNTHETIC imbalanced demo set")
    s.add_argument("out")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)
    m = sub.add_parser("models", help="list the registered architectures")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MedxferError as err:
        console.print(f"[bold red]error:[/] {err.message}")
        if err.fix:
            console.print(f"  [bold]fix:[/] {err.fix}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; `--resume` continues from the last completed epoch")
        return 130


if __name__ == "__main__":
    sys.exit(main())
