"""Command line: one subcommand = one library call; prints the run folder.

medxfer train [--config FILE] [--data PATH] [key=value ...] [--resume] [--force]
medxfer tune [--config FILE] [--data PATH] [key=value ...] [--n-trials N] [--storage URL]
             [--workers N] [--timeout S] [--study-name NAME] [--retrain]
medxfer prune [--config FILE] [--data PATH] [key=value ...] [--levels L] [--fraction F]
              [--target-sparsity S] [--rewind init|epoch:K|lr] [--no-controls] [--out DIR]
medxfer prune --export RUN_DIR [--no-latency] [--no-onnx]
medxfer predict RUN_OR_CHECKPOINT INPUT [--out preds.csv] [--html page.html]
medxfer trust RUN_DIR [--acceptance 0.95] [--coverage 0.9] [--class-conditional] [--detector auto]
              [--conformal-score lac|aps]
medxfer shift RUN_OR_CHECKPOINT INPUT [--out shift.json] [--alpha 0.05]
medxfer adapt RUN_OR_CHECKPOINT INPUT [--out DIR] [--batch-size 64] [--seed 0] [--folds 2]
              [--method adabn|tent] [--steps 0] [--lr 1e-3]
medxfer convert RUN_OR_FILE [--trust-pickle]
medxfer data audit PATH [--out audit.json]
medxfer data synth OUT
medxfer cache list [--dir DIR] [--json]
medxfer cache clear [--dir DIR] [--all | --older-than DAYS] [--max-bytes N]
medxfer models
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from medxfer.errors import MedxferError

console = Console(stderr=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from medxfer.config import load_config
    from medxfer.evaluate.finish import fit_and_evaluate
    from medxfer.runs import config_inputs, is_complete, prepare_run_dir, run_dir_for
    from medxfer.train.record import check_reuse

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    if args.drop_leaks:
        overrides.append("data.drop_leaks=true")
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_for(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    force = args.force and is_main
    resume = prepare_run_dir(run_dir, resume=args.resume, force=force, inputs=config_inputs(cfg))
    if is_complete(run_dir) and not args.force:
        check_reuse(cfg, run_dir)
        console.print(
            f"already complete: {escape(str(run_dir))} (use --force to train again)", soft_wrap=True
        )
        print(run_dir)
        return 0
    if not cfg.data.root and is_main:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    fit_and_evaluate(cfg, run_dir, resume=resume)
    if is_main:
        print(run_dir)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from medxfer.config import load_config
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.tune import StudyOptions, run_study

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.root:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    opts = StudyOptions(
        n_trials=args.n_trials,
        storage=args.storage,
        workers=args.workers,
        timeout=args.timeout,
        study_name=args.study_name,
        retrain=args.retrain,
    )
    summary = run_study(cfg, opts, evaluate=evaluate_trained)
    done = summary["complete"] + summary["pruned"]
    console.print(
        f"study {summary['study_name']}: {done}/{summary['n_trials']} trials finished "
        f"({summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed)"
    )
    if summary["best"] is None:
        raise MedxferError(
            "no trial completed", f"see {summary['study_dir']}/trials.csv (user_attrs_error)"
        )
    best = summary["best"]
    console.print(f"best {summary['metric']} {best['value']:.4f} (trial {best['number']}): "
                  f"{best['params']}\nbest config: {summary['best_config']}")  # fmt: skip
    print(summary["study_dir"])
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medxfer.evaluate.metrics import format_summary, shift_warnings
    from medxfer.evaluate.rerun import evaluate_run

    data = Path(args.data) if args.data else None
    out, results = evaluate_run(
        Path(args.run_dir), list(args.overrides), args.out, args.checkpoint, data=data
    )
    console.print(f"{results['checkpoint']}.pt (epoch {results['epoch']})")
    for split in ("val", "test"):
        if split in results:
            console.print(f"{split}: {format_summary(results[split])}")
    if "val" in results and "test" in results:
        for line in shift_warnings(results["val"], results["test"]):
            console.print(f"[yellow]warning:[/] {line}")
    print(out)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medxfer.evaluate.predict_trust import predict_with_trust

    html = Path(args.html) if args.html else None
    out, n, note, summary = predict_with_trust(Path(args.checkpoint), Path(args.input),
                                               Path(args.out), html=html,
                                               html_limit=args.html_limit)  # fmt: skip
    if note:
        console.print(f"[yellow]note:[/] {note}")
    if summary is not None:
        line, warning = summary
        console.print(f"flags: {line}")
        if warning:
            console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"wrote probabilities for {n} file(s)" + (f"; review page {html}" if html else "")
    )
    print(out)
    return 0


def _cmd_trust(args: argparse.Namespace) -> int:
    from medxfer.evaluate.trust_run import summary_line, trust_command

    r = trust_command(Path(args.run), acceptance=args.acceptance, coverage=args.coverage,
                      class_conditional=args.class_conditional,
                      detector=args.detector,
                      conformal_score=args.conformal_score)  # fmt: skip
    console.print(f"default detector {r['ood_detector']}, failure score {r['failure_score']}")
    if "test" in r:
        console.print(summary_line(r["test"]))
    print(args.run)
    return 0


def _cmd_shift(args: argparse.Namespace) -> int:
    from rich.table import Table

    from medxfer.evaluate.unlabelled import ALPHA, check_images, summary_lines
    from medxfer.train.checkpoint import atomic_write_json

    out = Path(args.out)
    alpha = ALPHA if args.alpha is None else args.alpha
    result = check_images(
        Path(args.checkpoint), Path(args.input), alpha=alpha, figure=out.with_suffix(".png")
    )
    table = Table(title=f"validation ({result['n_reference']} images) against {args.input} "
                  f"({result['n_images']} images, no labels)")  # fmt: skip
    for col in ("class", "predicted share val / new", "mean prob. val / new", "KS p",
                "estimated share (BBSE)", "class share val"):  # fmt: skip
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in result["per_class"]:
        table.add_row(
            c["class"],
            f"{c['reference_predicted_share']:.2f} / {c['predicted_share']:.2f}",
            f"{c['reference_mean_probability']:.2f} / {c['mean_probability']:.2f}",
            f"{c['ks_p_value']:.2g}",
            f"{c['estimated_share']:.2f}",
            f"{c['reference_true_share']:.2f}",
        )
    console.print(table)
    for i, line in enumerate(summary_lines(result)):
        console.print(f"[yellow]{line}[/]" if i == 0 and result["shifted"] else line)
    if result["unreadable"]:
        console.print(
            f"{len(result['unreadable'])} unreadable file(s) skipped (listed in the JSON)"
        )
    console.print(f"figure: {result['figure']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out)
    print(out)
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from medxfer.evaluate.adapt import adapt_run, summary_lines
    from medxfer.evaluate.predict import model_file

    target = Path(args.input)
    out = Path(args.out) if args.out else (
        model_file(Path(args.checkpoint)).parent / f"adapted-{target.resolve().name}"
    )  # fmt: skip
    what = "BatchNorm statistics only" if args.method == "adabn" else "TENT: BatchNorm only"
    console.print(f"adapting to {target} ({what}; no labels needed)")
    record = adapt_run(Path(args.checkpoint), target, out, batch_size=args.batch_size,
                       seed=args.seed, folds=args.folds, method=args.method, steps=args.steps,
                       lr=args.lr, log=console.print)  # fmt: skip
    for line in summary_lines(record):
        console.print(line)
    if record["unreadable"]:
        console.print(f"{len(record['unreadable'])} unreadable file(s) skipped (adapt.json)")
    console.print(f"adapted model: {record['model']} (use it with predict and shift)")
    print(out)
    return 0


def _model_and_images(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, images: str
) -> argparse.ArgumentParser:
    """A subcommand taking a trained model and a set of new images."""
    p = sub.add_parser(name, help=help)
    p.add_argument("checkpoint", help="a run folder or a model file")
    p.add_argument("input", help=images)
    return p


def _cmd_audit(args: argparse.Namespace) -> int:
    from medxfer.data.audit import audit, print_audit
    from medxfer.data.sources import discover, with_patient_ids
    from medxfer.train.checkpoint import atomic_write_json

    samples = with_patient_ids(discover(args.path), args.patient_regex)
    report = audit(samples, near_threshold=args.threshold, workers=args.workers)
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


def _cmd_prune(args: argparse.Namespace) -> int:
    import json

    from medxfer.config import load_config
    from medxfer.prune.plan import lottery_folder
    from medxfer.runs import config_inputs, replace_output_dir

    if args.export:
        from medxfer.prune.export import export_run

        report = export_run(Path(args.export), latency=not args.no_latency, onnx=not args.no_onnx)
        console.print(json.dumps(report, indent=2))
        print(Path(args.export) / "export" / "export.json")
        return 0
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.prune.lottery import run_lottery

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
    for flag in ("levels", "fraction", "rewind"):
        if getattr(args, flag) is not None:
            overrides.append(f"prune.{flag}={getattr(args, flag)}")
    if args.no_controls:
        overrides.append("prune.controls=false")
    if args.include_head:
        overrides.append("prune.include_head=true")
    if args.finetune:
        overrides.append("prune.finetune=true")
    if args.distill is not None:
        overrides.append(f"prune.distill={args.distill}")
    if args.weights is not None:
        overrides.append(f"prune.weights={args.weights}")
    if args.ticket_distill is not None:
        overrides.append(f"prune.ticket_distill={args.ticket_distill}")
    cfg = load_config(args.config, overrides)
    p = cfg.prune
    target = args.target_sparsity if args.target_sparsity is not None else p.target_sparsity or None

    out = Path(args.out) if args.out else lottery_folder(cfg, target)
    replace_output_dir(out, force=args.force, inputs=config_inputs(cfg))
    if not cfg.data.root:
        console.print("[bold yellow]data: the embedded SYNTHETIC demo set (not medical images)")
    run_lottery(
        cfg, out, evaluate=evaluate_trained, levels=p.levels, fraction=p.fraction,
        target_sparsity=target, rewind=p.rewind, controls=p.controls,
        include_head=p.include_head, finetune=p.finetune, finetune_lr_scale=p.finetune_lr_scale,
        distill=p.distill, distill_temperature=p.distill_temperature, weights=p.weights,
        ticket_distill=p.ticket_distill,
    )  # fmt: skip
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
    tu = sub.add_parser("tune", help="search hyper-parameters with Optuna (train/val only)")
    tu.add_argument("--config", help="experiment YAML; its tune section sets the search")
    tu.add_argument("--data", help="dataset folder or CSV manifest (= data.root=...)")
    tu.add_argument("--n-trials", type=int, help="finished trials to end with (tune.n_trials: 20)")
    tu.add_argument("--storage", help="journal file or database URL, e.g. postgresql://... "
                    "(default: <out_dir>/tune/<study>/study.journal)")  # fmt: skip
    tu.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    tu.add_argument("--timeout", type=float, help="stop starting trials after S seconds")
    tu.add_argument("--study-name", help="default: <name>-<hash of config and search settings>")
    tu.add_argument("--retrain", action="store_true",
                    help="train the best config in full and evaluate it once on test")  # fmt: skip
    tu.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.epochs=3")
    tu.set_defaults(func=_cmd_tune)
    ev = sub.add_parser("evaluate", help="re-evaluate a run's best or last checkpoint (eval.*)")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.tta=true")
    ev.add_argument("--out", default="metrics-rerun.json", help="file name inside the run folder")
    ev.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best.pt (the epoch validation chose) or last.pt (the last epoch)",
    )
    ev.add_argument("--data", help="the run's dataset, where it is now (default: as trained)")
    ev.set_defaults(func=_cmd_evaluate)
    pr = sub.add_parser("predict", help="class probabilities for an image, folder or DICOM")
    pr.add_argument("checkpoint", help="a run folder or its best.pt")
    pr.add_argument("input", help="an image, a DICOM file or a folder")
    pr.add_argument("--out", default="predictions.csv")
    pr.add_argument("--html", default="", help="also write a static review page (flagged first)")
    pr.add_argument("--html-limit", type=int, default=200, help="images shown on that page")
    pr.set_defaults(func=_cmd_predict)
    tr = sub.add_parser("trust", help="per-image OOD/failure flags and conformal sets for a "
                        "finished run (train/val only; no retraining)")  # fmt: skip
    tr.add_argument("run", help="a run folder of `medxfer train`")
    tr.add_argument("--acceptance", type=float, default=0.95,
                    help="fraction of validation images that end ok")  # fmt: skip
    tr.add_argument("--coverage", type=float, default=0.90, help="conformal set coverage")
    tr.add_argument("--class-conditional", action="store_true",
                    help="calibrate the conformal sets per class (Mondrian)")  # fmt: skip
    tr.add_argument("--detector", default="auto",
                    choices=["auto", "mahalanobis", "knn", "vim", "layers"],
                    help="the unfamiliar detector (auto: chosen on validation; mahalanobis: "
                    "an unseen finding; layers: another scanner's look)")  # fmt: skip
    tr.add_argument("--conformal-score", default="lac", choices=["lac", "aps"],
                    help="conformal sets: lac (smallest) or aps (grow when a shift flattens "
                    "the softmax; keep their coverage under strong shifts better)")  # fmt: skip
    tr.set_defaults(func=_cmd_trust)
    sh = _model_and_images(
        sub, "shift", "do unlabelled images look like the validation split to the model? (shift "
        "test, estimated accuracy and class mix; no labels needed)",
        "an image folder, an image or a DICOM file",
    )  # fmt: skip
    sh.add_argument("--out", default="shift.json", help="JSON; its figure goes beside it (.png)")
    sh.add_argument("--alpha", type=float, default=None,  # None: unlabelled.ALPHA (0.05)
                    help="level of the per-class KS tests, Bonferroni over classes "
                    "(default 0.05, medxfer.evaluate.unlabelled.ALPHA)")  # fmt: skip
    sh.set_defaults(func=_cmd_shift)
    ad = _model_and_images(
        sub, "adapt", "re-estimate BatchNorm statistics on unlabelled images of a new site "
        "(AdaBN); with one subfolder per class, also measures what it does to accuracy",
        "a folder of images from the new site",
    )  # fmt: skip
    ad.add_argument("--out", help="output folder (default: adapted-<input name> beside the model)")
    ad.add_argument("--batch-size", type=int, default=64)
    ad.add_argument("--seed", type=int, default=0, help="shuffling of the images into batches")
    ad.add_argument("--folds", type=int, default=2, help="folds of the labelled check")
    ad.add_argument("--method", choices=["adabn", "tent"], default="adabn",
                    help="adabn: re-estimate the statistics; tent: also minimize the prediction "
                    "entropy over the BatchNorm scale and shift (docs/adapt.md)")  # fmt: skip
    ad.add_argument("--steps", type=int, default=0, help="TENT steps (0 = one pass, at least 20)")
    ad.add_argument("--lr", type=float, default=1e-3, help="TENT's Adam learning rate")
    ad.set_defaults(func=_cmd_adapt)
    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    a = d.add_parser("audit", help="counts, unreadable files, duplicates and leaks across splits")
    a.add_argument("path", help="dataset folder or CSV manifest")
    a.add_argument("--out", default="audit.json")
    a.add_argument("--threshold", type=float, default=0.99, help="near-duplicate correlation")
    a.add_argument("--workers", type=int, default=2)
    a.add_argument(
        "--patient-regex", default="",
        help="regular expression giving the patient ID from a file name (its first group): "
        "reports patients per split and those found in several splits",
    )  # fmt: skip
    a.set_defaults(func=_cmd_audit)
    s = d.add_parser("synth", help="write the small SYNTHETIC imbalanced demo set")
    s.add_argument("out")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)
    _add_prune_parser(sub)
    _add_prune_structured_parser(sub)
    _add_run_parser(sub)
    _add_gan_parser(sub)
    from medxfer.data.cache_admin import add_cache_parser

    add_cache_parser(sub)
    m = sub.add_parser("models", help="list the registered architectures")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)
    cv = sub.add_parser("convert", help="rewrite a run's model files made by an older medxfer "
                        "into the weights-only format (needs --trust-pickle)")  # fmt: skip
    cv.add_argument("target", help="a run folder (searched recursively) or one model file")
    cv.set_defaults(func=_cmd_convert)
    for name in ("train", "evaluate", "predict", "shift", "adapt", "prune", "prune-structured",
                 "convert"):  # fmt: skip
        _add_trust_pickle(sub.choices[name])
    return p


def _add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="also load model files that need unpickling (they can run any code: "
                   "only files from someone you trust)")  # fmt: skip


def _cmd_convert(args: argparse.Namespace) -> int:
    from medxfer.evaluate.convert import convert

    done = convert(Path(args.target))
    console.print(
        f"{len(done)} file(s) rewritten in the weights-only format"
        if done
        else "nothing to convert: every model file already loads weights-only"
    )
    for path in done:
        print(path)
    return 0


def _add_prune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pr = sub.add_parser("prune", help="lottery-ticket pruning with rewinding and controls")
    pr.add_argument("--config", help="experiment YAML; its prune: section sets the defaults")
    pr.add_argument("--data", help="dataset folder or CSV manifest (= data.root=...)")
    pr.add_argument("--levels", type=int, help="pruning rounds after the dense level 0")
    pr.add_argument("--fraction", type=float, help="of surviving weights removed per round")
    pr.add_argument("--target-sparsity", type=float, help="end exactly at this sparsity in (0, 1)")
    pr.add_argument("--rewind", help="init | epoch:K | lr (LR rewinding: keep weights)")
    pr.add_argument("--no-controls", action="store_true", help="skip random re-init / random mask")
    pr.add_argument("--include-head", action="store_true", help="prune the classification head too")
    pr.add_argument("--finetune", action="store_true", help="add the prune + fine-tune baseline")
    pr.add_argument(
        "--distill",
        type=float,
        metavar="W",
        help="add that fine-tune distilled from the dense model, weight W in (0, 1]",
    )
    pr.add_argument(
        "--ticket-distill",
        type=float,
        metavar="W",
        help="retrain the ticket and its controls distilled from the dense model, weight W",
    )
    pr.add_argument(
        "--weights",
        choices=("last", "best"),
        help="prune (and rewind / fine-tune / teach from) each run's final epoch (default) or "
        "the epoch validation chose (best.pt)",
    )
    pr.add_argument("--out", help="lottery folder (default: <out_dir>/<name>-<hash>-lottery-<tag>)")
    pr.add_argument("--force", action="store_true", help="delete an existing lottery folder first")
    pr.add_argument("--export", metavar="RUN_DIR", help="export a pruned run folder instead")
    pr.add_argument("--no-latency", action="store_true", help="with --export: skip CPU timing")
    pr.add_argument("--no-onnx", action="store_true", help="with --export: skip the ONNX check")
    pr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
    pr.set_defaults(func=_cmd_prune)


def _add_prune_structured_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ps = sub.add_parser("prune-structured", help="remove whole channels (L1 norm) of a trained "
                        "run and fine-tune: a faster model, measured on CPU")  # fmt: skip
    ps.add_argument("run", help="a finished run folder (train, or a lottery's level_0/dense)")
    ps.add_argument("--ratio", type=float, help="channels removed per layer, in (0, 1)")
    ps.add_argument("--speedup", type=float, help="without --ratio: MACs cut to aim at (2.0)")
    ps.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the run's)")
    ps.add_argument("--steps", type=int, help="reach the cut in this many pruning steps, "
                    "sharing the fine-tuning epochs (default 1: prune once)")  # fmt: skip
    ps.add_argument("--soft", type=int, help="epochs of soft filter pruning on the whole "
                    "network before the cut (default 0)")  # fmt: skip
    ps.add_argument("--out", help="fine-tune run folder (default: <run>-structured-<hash>)")
    ps.add_argument("--force", action="store_true", help="delete the output folder first")
    ps.add_argument("--no-latency", action="store_true", help="skip the CPU timing")
    ps.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    ps.set_defaults(func=_cmd_prune_structured)


def _cmd_prune_structured(args: argparse.Namespace) -> int:
    import hashlib

    from medxfer.config import legacy_override
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.prune.structured import run_structured
    from medxfer.runs import replace_output_dir, run_inputs

    flags = {"ratio": args.ratio, "speedup": args.speedup, "epochs": args.epochs,
             "steps": args.steps, "soft": args.soft}  # fmt: skip
    overrides = [f"structured.{k}={v}" for k, v in flags.items() if v is not None]
    overrides += list(args.overrides)
    run = Path(args.run)
    # named by the overrides as spelled before the structured section (prune.structured_*),
    # so a rerun of an older command finds its folder
    named = [legacy_override(o) for o in overrides]
    tag = hashlib.sha256(json.dumps(named).encode()).hexdigest()[:8]
    out = Path(args.out) if args.out else run.with_name(f"{run.name}-structured-{tag}")
    replace_output_dir(out, force=args.force, inputs=run_inputs(run))
    report = run_structured(
        run,
        out,
        evaluate=evaluate_trained,
        overrides=overrides,
        latency=not args.no_latency,
        command=["medxfer", *args.argv],
    )
    keys = ("ratio", "macs_speedup", "params_fraction", "dense", "pruned", "latency")
    console.print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    print(out / "structured.json")
    return 0


def _add_gan_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("gan", help="WGAN-GP minority-class synthesis and imbalance comparison")
    gs = g.add_subparsers(dest="gan_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="experiment YAML; its gan: section sets the GAN")
        p.add_argument("--data", help="dataset folder or CSV manifest (= data.root=...)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. gan.steps=2000")
        _add_trust_pickle(p)

    t = gs.add_parser("train", help="train a WGAN-GP on the training split (resumable)")
    common(t)
    t.add_argument("--out", help="GAN folder (default: <out_dir>/<name>-gan-<hash>)")
    t.add_argument("--max-minutes", type=float, help="stop after this much training time")
    t.add_argument("--no-resume", action="store_true", help="start again, ignore a checkpoint")
    t.add_argument("--force", action="store_true", help="delete the GAN folder first")
    s = gs.add_parser("sample", help="write synthetic PNGs + a manifest for data.synthetic")
    s.add_argument("checkpoint", help="generator.pt (or its folder) from `gan train`")
    _add_trust_pickle(s)
    s.add_argument("--out", help="folder for the images (default: <checkpoint dir>/synthetic)")
    s.add_argument("--n", nargs="+", metavar="CLASS:N", help="images per class, e.g. viral:500")
    s.add_argument(
        "--balance",
        type=float,
        metavar="RATIO",
        help="fill minority classes up to RATIO x the largest (default gan.balance)",
    )
    s.add_argument("--seed", type=int, default=0)
    q = gs.add_parser("quality", help="FID/KID per class, two-sample test, TSTR")
    common(q)
    q.add_argument("--manifest", required=True, help="manifest.csv written by `gan sample`")
    q.add_argument("--out", help="folder for quality.json (default: beside the manifest)")
    c = gs.add_parser("compare", help="train none/class_weight/oversample/gan/gan+class_weight")
    common(c)
    c.add_argument("--strategies", nargs="+", help="subset of the five (default: all)")
    c.add_argument(
        "--gan-ratio",
        type=float,
        default=1.0,
        help="synthetic images fill minority classes up to RATIO x the largest",
    )
    c.add_argument("--manifest", help="use these synthetic images (skip GAN training)")
    c.add_argument("--checkpoint", help="sample this generator.pt (skip GAN training)")
    c.add_argument("--out", help="comparison folder (default: <out_dir>/<name>-compare-<hash>)")
    c.add_argument("--no-quality", action="store_true", help="skip FID/KID/two-sample/TSTR")
    g.set_defaults(func=_cmd_gan)


def _cmd_gan(args: argparse.Namespace) -> int:
    from medxfer.evaluate.finish import evaluate_trained
    from medxfer.gan.commands import run

    return run(args, evaluate=evaluate_trained)


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from medxfer.experiment import commands

    r = sub.add_parser("run", help="the whole study: audit, gan, tune, train, prune, evaluate, "
                       "report (resumable; stages.NAME=false turns one off)")  # fmt: skip
    r.add_argument("experiment", help="experiment YAML, e.g. configs/demo.yaml")
    r.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.epochs=2 stages.gan=false data.root=PATH",
    )
    r.set_defaults(func=commands.cmd_run)
    t = sub.add_parser("paper-table", help="collect finished experiments into the paper's table")
    t.add_argument("experiments", nargs="+", help="experiment folders (runs/experiments/<name>)")
    t.add_argument(
        "--out",
        default="",
        help="JSON file; its Markdown twin is written beside it (.md); default: "
        "paper-table.json in the first experiment folder",
    )
    t.set_defaults(func=commands.cmd_paper_table)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse stops collecting the ``overrides`` positional at the first option, so
    ``prune-structured RUN --ratio 0.4 train.lr=1e-3`` would be refused: ``key=value`` words
    after options are overrides too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [w for w in extra if "=" in w and not w.startswith("-")]
    if late != extra or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*(args.overrides or []), *late]
    return args


_FS_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by some reports
    from medxfer.train.checkpoint import trusting_pickle

    try:
        with trusting_pickle(bool(getattr(args, "trust_pickle", False))):
            return int(args.func(args))
    except MedxferError as err:
        _say_error(err.message, err.fix)
        return 2
    except OSError as err:  # the file system refused a write medxfer does not wrap itself
        if err.errno not in _FS_ERRORS:
            raise
        _say_error(f"{err.strerror}: {err.filename}",
                   "free disk space or make the output folder writable")  # fmt: skip
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; `--resume` continues from the last completed epoch")
        return 130


def _say_error(message: str, fix: str | None) -> None:
    """The error and its fix on stderr, as written: no markup read from them (a file may be
    named ``[x].png``) and no line breaks added inside them, so a path can be copied whole."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if fix:
        console.print(f"  [bold]fix:[/] {escape(fix)}", soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
