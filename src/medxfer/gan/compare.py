"""Train every imbalance strategy with the same seed and budget; pick on validation, report test.

    none              plain cross-entropy
    class_weight      inverse-frequency weighted loss (train.class_weight)
    oversample        real images drawn class-balanced, with replacement (train.weighted_sampling)
    gan               + synthetic minority images (data.synthetic, up to ratio x largest class)
                      of the classes that pass the quality gate; when a class fails, the
                      run also uses gan.gate_fallback (default: oversample)
    gan+class_weight  both

Each strategy is a normal run folder ``out_dir/<strategy>`` (a finished one is reused, an
interrupted one resumes); the GAN trains in ``out_dir/wgan`` and samples to
``out_dir/synthetic`` (gated, see medxfer.gan.gate). The winner is the strategy with the best
validation balanced accuracy. Writes comparison.json, comparison.md and comparison.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.config import ExperimentConfig, apply_overrides
from medxfer.data.generated import MINORITY_BELOW, minority_classes, read_generated
from medxfer.errors import MedxferError
from medxfer.gan.report import bootstrap_class_metrics, comparison_plot, markdown_table
from medxfer.runs import run_summary
from medxfer.train.checkpoint import atomic_write_json, atomic_write_text
from medxfer.train.trained import Evaluate

STRATEGIES: dict[str, list[str]] = {
    "none": [],
    "class_weight": ["train.class_weight=true"],
    "oversample": ["train.weighted_sampling=true"],
    "gan": ["data.synthetic={manifest}", "data.synthetic_ratio={ratio}"],
    "gan+class_weight": [
        "data.synthetic={manifest}",
        "data.synthetic_ratio={ratio}",
        "train.class_weight=true",
    ],
}


def strategy_config(
    cfg: ExperimentConfig, name: str, manifest: str, ratio: float
) -> ExperimentConfig:
    """``cfg`` without any imbalance fix, then the strategy's overrides."""
    if name not in STRATEGIES:
        raise MedxferError(f"unknown strategy {name!r}", f"use any of {', '.join(STRATEGIES)}")
    base = ["train.class_weight=false", "train.weighted_sampling=false", "data.synthetic="]
    assignments = base + STRATEGIES[name]
    return apply_overrides(cfg, [a.format(manifest=manifest, ratio=ratio) for a in assignments])


def _synthetic_manifest(
    cfg: ExperimentConfig,
    out_dir: Path,
    ratio: float,
    manifest: Path | None,
    checkpoint: Path | None,
) -> Path:
    from medxfer.gan.synthesize import sample_gan
    from medxfer.gan.trainer import train_gan

    if manifest is not None:
        return manifest
    if checkpoint is None:
        checkpoint = train_gan(cfg, out_dir / "wgan")  # not "gan": that is a strategy
    target = out_dir / "synthetic" / "manifest.csv"
    if target.exists():
        return target
    return sample_gan(checkpoint, target.parent, balance=ratio, seed=cfg.train.seed)


def compared_minority(counts: dict[str, int]) -> tuple[list[str], str]:
    """The classes whose recall ``minority_recall`` averages, and the rule that chose them:
    those under 80% of the largest class; when none is (a nearly balanced set, such as brain
    tumor MRI), the smallest class, so the comparison still says what happens to it."""
    minority = minority_classes(counts)
    if minority:
        return minority, f"classes with fewer than {MINORITY_BELOW:.0%} of the largest class"
    smallest = min(counts, key=lambda c: (counts[c], c))
    return [smallest], (
        f"no class has fewer than {MINORITY_BELOW:.0%} of the largest, so the smallest "
        f"({smallest}, {counts[smallest]} of {max(counts.values())}) stands in"
    )


