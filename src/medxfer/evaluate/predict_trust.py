"""``medxfer predict`` with per-image trust: scores, flag and conformal set beside the
probabilities, and optionally a static review page (``--html``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.errors import MedxferError
from medxfer.evaluate.predict import collect_inputs, folded_for_inference, load_trained, read_arrays
from medxfer.evaluate.trust import FLAGS, TRUST_JSON, TrustModel, TrustScores, load_trust
from medxfer.evaluate.trust_detectors import DETECTORS
from medxfer.train.checkpoint import atomic_write_text, ensure_dir


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a model belongs to (the one holding its config.yaml), if any."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if folder.is_dir() and (folder / "config.yaml").is_file():
            return folder
    return None


def trust_for(checkpoint: Path) -> tuple[TrustModel | None, str]:
    """The run's trust statistics: loaded, else fitted now when its training data is
    reachable; None and why otherwise."""
    from medxfer.evaluate.trust import fit_trust

    run = run_folder_of(checkpoint)
    if run is None:
        return None, (
            f"{checkpoint} is not inside a run folder: no flags or sets (predict on the run "
            "folder, whose trust statistics `medxfer trust RUN` writes)"
        )
    if (run / TRUST_JSON).is_file():
        return load_trust(run), ""
    try:
        tm = fit_trust(run)
    except MedxferError as err:
        return None, (f"{run} has no trust statistics and they cannot be fitted here "
                      f"({err.message}): no flags or sets; run `medxfer trust {run}` where the "
                      "training data is")  # fmt: skip
    return tm, f"fitted trust statistics from the run's training data into {run}"


def _header(classes: list[str], with_trust: bool) -> list[str]:
    head = ["path", "predicted", *[f"p_{c}" for c in classes]]
    if with_trust:
        head += ["flag", "set", "ood_score", "failure_score", *[f"score_{d}" for d in DETECTORS]]
    return [*head, "error"]


def _row(path: Path, classes: list[str], ts: TrustScores | None, i: int,
         probs: np.ndarray) -> list[str]:  # fmt: skip
    p = probs[i]
    row = [str(path), classes[int(p.argmax())], *[f"{v:.6f}" for v in p]]
    if ts is not None:
        members = "|".join(c for c, s in zip(classes, ts.sets[i], strict=True) if s)
        scores = [f"{ts.scores[d][i]:.6g}" if d in ts.scores else "" for d in DETECTORS]
        row += [str(ts.flag[i]), members, f"{ts.ood_score[i]:.6g}", f"{ts.failure_score[i]:.6g}",
                *scores]  # fmt: skip
    return [*row, ""]


SURPRISE_P = 0.001  # folder_summary warns when so few images ending ok has a smaller chance


def folder_summary(counts: dict[str, int], record: dict[str, Any]) -> tuple[str, str]:
    """(one line counting the flags, a warning or "") for the images of one ``predict`` call
    (``counts``: images per flag).

    The thresholds let ``acceptance`` of validation end ok. Far fewer ok here (one-sided
    binomial test, p < ``SURPRISE_P``) means these images are not like validation's, and then
    neither the validated accuracy nor the sets' coverage carries over to them."""
    from scipy.stats import binomtest

    counts = {f: int(counts.get(f, 0)) for f in FLAGS}
    n = sum(counts.values())
    acceptance = float(record["acceptance"])
    line = (", ".join(f"{counts[f]} {f}" for f in FLAGS)
            + f" (validation: {acceptance:.0%} ok)")  # fmt: skip
    if n == 0:
        return line, ""
    p = binomtest(counts["ok"], n, acceptance, alternative="less").pvalue
    if p >= SURPRISE_P:
        return line, ""
    worst = "unfamiliar" if counts["unfamiliar"] >= counts["review"] else "review"
    return line, (
        f"only {counts['ok'] / n:.0%} of these {n} images end ok, against {acceptance:.0%} of "
        f"validation (binomial p = {p:.1g}), most of the rest `{worst}`: they are not like the "
        "images the model was validated on, so its validated accuracy and the sets' "
        f"{float(record['coverage']):.0%} coverage need not hold for them. Read the flagged "
        "ones first (--html); `medxfer shift` compares the folder as a whole"
    )


def predict_with_trust(
    checkpoint: Path, target: Path, out_csv: Path, batch_size: int = 32,
    html: Path | None = None, html_limit: int = 200,
) -> tuple[Path, int, str, tuple[str, str] | None]:  # fmt: skip
    """Write the predictions CSV (and the review page); returns (csv, files, note, the
    ``folder_summary`` of the images read, or None without trust statistics)."""
    from medxfer.evaluate.predict import console, model_file, probs_of_arrays, unfinished_run

    model, meta = load_trained(checkpoint)
    unfinished = unfinished_run(model_file(checkpoint))
    if unfinished is not None:
        console.print(f"[yellow]warning:[/] {unfinished}")
    fast, _ = folded_for_inference(model, meta)
    trust, note = trust_for(checkpoint)
    classes: list[str] = list(meta["classes"])
    files = collect_inputs(target)
    rows: list[list[str]] = []
    kept: list[dict[str, Any]] = []
    flags = dict.fromkeys(FLAGS, 0)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, errors = read_arrays(meta, chunk)
        batch = np.stack(arrays) if arrays else np.zeros((0,))
        ts = trust.score(fast, meta, batch, batch_size) if trust and arrays else None
        if ts is not None:
            probs = ts.probs
            for f in ts.flag:
                flags[str(f)] += 1
        elif arrays:
            probs = probs_of_arrays(fast, meta, batch, batch_size)
        i = 0
        for f in chunk:
            if f in errors:
                rows.append([str(f), "", *[""] * (len(_header(classes, trust is not None)) - 3),
                             errors[f]])  # fmt: skip
                continue
            rows.append(_row(f, classes, ts, i, probs))
            if html is not None:
                kept.append(_record(f, arrays[i], probs[i], ts, i, classes))
            i += 1
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_header(classes, trust is not None))
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), ensure_dir(out_csv.parent) / out_csv.name)
    if rows and all(r[-1] for r in rows):
        raise MedxferError(
            f"none of the {len(rows)} file(s) could be read, e.g. {rows[0][0]}: {rows[0][-1]}",
            f"every reason is in the error column of {out_csv}",
        )
    if html is not None:
        from medxfer.evaluate.review_page import write_review_page

        write_review_page(html, kept, model, meta, trust, note, html_limit)
    summary = folder_summary(flags, trust.record) if trust is not None and any(
        flags.values()) else None  # fmt: skip
    return out_csv, len(files), note, summary


def _record(path: Path, array: np.ndarray, probs: np.ndarray, ts: TrustScores | None, i: int,
            classes: list[str]) -> dict[str, Any]:  # fmt: skip
    rec: dict[str, Any] = {"path": str(path), "array": array, "probs": probs, "flag": "",
                           "pred": int(probs.argmax()), "set": [], "failure": 0.0}  # fmt: skip
    if ts is not None:
        rec |= {"flag": str(ts.flag[i]), "failure": float(ts.failure_score[i]),
                "ood": float(ts.ood_score[i]),
                "set": [c for c, s in zip(classes, ts.sets[i], strict=True) if s]}  # fmt: skip
    return rec
