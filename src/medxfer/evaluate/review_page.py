"""``predict --html``: one self-contained review page (inline CSS, images as base64 PNG, no
script, no network), flagged images first, each with its Grad-CAM, probabilities, conformal
set and flag."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

ORDER = {"unfamiliar": 0, "review": 1, "ok": 2, "": 3}
COLOURS = {"unfamiliar": "#c0392b", "review": "#d68910", "ok": "#1e8449", "": "#555"}
CSS = """body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#1d232a}.card{display:flex;gap:1em;
border:1px solid #d0d5db;border-radius:6px;padding:.6em;margin:.6em 0}.card img{width:160px;
height:160px;image-rendering:pixelated;border:1px solid #e3e6ea}.flag{font-weight:700;
color:#fff;padding:.1em .5em;border-radius:4px}table{border-collapse:collapse;font-size:.85em}
td{padding:.1em .6em;border-bottom:1px solid #eee}.meta{color:#666;font-size:.9em}
.path{font-family:monospace;font-size:.85em;word-break:break-all}"""


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def gradcam_overlays(
    model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray, targets: list[int]
) -> list[np.ndarray]:
    """Grad-CAM of each image for its predicted class, overlaid, as uint8 RGB."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from medxfer.evaluate.predict import preprocess_arrays
    from medxfer.models.registry import gradcam_target

    model = model.eval().to(memory_format=torch.contiguous_format)
    out: list[np.ndarray] = []
    with GradCAM(model=model, target_layers=[gradcam_target(model, str(meta["arch"]))]) as cam:
        for start in range(0, len(arrays), 16):
            part = arrays[start : start + 16]
            chosen = [ClassifierOutputTarget(t) for t in targets[start : start + 16]]
            maps = cam(input_tensor=preprocess_arrays(meta, part), targets=chosen)
            out += [show_cam_on_image(_rgb(a).astype(np.float32) / 255, m, use_rgb=True)
                    for a, m in zip(part, maps, strict=True)]  # fmt: skip
    return out


EMPTY_SET = {  # what an empty conformal set says, by the run's conformal score
    "lac": "(empty: no class fits at this coverage)",
    "aps": "(empty: the model is surer of its top class than this coverage needs)",
}


def empty_set_note(record: dict[str, Any] | None) -> str:
    """How the page words an empty set. LAC leaves the least sure images without a class; APS
    the surest, whose top class alone would cover more than asked."""
    score = (record or {}).get("conformal_score", "lac")
    return EMPTY_SET.get(score, EMPTY_SET["lac"])


def _card(rec: dict[str, Any], cam: np.ndarray | None, classes: list[str],
          empty: str = EMPTY_SET["lac"]) -> str:  # fmt: skip
    flag = rec["flag"]
    badge = (f'<span class="flag" style="background:{COLOURS[flag]}">{flag}</span>'
             if flag else "<span>no flag (no trust statistics)</span>")  # fmt: skip
    probs = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{p:.3f}</td></tr>"
        for c, p in sorted(zip(classes, rec["probs"], strict=True), key=lambda t: -t[1])
    )
    extra = ""
    if flag:
        members = ", ".join(html.escape(c) for c in rec["set"]) or html.escape(empty)
        extra = (f"<p>conformal set: {members}<br>failure score {rec['failure']:.3f} · "
                 f"distance score {rec['ood']:.4g}</p>")  # fmt: skip
    cam_img = f'<img src="{_png(cam)}" alt="Grad-CAM">' if cam is not None else ""
    return (
        f'<div class="card"><img src="{_png(_rgb(rec["array"]))}" alt="image">{cam_img}<div>'
        f'<p class="path">{html.escape(rec["path"])}</p><p>{badge} predicted '
        f"<b>{html.escape(classes[rec['pred']])}</b></p>{extra}<table>{probs}</table></div></div>"
    )


def write_review_page(
    path: Path, records: list[dict[str, Any]], model: torch.nn.Module, meta: dict[str, Any],
    trust: Any, note: str, limit: int = 200,
) -> Path:  # fmt: skip
    """Write the page: unfamiliar, then review, then ok; within a flag, most likely wrong first.
    Only the first ``limit`` images are shown (Grad-CAM costs a backward pass each)."""
    classes = list(meta["classes"])
    records = sorted(records, key=lambda r: (ORDER[r["flag"]], -r["failure"]))
    shown = records[:limit]
    cams = gradcam_overlays(model, meta, np.stack([r["array"] for r in shown]),
                            [r["pred"] for r in shown]) if shown else []  # fmt: skip
    counts = {f: sum(r["flag"] == f for r in records) for f in ("unfamiliar", "review", "ok")}
    intro = (
        f"{len(records)} readable image(s): {counts['unfamiliar']} unfamiliar (unlike the "
        f"training images), {counts['review']} to review (in distribution but likely wrong), "
        f"{counts['ok']} ok."
        if trust is not None
        else f"No flags: {note}."
    )
    if trust is not None:
        r = trust.record
        intro += (f" Thresholds from validation: {100 * r['acceptance']:.0f}% of validation "
                  f"images end ok; sets cover the true class {100 * r['coverage']:.0f}% of "
                  "the time on images like validation.")  # fmt: skip
    if len(records) > limit:
        intro += f" Showing the first {limit} (flagged first); the CSV lists all."
    empty = empty_set_note(trust.record if trust is not None else None)
    body = "".join(_card(r, c, classes, empty) for r, c in zip(shown, cams, strict=True))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>medxfer review'
        f"</title><style>{CSS}</style></head><body><h1>Images to review</h1>"
        f'<p class="meta">{html.escape(intro)}</p>{body}</body></html>\n'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