def summarize(run_dir: Path, minority: list[str], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Test metrics of one strategy's run, with per-class bootstrap intervals added."""
    m = json.loads((run_dir / "metrics.json").read_text())
    t, classes = m["test"], m["data"]["classes"]
    pred = np.load(run_dir / "test_predictions.npz")
    labels, yhat = pred["labels"].astype(np.int64), pred["probs"].argmax(1)
    minor_idx = [classes.index(c) for c in minority]
    cis = bootstrap_class_metrics(
        labels, yhat, len(classes), minor_idx, n_bootstrap=n_bootstrap, seed=seed
    )
    recall = t["per_class_recall"]
    defined = [recall[c] for c in minority if recall[c] is not None]
    synth = m["data"].get("synthetic_images") or {}
    return run_summary(m) | {
        "test_macro_f1_ci95": cis["macro_f1"],
        "per_class_recall_ci95": dict(zip(classes, cis["per_class_recall"], strict=True)),
        "minority_recall": float(np.mean(defined)) if defined else None,
        "minority_recall_ci95": cis["minority_recall"],
        "synthetic_images": synth.get("per_class", {}),
        "synthetic_images_total": synth.get("total", 0),
        "run_dir": str(run_dir),
    }


def verdict(strategies: dict[str, Any]) -> list[str]:
    """Plain sentences: does synthesis beat doing nothing, and does it beat oversampling?"""
    out = []
    for gan in ("gan", "gan+class_weight"):
        if gan in strategies and strategies[gan].get("synthetic_images_total", 1) == 0:
            out.append(
                f"- `{gan}` trained on no synthetic image (the quality gate kept them all out "
                "and the run used its fallback), so its row measures that fallback, not "
                "synthesis."
            )
            continue
        for ref in ("none", "oversample", "class_weight"):
            if gan not in strategies or ref not in strategies:
                continue
            g, r = strategies[gan], strategies[ref]
            d_min = (g["minority_recall"] or 0) - (r["minority_recall"] or 0)
            d_bal = g["test_balanced_accuracy"] - r["test_balanced_accuracy"]
            word = "beats" if d_min > 0 and d_bal >= -0.005 else "does not beat"
            out.append(
                f"- on test, `{gan}` {word} `{ref}`: minority recall {d_min:+.3f}, "
                f"balanced accuracy {d_bal:+.3f} (point estimates; see the intervals)."
            )
    return out


def val_winner(strategies: dict[str, Any]) -> dict[str, Any]:
    """The strategy with the best validation balanced accuracy (the split models are chosen
    on; the test split is only read), with a plain sentence."""
    ranked = sorted(strategies, key=lambda n: -strategies[n]["val_balanced_accuracy"])
    best = ranked[0]
    score = strategies[best]["val_balanced_accuracy"]
    runner = (
        f"; next `{ranked[1]}` {strategies[ranked[1]]['val_balanced_accuracy']:.3f}"
        if len(ranked) > 1
        else ""
    )
    sentence = (
        f"**On validation, `{best}` wins** (balanced accuracy {score:.3f}{runner}). Use it; "
        "the test figures above were computed once and chose nothing."
    )
    return {"strategy": best, "val_balanced_accuracy": score, "sentence": sentence}


def gate_of(manifest: Path | None) -> dict[str, Any] | None:
    """The quality gate's verdict written beside a manifest by ``sample_gan``, if any."""
    path = manifest.parent / "gate.json" if manifest else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def gate_lines(gate: dict[str, Any] | None) -> list[str]:
    if gate is None:
        return ["- the synthetic manifest was given as it is: the quality gate did not judge it"]
    from medxfer.gan.gate import describe

    return [f"- gate: {line}" for line in describe(gate, gate["fallback"]["strategy"])]


def _notes(names: list[str], gan_ratio: float, table: dict[str, Any]) -> list[str]:
    added = table.get("gan+class_weight", {}).get("synthetic_images_total", 1) > 0
    if gan_ratio >= 1 and "gan+class_weight" in names and added:
        return ["- note: class weights come from the training set the loss sees (real + "
                "synthetic); at gan ratio >= 1 every class is filled up to the largest, the "
                "weights are all 1 and `gan+class_weight` equals `gan`. Use a ratio < 1 to "
                "make them differ."]  # fmt: skip
    return []


def compare_strategies(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    strategies: list[str] | None = None,
    gan_ratio: float = 1.0,
    manifest: Path | None = None,
    checkpoint: Path | None = None,
    quality: bool = True,
    evaluate: Evaluate,
) -> dict[str, Any]:
    """Train each strategy into ``out_dir/<strategy>``; write and return the comparison.
    ``evaluate``: what tests each run after ``fit`` and writes its metrics.json
    (``medxfer.evaluate.finish.evaluate_trained``, passed in by the command)."""
    from medxfer.gan.quality import gan_quality
    from medxfer.train.loop import fit
    from medxfer.train.record import check_reuse

    names = strategies or list(STRATEGIES)
    for name in names:
        strategy_config(cfg, name, "", gan_ratio)  # unknown names fail before any training
    needs_gan = any(n.startswith("gan") for n in names)
    synth = (
        _synthetic_manifest(cfg, out_dir, gan_ratio, manifest, checkpoint) if needs_gan else None
    )
    gate = gate_of(synth) if synth else None
    runs: dict[str, Path] = {}
    for name in names:
        run_dir = out_dir / name
        run_cfg = strategy_config(cfg, name, str(synth or ""), gan_ratio)
        if name.startswith("gan") and gate is not None:  # the gated GAN: what failed falls back
            run_cfg = apply_overrides(run_cfg, gate["fallback"]["overrides"])
        if (run_dir / "metrics.json").exists():
            check_reuse(run_cfg, run_dir)
        else:
            evaluate(fit(run_cfg, run_dir, resume=True), trust=False)
        runs[name] = run_dir
    first = json.loads((runs[names[0]] / "metrics.json").read_text())["data"]
    real_counts = (first.get("synthetic_images") or {}).get("real_train_counts") or first["counts"][
        "train"
    ]
    minority, minority_rule = compared_minority(real_counts)
    table = {n: summarize(runs[n], minority, cfg.eval.n_bootstrap, cfg.train.seed) for n in names}
    summary: dict[str, Any] = {
        "dataset": cfg.data.root or "embedded SYNTHETIC demo set",
        "classes": first["classes"],
        "real_train_counts": real_counts,
        "minority_classes": minority,
        "minority_rule": minority_rule,
        "test_n": sum(
            json.loads((runs[names[0]] / "metrics.json").read_text())["data"]["counts"][
                "test"
            ].values()
        ),
        "gan_ratio": gan_ratio,
        "synthetic_manifest": str(synth) if synth else None,
        "strategies": table,
        "verdict": verdict(table)
        + _notes(names, gan_ratio, table)
        + (gate_lines(gate) if synth else []),
        "gate": gate,
        "val_winner": val_winner(table),
        "protocol": {
            "seed": cfg.train.seed,
            "epochs": cfg.train.epochs,
            "image_size": cfg.data.image_size,
            "arch": cfg.model.arch,
            "weights": cfg.model.weights,
            "class_fraction": cfg.data.class_fraction,
        },
    }
    admitted = synth is not None and bool(read_generated(synth)[0])
    if synth is not None and quality and admitted:
        summary["quality"] = gan_quality(cfg, synth, out_dir / "quality")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary, out_dir / "comparison.json")
    atomic_write_text(markdown_table(summary), out_dir / "comparison.md")
    comparison_plot(summary, out_dir / "comparison.png")
    return summary
