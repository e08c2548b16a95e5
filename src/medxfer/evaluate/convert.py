"""``medxfer convert``: rewrite model files of an older medxfer in the weights-only format.

Older structured-pruned ``model.pt`` files held a pickled module, which only full unpickling
reads (and unpickling can run any code). Converting needs that unpickling once, so it runs only
when the user passes ``--trust-pickle``; each file is then rewritten atomically as tensors and
plain values: the structured model as its weights plus the recipe (ratio, steps) that rebuilds
the thinner network, checked to rebuild it before the file is replaced.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from medxfer.errors import MedxferError
from medxfer.train.checkpoint import atomic_save, load_checkpoint, pickle_trusted, plain


def needs_unpickling(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        return "weights only" in str(err).lower()
    except Exception:
        return False  # unreadable for another reason: loading it reports that
    return False


def convert(target: Path) -> list[Path]:
    """Rewrite every file under ``target`` (or ``target`` itself) that needs unpickling;
    returns the files rewritten. Refused, naming them, unless pickle is trusted."""
    if not target.exists():
        raise MedxferError(f"{target} does not exist", "pass a run folder or a model file")
    files = [target] if target.is_file() else sorted(target.rglob("*.pt"))
    old = [f for f in files if needs_unpickling(f)]
    if not old:
        return []
    if not pickle_trusted():
        names = ", ".join(str(f) for f in old[:3]) + (" ..." if len(old) > 3 else "")
        raise MedxferError(
            f"{len(old)} file(s) need unpickling to be read, which can run any code: {names}",
            f"only if you trust whoever made them: medxfer convert {target} --trust-pickle",
        )
    for path in old:
        safe = _safe_form(load_checkpoint(path), path)
        atomic_save(safe, path)
        if needs_unpickling(path):  # never expected: plain() leaves only tensors and values
            raise MedxferError(f"{path} still holds Python objects after conversion")
    return old


def _safe_form(obj: Any, path: Path) -> Any:
    from medxfer.prune.structured import FORMAT, LEGACY_FORMAT, skeleton, structure_meta

    if isinstance(obj, dict) and obj.get("format") == LEGACY_FORMAT:
        module: torch.nn.Module = obj["module"]
        meta = dict(obj["meta"])
        if "structure" not in meta:
            ratio, steps = _recipe(meta, path)
            meta = structure_meta(meta, ratio, steps)
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        try:
            skeleton(meta).load_state_dict(state)
        except RuntimeError:
            raise MedxferError(
                f"{path}: the recipe found for it does not rebuild its network", "retrain it"
            ) from None
        return {"format": FORMAT, "model": state, "meta": meta}
    return plain(obj)


def _recipe(meta: dict[str, Any], path: Path) -> tuple[float, int]:
    """(ratio, steps) of an older structured file: from the ``structured_settings.json`` of its
    prune-structured folder (the file's folder or one above it: ``adapt`` writes beside the
    model), else from the config it carries when that fixed the ratio."""
    for folder in (path.parent, *path.parent.parents):
        settings = folder / "structured_settings.json"
        if settings.exists():
            s = json.loads(settings.read_text())
            return float(s["ratio"]), int(s.get("steps", 1))
    from medxfer.config import renamed_keys  # old files name them prune.structured_*

    structured = renamed_keys(meta.get("config", {})).get("structured", {})
    if structured.get("ratio"):
        return float(structured["ratio"]), int(structured.get("steps", 1))
    raise MedxferError(
        f"{path}: cannot tell which cut made this structured model (no structured_settings.json "
        "beside it)",
        "convert it inside its prune-structured folder",
    )
