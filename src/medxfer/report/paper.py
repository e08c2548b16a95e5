"""The paper's results table beside ours: result rows, the paper's numbers, the layout.

Saleh & Zhang (IEEE SMC 2024) report test accuracy only, and only two numbers in the abstract:
the fine-tuned EfficientNet reaches 96% on brain tumor MRI, and a fine-tuned GoogLeNet with
pruning 81.5% on 3-class pediatric chest X-ray (pneumonia). Those are the references here; no
other paper number is invented. They live in ``paper_reference.json`` beside this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medxfer.evaluate.metrics import split_shift

# The paper's numbers are data (package data beside this module), not code.
_REFERENCE = json.loads((Path(__file__).with_name("paper_reference.json")).read_text())
PAPER: str = _REFERENCE["paper"]
# (dataset, architecture family, pruned) -> the paper's test accuracy
PAPER_ACCURACY: dict[tuple[str, str, bool], float] = {
    (r["dataset"], r["family"], bool(r["pruned"])): float(r["test_accuracy"])
    for r in _REFERENCE["test_accuracy"]
}
DATASETS: dict[str, str] = _REFERENCE["datasets"]


MANIFEST_SUFFIXES = (".csv",)  # what medxfer.data.sources reads as a manifest


def dataset_key(root: str) -> str:
    """``../shared/data/brain-tumor-mri`` -> ``brain-tumor``; "" -> ``synthetic-demo``; a
    manifest file is named by its folders (``/data/brain/p1/manifest.csv`` -> ``brain-tumor``)."""
    if not root:
        return "synthetic-demo"
    path = Path(root)
    for name in [p.lower() for p in reversed(path.parts)]:
        if "brain" in name:
            return "brain-tumor"
        if "pneumonia" in name or "xray" in name.replace("-", ""):
            return "pneumonia"
    manifest = path.suffix.lower() in MANIFEST_SUFFIXES  # not a folder such as ``knee.v2``
    return (path.parent.name if manifest else path.name).lower()


def paper_value(dataset: str, family: str, pruned: bool) -> float | None:
    return PAPER_ACCURACY.get((dataset, family, pruned))


def result_row(
    metrics: dict[str, Any],
    *,
    dataset: str,
    arch: str,
    family: str,
    weights: str,
    tuned: bool,
    pruned: bool,
    sparsity: float,
    run_dir: str,
    command: str,
    image_size: int | None = None,
    epochs: int | None = None,
    pruned_by: str | None = None,
) -> dict[str, Any]:
    """One row of paper-table.json from a run's metrics.json (test split); ``image_size`` and
    ``epochs`` say what that run trained (a lottery may run cheaper than the fine-tune);
    ``pruned_by``: how a pruned model was obtained (lottery ticket, pruned + fine-tuned);
    ``val_test_shifted_classes``: see ``medxfer.evaluate.metrics.split_shift``."""
    test = metrics["test"]
    ci = test.get("ci95", {})
    return {
        "dataset": dataset,
        "arch": arch,
        "family": family,
        "weights": weights,
        "tuned": tuned,
        "pruned": pruned,
        "sparsity": round(sparsity, 4),
        "pruned_by": pruned_by,
        "test_accuracy": test["accuracy"],
        "test_accuracy_ci95": ci.get("accuracy"),
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_balanced_accuracy_ci95": ci.get("balanced_accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        # classes whose recall differs between validation and test beyond chance
        "val_test_shifted_classes": (
            [c["class"] for c in split_shift(metrics["val"], test) if c["shifted"]]
            if "val" in metrics
            else None
        ),
        "n_test": int(sum(map(sum, test.get("confusion_matrix", [[0]])))),
        "paper_test_accuracy": paper_value(dataset, family, pruned),
        "image_size": image_size,
        "epochs": epochs,
        "run_dir": run_dir,
        "command": command,
    }


def fmt(x: float | None, ci: list[float] | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


DATASET_WORDS = {"brain", "tumor", "tumour", "mri", "chest", "xray", "x", "ray", "pneumonia"}


def study(row: dict[str, Any]) -> str:
    """The experiment's name without the words that name its dataset: ``cpu-brain-tumor`` and
    ``cpu-pneumonia`` are one study (``cpu``), ``cpu-pneumonia-192`` another (``cpu-192``)."""
    name = str(row.get("experiment", ""))
    return "-".join(w for w in name.split("-") if w.lower() not in DATASET_WORDS) or name


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: one row per architecture and variant (fine-tuned / pruned), one
    column group per dataset with our accuracy (95% CI), balanced accuracy and the paper's.
    Rows of several studies (``cpu-*`` and ``paper-*`` experiments) get a first column with
    the study (``study``)."""
    datasets = sorted({r["dataset"] for r in rows})
    studies = {study(r) for r in rows}
    header = (["study"] if len(studies) > 1 else []) + ["architecture", "variant"]
    for d in datasets:
        label = DATASETS.get(d, d)
        header += [
            f"{label}: accuracy (95% CI)",
            f"{label}: balanced acc. (95% CI)",
            f"{label}: paper",
        ]
    keys = sorted({(study(r), r["arch"], r["pruned"]) for r in rows})
    body = []
    for name, arch, pruned in keys:
        line = ([name] if len(studies) > 1 else []) + [arch]
        line.append("fine-tuned + pruned" if pruned else "fine-tuned")
        for d in datasets:
            match = [
                r for r in rows
                if (r["dataset"], study(r), r["arch"], r["pruned"]) == (d, name, arch, pruned)
            ]  # fmt: skip
            r = match[-1] if match else None
            if r is None:
                line += ["—", "—", "—"]
                continue
            acc = fmt(r["test_accuracy"], r["test_accuracy_ci95"])
            if pruned:
                how = f", {r['pruned_by']}" if r.get("pruned_by") else ""
                acc += f" (sparsity {r['sparsity']:.0%}{how})"
            paper = r.get("paper_test_accuracy")
            line += [
                acc,
                fmt(r["test_balanced_accuracy"], r["test_balanced_accuracy_ci95"]),
                f"{paper:.3f}" if paper is not None else "—",
            ]
        body.append(line)
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def collect_rows(experiment_dirs: list[Path]) -> list[dict[str, Any]]:
    """Rows of every finished evaluate stage under the given experiment folders (also when a
    folder was moved, e.g. fetched from another machine); each row names its ``experiment``."""
    rows: list[dict[str, Any]] = []
    for root in experiment_dirs:
        for marker in sorted(Path(root).rglob("stages/evaluate.json")):
            path = Path(json.loads(marker.read_text())["outputs"]["evaluation"])
            if not path.exists():  # moved: the same folder under this cell
                path = marker.parents[1] / path.parent.name / path.name
            for row in json.loads(path.read_text())["rows"]:
                rows.append({"experiment": Path(root).resolve().name, **row})
    return rows


