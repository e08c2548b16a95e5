"""``medxfer gan train|sample|quality|compare``: each one library call (parsers live in cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from medxfer.config import ExperimentConfig, load_config
from medxfer.errors import MedxferError
from medxfer.train.trained import Evaluate

console = Console(stderr=True)


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    cfg = load_config(args.config, overrides + (extra or []))
    if not cfg.data.root:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    return cfg


def _default_out(cfg: ExperimentConfig, what: str) -> Path:
    from medxfer.gan.trainer import gan_fingerprint

    return Path(cfg.out_dir) / f"{cfg.name}-gan-{gan_fingerprint(cfg)}" / what


def _n_per_class(items: list[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        name, _, n = item.rpartition(":")
        if not name or not n.isdigit():
            raise MedxferError(f"--n {item!r} is not class:count", "e.g. --n viral:500")
        out[name] = int(n)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from medxfer.gan.trainer import train_gan
    from medxfer.runs import config_inputs, replace_output_dir

    extra = [f"gan.max_minutes={args.max_minutes}"] if args.max_minutes is not None else []
    cfg = _config(args, extra)
    out = Path(args.out) if args.out else _default_out(cfg, "")
    replace_output_dir(out, force=args.force, inputs=config_inputs(cfg))
    print(train_gan(cfg, out, resume=not args.no_resume))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from medxfer.gan.synthesize import sample_gan

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt.parent if ckpt.is_file() else ckpt) / "synthetic"
    manifest = sample_gan(
        ckpt, out, n_per_class=_n_per_class(args.n), balance=args.balance, seed=args.seed
    )
    gate = json.loads((manifest.parent / "gate.json").read_text())
    if gate["passed"]:
        console.print(f"wrote {', '.join(gate['passed'])}; train with data.synthetic={manifest}")
    if gate["failed"]:
        fix = " ".join(gate["fallback"]["overrides"]) or "no imbalance fix"
        console.print(f"[bold yellow]gated out: {', '.join(gate['failed'])}; train with {fix}")
    print(manifest)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from medxfer.gan.quality import gan_quality

    cfg = _config(args)
    manifest = Path(args.manifest)
    out = Path(args.out) if args.out else manifest.parent / "quality"
    result = gan_quality(cfg, manifest, out)
    keys = ("fid", "kid", "two_sample_accuracy", "tstr_accuracy", "trtr_accuracy")
    console.print(json.dumps({k: result[k] for k in keys}, indent=2))
    print(out / "quality.json")
    return 0


def cmd_compare(args: argparse.Namespace, evaluate: Evaluate) -> int:
    from medxfer.gan.compare import compare_strategies

    cfg = _config(args)
    out = (
        Path(args.out)
        if args.out
        else Path(cfg.out_dir) / f"{cfg.name}-compare-{cfg.fingerprint()}"
    )
    summary = compare_strategies(
        cfg,
        out,
        strategies=args.strategies,
        gan_ratio=args.gan_ratio,
        manifest=Path(args.manifest) if args.manifest else None,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        quality=not args.no_quality,
        evaluate=evaluate,
    )
    console.print((out / "comparison.md").read_text())
    if summary.get("quality"):
        q = summary["quality"]
        console.print(
            f"FID synthetic-vs-real {q['fid']['synthetic_vs_real']:.2f} "
            f"(real-vs-real {q['fid']['real_vs_real']:.2f}); two-sample accuracy "
            f"{q['two_sample_accuracy']:.3f}; TSTR {q['tstr_accuracy']}"
        )
    print(out)
    return 0


def run(args: argparse.Namespace, *, evaluate: Evaluate) -> int:
    """``evaluate``: how ``gan compare`` tests each strategy's run after ``fit``
    (``medxfer.evaluate.finish.evaluate_trained``; this layer lies below evaluation)."""
    if args.gan_cmd == "compare":
        return cmd_compare(args, evaluate)
    handlers = {
        "train": cmd_train,
        "sample": cmd_sample,
        "quality": cmd_quality,
    }
    return handlers[args.gan_cmd](args)
