"""Report sections built from the files the stages wrote (never from memory), one function each.

Input ``r`` is ``medxfer.experiment.stages.report_input``: config, stage statuses, outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medxfer.evaluate.metrics import SHIFT_ALPHA, SHIFT_MIN_GAP, split_shift
from medxfer.report import paper
from medxfer.report.blocks import Note, Section, Table, Text, load, num, scalars, status_note
from medxfer.report.blocks import with_ci as ci

STAGE_TITLES = {
    "audit": "data audit",
    "gan": "GAN synthesis",
    "tune": "tuning",
    "train": "training",
    "prune": "pruning",
    "evaluate": "evaluation",
    "report": "report",
}


def _st(r: dict[str, Any], stage: str) -> str:
    return str(r["status"].get(stage, "not run"))


def _ok(r: dict[str, Any], stage: str) -> bool:
    return stage in r["outputs"]


def overview(r: dict[str, Any]) -> Section:
    cfg = r["config"]
    s = Section("overview", "Overview")
    if not cfg["data"]["root"]:
        s.add(
            Note(
                "Data: the embedded SYNTHETIC demo set (shapes on noise that medxfer draws "
                "itself) — not medical images; its numbers say nothing about medicine."
            )
        )
    s.add(
        Table(
            ["setting", "value"],
            [
                ["dataset", cfg["data"]["root"] or "embedded synthetic demo set"],
                ["architecture", f"{cfg['model']['arch']} ({cfg['model']['weights']} weights)"],
                ["image size", f"{cfg['data']['image_size']} px"],
                [
                    "training",
                    f"{cfg['train']['epochs']} epochs, batch {cfg['train']['batch_size']}, "
                    f"lr {cfg['train']['lr']:.3g}, weight decay {cfg['train']['weight_decay']:.3g}",
                ],
                ["class imbalance", imbalance_text(cfg)],
                ["command", r["command"]],
            ],
            caption="What was run (the training row holds the tuned values when tuning ran)",
        )
    )
    rows = [[STAGE_TITLES[k], v] for k, v in r["status"].items()]
    s.add(Table(["stage", "status"], rows, caption="Stages (complete = done in an earlier call)"))
    return s


def imbalance_text(cfg: dict[str, Any]) -> str:
    """How the training run met the class imbalance, from its resolved config."""
    parts = []
    if cfg["data"].get("synthetic"):
        parts.append("GAN images added to the training split")
    if cfg["train"].get("weighted_sampling"):
        parts.append("each class sampled equally often")
    if cfg["train"].get("class_weight"):
        parts.append("inverse-frequency class weights in the loss")
    return "; ".join(parts) if parts else "none (plain loss, natural class frequencies)"


def results(r: dict[str, Any]) -> tuple[Section, list[dict[str, Any]]]:
    s = Section("results", "Results beside the paper")
    if not _ok(r, "evaluate"):
        return s.add(status_note(_st(r, "evaluate"), "evaluate")), []
    ev = load(r["outputs"]["evaluate"]["evaluation"])
    header, body = paper.table(ev["rows"])
    s.add(
        Text(
            f"Test accuracy on the untouched test split with 95% bootstrap intervals; the "
            f"paper's column gives the numbers of {paper.PAPER} where it reports one. The "
            "pruned model is the one with the best validation balanced accuracy among the "
            "candidates the prune stage names below (the tickets of every level, and the "
            "fine-tuned or distilled baselines when they are on)."
        )
    )
    s.add(Table(header, body, caption="Results table laid out like the paper's", id="paper-table"))
    rows, recal = [], []
    shift: list[tuple[str, list[dict[str, Any]]]] = []
    for row in ev["rows"]:
        label = "fine-tuned + pruned" if row["pruned"] else "fine-tuned"
        full = load(Path(row["run_dir"]) / "metrics.json")
        if "bn_recalibration" in full:
            b = full["bn_recalibration"]
            recal.append(
                f"{label}: {num(b['val_balanced_accuracy_before'])} -> "
                f"{num(b['val_balanced_accuracy_after'])}, "
                + ("kept" if b["kept"] else "not kept (training statistics used)")
            )
        m = full["test"]
        if "val" in full:
            shift.append((label, split_shift(full["val"], m)))
        c = m.get("ci95", {})
        rows.append(
            [
                label,
                str(m["n"]),
                ci(m["accuracy"], c.get("accuracy")),
                ci(m["balanced_accuracy"], c.get("balanced_accuracy")),
                num(m["macro_f1"]),
                num(m["auroc_macro_ovr"]),
                num(m["ece"]),
                num(m["log_loss"]),
            ]
        )
    s.add(
        Table(
            [
                "model",
                "test images",
                "accuracy (95% CI)",
                "balanced accuracy (95% CI)",
                "macro-F1",
                "macro AUROC",
                "ECE",
                "log-loss",
            ],
            rows,
            caption="Test metrics (from each run's metrics.json)",
            id="test-metrics",
        )
    )
    if recal:
        s.add(
            Text(
                "BatchNorm statistics were re-estimated on the un-augmented training images "
                "after training and kept where validation balanced accuracy did not drop "
                "(train.bn_recalibrate): " + "; ".join(recal) + "."
            )
        )
    if shift:
        _split_shift(s, shift)
    return s, ev["rows"]


def _split_shift(s: Section, shift: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Validation against test, per class: where they disagree, validation-based choices
    (tuning, checkpoint, pruned level) cannot be trusted for that class."""
    s.add(
        Text(
            "Every choice above was made on validation, carved from the training split; the "
            "test split is only as predictable from it as the two are alike. Per class: recall "
            "on each split and the class's share of it; *shifted* marks a recall gap of "
            f"{100 * SHIFT_MIN_GAP:g} points or more that chance alone would produce with "
            f"p < {SHIFT_ALPHA:g} (two-proportion z-test, Bonferroni over classes). For new "
            "images without labels (another site or scanner), `medxfer shift RUN FOLDER` asks "
            "the same question of the model's outputs."
        )
    )
    body = [
        [
            label,
            c["class"],
            num(c["val_recall"]),
            num(c["test_recall"]),
            f"{100 * c['gap']:+.1f}",
            f"{c['val_share']:.2f} / {c['test_share']:.2f}",
            "shifted" if c["shifted"] else "",
        ]
        for label, classes in shift
        for c in classes
    ]
    header = ["model", "class", "val recall", "test recall", "gap (points)", "share val / test"]
    s.add(Table([*header, "shift"], body, caption="Validation against test", id="val-vs-test"))
    flagged = sorted({c["class"] for _, classes in shift for c in classes if c["shifted"]})
    if flagged:
        s.add(
            Note(
                f"Validation and test disagree on {', '.join(flagged)}: the test split does "
                "not look like the validation split for these classes (another site, period "
                "or labeller?). Validation scores overstate or understate what to expect there, "
                "and models chosen on validation (tuned values, pruned level) may rank "
                "differently on test. Check how the test split was collected before trusting "
                "either number for these classes."
            )
        )