def write_table(experiment_dirs: list[Path], out_json: Path) -> tuple[Path, Path, int]:
    """``paper-table.json`` (``rows``) and its Markdown twin from finished experiments."""
    from medxfer.errors import MedxferError

    missing = [str(d) for d in experiment_dirs if not Path(d).is_dir()]
    if missing:
        raise MedxferError(
            f"no experiment folder {', '.join(missing)}", "pass folders that `medxfer run` printed"
        )
    rows = collect_rows(experiment_dirs)
    if not rows:
        raise MedxferError(
            "no finished evaluate stage under the given folders",
            "run `medxfer run <experiment.yaml>` to the end first",
        )
    return write_rows(rows, out_json)


def write_rows(rows: list[dict[str, Any]], out_json: Path) -> tuple[Path, Path, int]:
    """``paper-table.json`` and its Markdown twin from rows (``collect_rows``' or kept ones)."""
    from medxfer.train.checkpoint import atomic_write_json, atomic_write_text

    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        {
            "paper": PAPER,
            "paper_accuracy": [
                {"dataset": d, "family": f, "pruned": p, "test_accuracy": v}
                for (d, f, p), v in PAPER_ACCURACY.items()
            ],
            "rows": rows,
        },
        out_json,
    )
    header, body = table(rows)
    commands = sorted({r["command"] for r in rows})
    text = (
        f"# Results beside the paper ({PAPER})\n\nTest accuracy and balanced accuracy on "
        "the untouched test split, 95% bootstrap intervals.\n\n"
        + markdown(header, body)
        + "\nCommands:\n\n"
        + "".join(f"- `{c}`\n" for c in commands)
    )
    md = out_json.with_suffix(".md")
    atomic_write_text(text, md)
    return out_json, md, len(rows)
