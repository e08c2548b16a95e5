"""The stages of one experiment cell, each a call into the package that owns it.

audit     medxfer.data.audit on the dataset          -> audit/audit.json
gan       medxfer.gan: train, sample, gate           -> gan-<fp>/ (data.synthetic or fallback)
tune      medxfer.tune.run_study                     -> tune/<study>/ (sets the best params)
train     medxfer.evaluate.finish.fit_and_evaluate   -> train-<fp>/ (best params; a run folder)
prune     medxfer.prune.run_lottery                  -> prune-<fp>/ (levels, controls)
evaluate  test metrics of both models + Grad-CAM      -> evaluate-<fp>/evaluation.json
report    medxfer.report                             -> report.html, report.md

A stage's folder name carries the fingerprint of what it was computed from, so a changed input
never reuses an old result. Every stage resumes with its package's own resume (the tune journal,
``fit --resume``, complete lottery levels skipped, the GAN's state.pt).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medxfer.config import ExperimentConfig, drop_later_defaults, lottery_key, with_values
from medxfer.errors import MedxferError
from medxfer.experiment.spec import Cell, Experiment
from medxfer.train.checkpoint import atomic_write_json


class StageUnavailable(Exception):
    """A stage that cannot run in this installation or configuration (reported, not fatal)."""


@dataclass
class Context:
    exp: Experiment
    cell: Cell
    cfg: ExperimentConfig  # effective: + data.synthetic after gan, + best params after tune
    command: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)


def digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def fingerprint(stage: str, ctx: Context) -> str:
    """What a stage's result depends on; a stored result with another fingerprint is redone."""
    cfg = ctx.cfg
    if stage == "audit":
        by_patient = (cfg.data.patient_regex,) if cfg.data.patient_regex else ()
        return digest(cfg.data.root, cfg.data.leak_threshold, *by_patient)
    if stage == "gan":
        return digest(cfg.fingerprint(), drop_later_defaults({"gan": asdict(cfg.gan)})["gan"])
    if stage == "tune":
        from medxfer.tune.study import study_fingerprint

        return digest(study_fingerprint(cfg), cfg.tune.n_trials)
    if stage == "train":
        return digest(cfg.fingerprint())
    if stage == "prune":
        return digest(cfg.fingerprint(), lottery_key(cfg.prune))
    if stage == "evaluate":
        keep = ("train", "prune", "tune", "gan")
        return digest({k: ctx.outputs.get(k) for k in keep}, asdict(ctx.exp.report))
    return digest(ctx.outputs, _on_off(ctx.status), asdict(ctx.exp.report))


def _on_off(status: dict[str, str]) -> dict[str, str]:
    return {k: "done" if v in ("done", "complete") else v for k, v in status.items()}


def run_audit(ctx: Context) -> dict[str, Any]:
    from medxfer.data.audit import audit
    from medxfer.data.prepare import resolve_root
    from medxfer.data.sources import discover, with_patient_ids

    root, _ = resolve_root(ctx.cfg.data)
    samples = with_patient_ids(discover(root), ctx.cfg.data.patient_regex)
    report = audit(samples, near_threshold=ctx.cfg.data.leak_threshold)
    out = ctx.cell.dir / "audit" / "audit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, out)
    return {"audit": str(out), "root": str(root), "summary": report["summary"]}


def run_gan(ctx: Context) -> dict[str, Any]:
    """Train, sample and gate: only the classes that pass the quality gate (training split
    only) are written; the others make the run fall back to ``gan.gate_fallback``."""
    try:
        from medxfer.gan import sample_gan, train_gan
    except ImportError as err:
        raise StageUnavailable(
            f"gan stage unavailable: this installation has no medxfer.gan ({err})"
        ) from None
    cfg = ctx.cfg
    folder = ctx.cell.dir / f"gan-{fingerprint('gan', ctx)}"
    checkpoint = train_gan(cfg, folder, resume=True)
    manifest = sample_gan(
        checkpoint, folder / "samples", balance=cfg.gan.balance, seed=cfg.gan.seed
    )
    gate = json.loads((manifest.parent / "gate.json").read_text())
    return {
        "dir": str(folder),
        "checkpoint": str(checkpoint),
        "manifest": str(manifest),
        "gate": gate,
        "admitted": gate["passed"],
        "fallback": gate["fallback"],
    }


