"""Report sections about the stages' runs: class balance and GAN, tuning, training and the
test figures, pruning, Grad-CAM. Input ``r`` as in :mod:`medxfer.report.sections`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from medxfer.prune.report import KINDS
from medxfer.report.blocks import Note, Section, Table, Text, load, num, scalars, status_note
from medxfer.report.blocks import with_ci as ci


def _st(r: dict[str, Any], stage: str) -> str:
    return str(r["status"].get(stage, "not run"))


def _ok(r: dict[str, Any], stage: str) -> bool:
    return stage in r["outputs"]


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else num(value, 4)


def balance_and_gan(r: dict[str, Any], fig_dir: Path) -> list[Section]:
    from medxfer.report.figures import (
        manifest_counts,
        plot_class_balance,
        plot_real_vs_synthetic,
        sample_files,
    )

    bal = Section("balance", "Class balance before and after synthesis")
    gan = Section("gan", "GAN samples and their quality")
    before = (
        load(r["outputs"]["audit"]["audit"])["counts"].get("train") if _ok(r, "audit") else None
    )
    added = manifest_counts(Path(r["outputs"]["gan"]["manifest"])) if _ok(r, "gan") else {}
    if before is None:
        bal.add(status_note(_st(r, "audit"), "audit"))
    else:
        rows = [
            [c, str(n), str(added.get(c, 0)), str(n + added.get(c, 0))] for c, n in before.items()
        ]
        bal.add(
            Table(
                ["class", "real train images", "synthetic added", "after"],
                rows,
                caption="Training images per class (the dataset's train split, before "
                "the validation split is carved from it)",
            )
        )
        bal.image(plot_class_balance(before, added, fig_dir / "class_balance.png"), "Class balance")
    if not _ok(r, "gan"):
        bal.add(status_note(_st(r, "gan"), "gan"))
        return [bal, gan.add(status_note(_st(r, "gan"), "gan"))]
    out = r["outputs"]["gan"]
    if "gate" in out:
        return [bal, gate_section(gan, out)]
    real, synth = sample_files(
        r["outputs"].get("audit", {}).get("root") or _root(r),
        Path(out["manifest"]),
        r["options"]["gan_samples_per_class"],
    )
    png = plot_real_vs_synthetic(real, synth, fig_dir / "real_vs_synthetic.png")
    gan.image(png, "Real training images beside GAN images")
    q = dict(out.get("quality") or {})
    per_class = q.pop("per_class", None)
    if isinstance(per_class, dict) and per_class:
        keys = list(dict.fromkeys(k for v in per_class.values() for k in v))  # a class may skip
        gan.add(
            Table(
                ["class", *[k.replace("_", " ") for k in keys]],
                [[c, *[_cell(v.get(k)) for k in keys]] for c, v in per_class.items()],
                caption="GAN quality per class (lite0 features; real vs real is the floor)",
                id="gan-per-class",
            )
        )
    gan.add(
        Table(
            ["metric", "value"],
            scalars(q),
            caption="GAN quality overall (FID, KID, two-sample classifier accuracy: 0.5 = "
            "indistinguishable; TSTR: train on synthetic, test on real)",
            id="gan-quality",
        )
    )
    return [bal, gan]


def gate_section(gan: Section, out: dict[str, Any]) -> Section:
    """The gate's verdict per class beside real and synthetic images of every judged class."""
    from medxfer.gan.gate import describe

    gate = out["gate"]
    gan.image(
        Path(out["manifest"]).parent / "gate.png",
        "Real training images beside GAN images (every class the gate judged, admitted or not)",
    )
    t = gate["thresholds"]
    rows = []
    for c, m in gate["per_class"].items():
        trtr = m.get("trtr_recall")
        rows.append([
            c, "admitted" if m["passed"] else "rejected",
            _cell(m.get("two_sample_accuracy")),
            f"{num(m.get('tstr_recall'))} / {num(trtr)}" if trtr is not None else "—",
            _cell(m.get("fid_ratio")), _cell(m.get("kid_synthetic_vs_real")),
            str(m.get("memorised", "—")), "; ".join(m["reasons"]) or "—",
        ])  # fmt: skip
    gan.add(
        Table(
            [
                "class",
                "gate",
                f"two-sample acc (≤ {t['two_sample_accuracy_max']})",
                f"TSTR / TRTR recall (≥ {t['tstr_over_trtr_min']}×)",
                f"FID / real-vs-real (≤ {t['fid_over_real_vs_real_max']:g})",
                "KID",
                "memorised (0)",
                "why rejected",
            ],
            rows,
            caption=f"Quality gate on the training split only ({gate['extractor']}; "
            f"{gate['seconds']} s). Only admitted classes' images enter training.",
            id="gan-gate",
        )
    )
    gan.add(Text(" ".join(describe(gate, gate["fallback"]["strategy"]))))
    return gan


def _root(r: dict[str, Any]) -> str:
    from medxfer.config import DataConfig
    from medxfer.data.prepare import resolve_root

    return str(resolve_root(DataConfig(root=r["config"]["data"]["root"]))[0])