def audit(r: dict[str, Any]) -> Section:
    s = Section("audit", "Data audit and leaks")
    if not _ok(r, "audit"):
        return s.add(status_note(_st(r, "audit"), "audit"))
    a = load(r["outputs"]["audit"]["audit"])
    summ = a["summary"]
    s.add(
        Text(
            f"{summ['images']} images under {r['outputs']['audit']['root']}. Leaks are train "
            "images that duplicate a test image exactly or nearly (pixel correlation ≥ "
            f"{a['settings']['near_threshold']}, also flipped or rotated); "
            "`data.drop_leaks=true` removes them from training."
        )
    )
    s.add(Table(["finding", "count"], scalars(summ), caption="Audit summary", id="audit"))
    cue = a.get("shortcuts", {})
    if cue.get("flagged"):
        s.add(
            Text(
                "The label can be told from image statistics alone (size, framing, file size, "
                f"intensity): balanced accuracy {cue['balanced_accuracy']:.2f} against chance "
                f"{cue['chance']:.2f}. A model may learn that cue instead of the finding and "
                "fail where it differs: check whether the classes come from different sources, "
                "and train with `augment.policy: robust`."
            )
        )
    classes = sorted({c for counts in a["counts"].values() for c in counts})
    s.add(
        Table(
            ["split", *classes],
            [[sp, *[str(n.get(c, 0)) for c in classes]] for sp, n in a["counts"].items()],
            caption="Images per split and class",
        )
    )
    near = [p for p in a["near_duplicates"] if p["split_pair"] == "train-test"][:10]
    if near:
        s.add(
            Table(
                ["train file", "test file", "transform", "correlation"],
                [
                    [
                        Path(p["a_path"]).name,
                        Path(p["b_path"]).name,
                        p["transform"],
                        num(p.get("corr"), 4),
                    ]
                    for p in near
                ],
                caption="Examples of train–test near duplicates (first 10)",
            )
        )
    return s


def build(r: dict[str, Any], fig_dir: Path) -> list[Section]:
    from medxfer.report.stage_sections import balance_and_gan, gradcam, pruning, training, tuning
    from medxfer.report.trust_section import trust

    res, _ = results(r)
    return [
        overview(r),
        res,
        trust(r),
        audit(r),
        *balance_and_gan(r, fig_dir),
        tuning(r),
        *training(r),
        pruning(r),
        gradcam(r),
    ]