def after_gan(ctx: Context, outputs: dict[str, Any]) -> None:
    from medxfer.config import apply_overrides

    if outputs.get("admitted"):
        ctx.cfg = with_values(ctx.cfg, {"data.synthetic": outputs["manifest"]})
    ctx.cfg = apply_overrides(ctx.cfg, outputs.get("fallback", {}).get("overrides", []))


def run_tune(ctx: Context) -> dict[str, Any]:
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.tune import StudyOptions, run_study

    cfg = with_values(ctx.cfg, {"out_dir": str(ctx.cell.dir)})  # study: <cell>/tune/<study>/
    summary = run_study(cfg, StudyOptions(), evaluate=evaluate_trained)
    if summary["best"] is None:
        raise MedxferError(
            "tuning: no trial completed",
            f"see {summary['study_dir']}/trials.csv (user_attrs_error)",
        )
    keys = ("study_dir", "n_trials", "complete", "pruned", "failed", "best", "wall_seconds")
    return {k: summary.get(k) for k in keys}


def after_tune(ctx: Context, outputs: dict[str, Any]) -> None:
    from medxfer.tune.objective import best_config

    ctx.cfg = best_config(ctx.cfg, outputs["best"]["params"])


def run_train(ctx: Context) -> dict[str, Any]:
    from medxfer.evaluate.finish import fit_and_evaluate
    from medxfer.prune.lottery import SaveInit
    from medxfer.runs import is_complete, prepare_run_dir
    from medxfer.train.record import check_reuse

    run_dir = ctx.cell.dir / f"train-{ctx.cfg.fingerprint()}"
    if is_complete(run_dir):
        check_reuse(ctx.cfg, run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        resume = prepare_run_dir(run_dir, resume=True, force=False)
        # init.pt lets the prune stage adopt this run as its dense level 0
        metrics = fit_and_evaluate(ctx.cfg, run_dir, resume=resume, callbacks=(SaveInit(run_dir),))
    return {"run_dir": str(run_dir), "test": _short(metrics.get("test"))}


def _short(split: dict[str, Any] | None) -> dict[str, Any] | None:
    if split is None:
        return None
    return {
        "accuracy": split["accuracy"],
        "balanced_accuracy": split["balanced_accuracy"],
        "ci95": split.get("ci95", {}),
    }


def lottery_dir(ctx: Context) -> Path:
    """The prune stage's lottery folder: named by the prune fingerprint with the settings that
    only add runs (``ADDITIVE``) at their defaults, so switching one on reuses the finished runs
    (the stage itself still reruns: its fingerprint sees every setting)."""
    from medxfer.prune.plan import folder_key

    return ctx.cell.dir / f"prune-{digest(ctx.cfg.fingerprint(), folder_key(ctx.cfg.prune))}"


def run_prune(ctx: Context) -> dict[str, Any]:
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.prune import run_lottery

    p, cfg = ctx.cfg.prune, ctx.cfg
    out = lottery_dir(ctx)
    summary = run_lottery(
        cfg,
        out,
        evaluate=evaluate_trained,
        levels=p.levels,
        fraction=p.fraction,
        target_sparsity=p.target_sparsity or None,
        rewind=p.rewind,
        controls=p.controls,
        include_head=p.include_head,
        finetune=p.finetune,
        finetune_lr_scale=p.finetune_lr_scale,
        distill=p.distill,
        distill_temperature=p.distill_temperature,
        weights=p.weights,
        ticket_distill=p.ticket_distill,
        dense_run=Path(ctx.outputs["train"]["run_dir"]) if "train" in ctx.outputs else None,
    )
    selected = select(summary, finetune=p.finetune, distill=bool(p.distill))
    return {"dir": str(out), "lottery": str(out / "lottery.json"), "selected": selected}


def select(
    summary: dict[str, Any], *, finetune: bool = False, distill: bool = False
) -> dict[str, Any]:
    """The pruned model the results table reports: among the tickets and, with ``finetune``
    (``prune.finetune``) and ``distill`` (``prune.distill``), the pruned-then-fine-tuned and
    pruned-then-distilled models of every level, the one with the best validation balanced
    accuracy (on a tie the sparser, then the ticket, then the plain fine-tune). Chosen on val
    only; test is just read."""
    from medxfer.prune.report import REPORTABLE

    on = {"ticket": True, "finetune": finetune, "distill": distill}
    kinds = [k for k in REPORTABLE if on[k]]
    best: tuple[float, int, int] | None = None
    chosen: dict[str, Any] = {}
    for row in summary["levels"][1:]:
        for rank, kind in enumerate(reversed(kinds)):
            run = row["runs"].get(kind)
            if not run or "val" not in run:
                continue
            key = (run["val"]["balanced_accuracy"], row["level"], rank)
            if best is None or key > best:
                best, chosen = (
                    key,
                    {
                        "level": row["level"],
                        "sparsity": row["sparsity"],
                        "kind": kind,
                        "run_dir": run["run_dir"],
                        "val_balanced_accuracy": run["val"]["balanced_accuracy"],
                        **({"distilled": run["distilled"]} if "distilled" in run else {}),
                    },
                )
    if not chosen:
        raise MedxferError("pruning finished without a ticket to report", "check the prune logs")
    labels = dict(REPORTABLE)
    if chosen.get("distilled") and chosen["kind"] == "ticket":  # prune.ticket_distill
        labels["ticket"] += " (retrained distilled from the dense model)"
    among = " or ".join(labels[k] for k in kinds)
    chosen["rule"] = f"pruned model ({among}) with the best val balanced accuracy, any level"
    return chosen


def run_evaluate(ctx: Context) -> dict[str, Any]:
    """Test metrics of the fine-tuned and the pruned model (from their metrics.json, computed
    once on the untouched test split at the end of training) and Grad-CAM heatmaps."""
    from medxfer.config import load_config
    from medxfer.models.registry import entry
    from medxfer.prune.report import REPORTABLE
    from medxfer.report.gradcam import compute_gradcam
    from medxfer.report.paper import dataset_key, result_row

    models: list[tuple[str, Path, bool, float, str | None]] = []
    if "train" in ctx.outputs:
        models.append(("fine-tuned", Path(ctx.outputs["train"]["run_dir"]), False, 0.0, None))
    if "prune" in ctx.outputs:
        sel = ctx.outputs["prune"]["selected"]
        how = REPORTABLE[sel.get("kind", "ticket")]  # markers before "kind": tickets only
        models.append(("pruned", Path(sel["run_dir"]), True, float(sel["sparsity"]), how))
    if not models:
        raise StageUnavailable("nothing to evaluate: the train and prune stages are both off")
    folder = ctx.cell.dir / f"evaluate-{fingerprint('evaluate', ctx)}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg, rows, cams = ctx.cfg, [], {}
    for variant, run_dir, pruned, sparsity, pruned_by in models:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        trained = load_config(run_dir / "config.yaml")
        rows.append(
            result_row(
                metrics,
                dataset=dataset_key(cfg.data.root),
                arch=cfg.model.arch,
                family=entry(cfg.model.arch).family,
                weights=cfg.model.weights,
                tuned="tune" in ctx.outputs,
                pruned=pruned,
                sparsity=sparsity,
                run_dir=str(run_dir),
                command=ctx.command,
                image_size=trained.data.image_size,
                epochs=trained.train.epochs,
                pruned_by=pruned_by,
            )
        )
        if ctx.exp.report.gradcam_per_class > 0:
            png = folder / f"gradcam_{variant}.png"
            cams[variant] = compute_gradcam(run_dir, ctx.exp.report.gradcam_per_class, png)
    out = folder / "evaluation.json"
    atomic_write_json({"rows": rows, "gradcam": cams}, out)
    return {"evaluation": str(out), "dir": str(folder)}


def run_report(ctx: Context) -> dict[str, Any]:
    from medxfer.report import write_report

    html, md = write_report(report_input(ctx), ctx.cell.dir)
    return {"html": str(html), "md": str(md)}


def report_input(ctx: Context) -> dict[str, Any]:
    """Everything the report reads, as plain data (the report package knows no Context)."""
    return {
        "title": f"{ctx.exp.base.name}"
        + ("" if ctx.cell.name == "main" else f" · {ctx.cell.name}"),
        "cell": ctx.cell.name,
        "values": ctx.cell.values,
        "config": ctx.cfg.to_dict(),
        "status": dict(ctx.status),
        "outputs": ctx.outputs,
        "options": asdict(ctx.exp.report),
        "command": ctx.command,
    }


RUN = {
    "audit": run_audit,
    "gan": run_gan,
    "tune": run_tune,
    "train": run_train,
    "prune": run_prune,
    "evaluate": run_evaluate,
    "report": run_report,
}
AFTER = {"gan": after_gan, "tune": after_tune}
