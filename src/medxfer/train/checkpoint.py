"""Model files and atomic writes.

Every file medxfer writes with ``atomic_save`` holds only tensors and plain values (dicts,
lists, numbers, strings), so ``load_checkpoint`` reads it with ``torch.load(weights_only=True)``:
loading a model file never runs code. A file that needs full unpickling (a crafted file, or one
written by an older medxfer) is refused with one message, unless the caller runs inside
``trusting_pickle()`` (the CLI's ``--trust-pickle``).

Writes go to a hidden temporary file that replaces the target only when complete, so a killed
run never leaves a file a later run would trust; a failed write (full disk, read-only folder)
removes its temporary file and ends in one ``MedxferError``.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxfer.errors import MedxferError

_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_pickle", default=False)
NOT_OURS = "pass a run folder or a model file that medxfer wrote"
CONVERT_FIX = (
    "only if you trust whoever made the file: `medxfer convert {path} --trust-pickle` rewrites "
    "it in the safe format once (or pass --trust-pickle to this command)"
)


@contextmanager
def trusting_pickle(trust: bool = True) -> Iterator[None]:
    """Within this block, ``load_checkpoint`` may unpickle files that need it (they can run
    code): only for files the user said they trust."""
    token = _TRUST_PICKLE.set(trust)
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def pickle_trusted() -> bool:
    return _TRUST_PICKLE.get()


def _write_fix(path: Path) -> str:
    return f"free disk space or make {path.parent} writable, or choose another output folder"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) or _is_write_failure(err):
            why = "the disk is full" if getattr(err, "errno", None) == errno.ENOSPC else str(err)
            raise MedxferError(f"cannot write {path}: {why}", _write_fix(path)) from None
        raise


def _is_write_failure(err: BaseException) -> bool:
    """torch.save reports a failed write (e.g. a full disk) as a RuntimeError of its writer."""
    return isinstance(err, RuntimeError) and "write" in str(err).lower()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` of ``obj`` made plain (see ``plain``), atomically."""
    data = plain(obj)
    _atomic(path, lambda tmp: torch.save(data, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    _atomic(path, write)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, default=_json_default), path)


def ensure_dir(path: Path) -> Path:
    """``mkdir -p`` that ends in one message when the file system refuses."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = err.strerror or str(err)
        raise MedxferError(f"cannot create {path}: {why}", _write_fix(path)) from None
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def plain(obj: Any) -> Any:
    """``obj`` with numpy values and paths replaced by tensors, numbers and strings, so that
    ``torch.load(weights_only=True)`` reads it back. Containers that need no change are
    returned as they are (a state dict keeps its version metadata)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        new = {k: plain(v) for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        return OrderedDict(new) if isinstance(obj, OrderedDict) else new
    if isinstance(obj, list | tuple):
        items = [plain(v) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items) if type(obj) in (list, tuple) else items
    return obj


def unsafe_reason(err: Exception) -> str:
    """The part of torch's weights-only refusal that says what the file asked to import."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return f"it asks to import {found.group(1)}" if found else "it holds Python objects"


def shipped_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's epoch validated and would ship: a last.pt of a run trained
    with ``train.ema`` holds the trained weights and, apart, their moving average (the model)."""
    ema = checkpoint.get("ema")
    return dict(ema["weights"] if ema is not None else checkpoint["model"])


def load_checkpoint(path: Path) -> Any:
    """A model or checkpoint file, read without running code (weights only). A file that needs
    unpickling is refused with one message, unless inside ``trusting_pickle()``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise MedxferError(f"cannot read {path}: {err}", NOT_OURS) from None
        if not pickle_trusted():
            raise MedxferError(
                f"{path} is not a weights-only file: loading it would need unpickling, which can "
                f"run any code ({unsafe_reason(err)})",
                CONVERT_FIX.format(path=path),
            ) from None
        return _load_trusted(path)
    except FileNotFoundError:
        raise MedxferError(f"no model file at {path}", "pass a medxfer run folder") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise MedxferError(f"cannot read {path}: {err}", NOT_OURS) from None


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise MedxferError(f"cannot read {path}: {err}") from None