def tuning(r: dict[str, Any]) -> Section:
    s = Section("tuning", "Hyper-parameter tuning")
    if not _ok(r, "tune"):
        return s.add(status_note(_st(r, "tune"), "tune"))
    t = r["outputs"]["tune"]
    best = t["best"]
    s.add(
        Text(
            f"Optuna study of {t['n_trials']} trials ({t['complete']} complete, "
            f"{t['pruned']} pruned, {t['failed']} failed) on the validation split only. "
            f"Best trial {best['number']}: {best['value']:.4f} with "
            + ", ".join(f"{k} = {num(v, 5)}" for k, v in best["params"].items())
            + "."
        )
    )
    study = Path(t["study_dir"])
    s.image(study / "figures" / "optimization_history.png", "Tuning history")
    with open(study / "trials.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    keys = [k for k in (trials[0] if trials else {}) if k.startswith("params_")]
    rows = [
        [
            t_["number"],
            t_["state"],
            num(float(t_["value"]), 4) if t_["value"] else "—",
            *[num(float(t_[k]), 5) if t_[k] else "—" for k in keys],
        ]
        for t_ in trials
    ]
    s.add(
        Table(
            ["trial", "state", "value", *[k.removeprefix("params_") for k in keys]],
            rows,
            caption="Trials",
            id="trials",
        )
    )
    return s


def training(r: dict[str, Any]) -> list[Section]:
    curves = Section("training", "Training curves")
    ev = Section("evaluation", "Test split: confusion matrices, ROC curves, calibration")
    runs = []
    if _ok(r, "train"):
        runs.append(("fine-tuned", Path(r["outputs"]["train"]["run_dir"])))
    if _ok(r, "prune"):
        runs.append(("pruned", Path(r["outputs"]["prune"]["selected"]["run_dir"])))
    if not runs:
        note = status_note(_st(r, "train"), "train")
        return [curves.add(note), ev.add(note)]
    for name, run in runs:
        curves.image(run / "figures" / "training_curves.png", f"Training curves ({name})")
        for fig, title in (
            ("confusion_matrix", "Confusion matrix"),
            ("roc", "ROC curves"),
            ("reliability", "Calibration (reliability diagram)"),
        ):
            ev.image(run / "figures" / f"test_{fig}.png", f"{title} ({name}, test split)")
    return [curves, ev]


def pruning(r: dict[str, Any]) -> Section:
    s = Section("pruning", "Lottery-ticket pruning and its controls")
    if not _ok(r, "prune"):
        return s.add(status_note(_st(r, "prune"), "prune"))
    out = r["outputs"]["prune"]
    lot = load(out["lottery"])
    s.image(Path(out["dir"]) / lot["plot"], "Pruning curve: ticket against its controls")
    kinds = [k for k in KINDS if any(k in lv["runs"] for lv in lot["levels"])]
    rows = []
    for lv in lot["levels"]:
        rows.append(
            [str(lv["level"]), f"{lv['sparsity']:.1%}"]
            + [
                ci(
                    lv["runs"][k]["test"]["balanced_accuracy"],
                    lv["runs"][k]["test"]["ci95"].get("balanced_accuracy"),
                )
                if "test" in lv["runs"].get(k, {})
                else "—"
                for k in kinds
            ]
        )
    s.add(
        Table(
            ["level", "sparsity", *[k.replace("_", " ") for k in kinds]],
            rows,
            caption="Test balanced accuracy (95% CI) per level",
            id="pruning",
        )
    )
    from medxfer.prune.report import REPORTABLE

    bound = Path(out["dir"]) / "settings.json"
    if bound.exists():
        s.add(Text(lineage(load(bound))))
    sel = out["selected"]
    s.add(
        Text(
            f"Reported pruned model: {REPORTABLE[sel.get('kind', 'ticket')]}, level "
            f"{sel['level']} ({sel['sparsity']:.1%} of the prunable weights removed), chosen "
            f"as the {sel['rule']}."
        )
    )
    return s


def lineage(settings: dict[str, Any]) -> str:
    """How each level's models came from the previous level's, in words (``settings.json``)."""
    weights = settings.get("weights", "last")  # folders made before the choice: last
    source = ("final weights (last epoch)" if weights == "last"
              else "best weights (the epoch validation chose)")  # fmt: skip
    rewind = str(settings["rewind"])
    start = {
        "init": "the dense run's starting weights (the backbone as loaded, the initial head)",
        "lr": "the pruned weights themselves, replaying the learning-rate schedule "
        "(learning-rate rewinding)",
    }.get(rewind, f"the dense run's weights after {rewind.removeprefix('epoch:')} epoch(s)")
    return (
        f"Each level removes the smallest-magnitude surviving weights of the previous level's "
        f"{source} under one global threshold; its ticket restarts from {start} and retrains "
        "under the mask."
    )


def gradcam(r: dict[str, Any]) -> Section:
    s = Section("gradcam", "Grad-CAM heatmaps")
    if not _ok(r, "evaluate"):
        return s.add(status_note(_st(r, "evaluate"), "evaluate"))
    cams = load(r["outputs"]["evaluate"]["evaluation"])["gradcam"]
    if not cams:
        return s.add(Note("Grad-CAM was switched off (report.gradcam_per_class: 0)."))
    for variant, cam in cams.items():
        s.add(
            Text(
                f"{variant}: {cam['arch']}, target layer `{cam['layer']}`; up to "
                f"{cam['per_class']} correct and {cam['per_class']} wrong test images per "
                "true class (seeded sample). Warm colours mark what raised the predicted "
                "class's score."
            )
        )
        s.image(Path(cam["png"]), f"Grad-CAM ({variant})")
    return s
