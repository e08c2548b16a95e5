"""``medxfer predict``: class probabilities for an image, a folder or a DICOM file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from medxfer.data.io import IMAGE_SUFFIXES, read_image, resize
from medxfer.data.loader import to_float
from medxfer.errors import MedxferError
from medxfer.models import create_model
from medxfer.models.registry import Preprocess

console = Console(stderr=True)

# The model files medxfer writes, in the order a run folder is searched for them.
MODEL_FILES = ("model.pt", "best.pt", "export/model.sparse.pt")


def model_file(checkpoint: Path) -> Path:
    """A run folder -> the first model file it holds (prune-structured ``model.pt``, whose
    ``best.pt`` only fits the thinner network; train/tune/prune ``best.pt``; the compact
    export); a file is returned as is."""
    if not checkpoint.is_dir():
        return checkpoint
    for name in MODEL_FILES:
        if (checkpoint / name).exists():
            return checkpoint / name
    return checkpoint / MODEL_FILES[0]


def load_trained(checkpoint: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Any model medxfer writes (a run folder or the file: ``best.pt`` of train, tune or a
    lottery level, the structured-pruned ``model.pt``, the compact ``model.sparse.pt``) ->
    eval-mode model and its meta (arch, classes, mean/std, image size)."""
    model, meta, _ = load_trained_with_format(checkpoint)
    return model, meta


def load_trained_with_format(
    checkpoint: Path,
) -> tuple[torch.nn.Module, dict[str, Any], str | None]:
    """``load_trained`` plus the file's ``format`` tag (structured, sparse, or None for a state
    dict), for a caller that writes the model back in its own kind of file."""
    from medxfer.prune.export import FORMAT as SPARSE_FORMAT  # bit mask + surviving values
    from medxfer.prune.structured import FORMAT as STRUCTURED_FORMAT  # weights + recipe
    from medxfer.prune.structured import LEGACY_FORMAT, from_payload
    from medxfer.train.checkpoint import load_checkpoint

    path = model_file(checkpoint)
    if not path.exists():
        raise MedxferError(
            f"no checkpoint at {path}",
            "pass a run folder of `medxfer train`, `prune` or `prune-structured`, or a model file",
        )
    obj = load_checkpoint(path)  # weights only, unless the user trusts the file
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt in (STRUCTURED_FORMAT, LEGACY_FORMAT):  # channels physically removed
        module, meta = from_payload(obj, path)
        return _inference_layout(module), meta, STRUCTURED_FORMAT
    if fmt == SPARSE_FORMAT:
        from medxfer.prune.export import expand

        state, meta = expand(obj), obj.get("meta", {})
    elif isinstance(obj, dict) and "meta" in obj and "model" in obj:
        from medxfer.prune.magnitude import fold_reparam

        state, meta = fold_reparam(obj["model"]), obj["meta"]  # a pruned level: mask folded in
    else:
        raise MedxferError(f"{path} is not a medxfer model file", "use a run folder's best.pt")
    if not {"arch", "classes"} <= set(meta):
        raise MedxferError(f"{path} has no model description (arch, classes) in its meta")
    built = create_model(meta["arch"], weights="none", num_classes=len(meta["classes"]))
    built.model.load_state_dict(state)
    return _inference_layout(built.model), meta, fmt


def _inference_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, 4-D weights in the NHWC (channels-last) layout that the training loop also
    uses: oneDNN's CPU convolutions run it faster (studies/results/inference-layout/result.json),
    and ``probs_of_arrays`` feeds it NHWC batches. Values, and so predictions, are unchanged."""
    return model.eval().to(memory_format=torch.channels_last)


def folded_for_inference(
    model: torch.nn.Module, meta: dict[str, Any]
) -> tuple[torch.nn.Module, int]:
    """``model`` with its BatchNorms folded into the convolutions before them (checked on a
    random batch at the model's input size; ``models/fuse.py``), in the inference layout, and
    the number folded. Only for prediction: AdaBN and recalibration need the BatchNorms."""
    from medxfer.models.fuse import fold_batchnorm

    size = int(meta["image_size"])
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    folded, n = fold_batchnorm(model, example.contiguous(memory_format=torch.channels_last))
    return _inference_layout(folded), n


def collect_inputs(target: Path) -> list[Path]:
    if not target.exists():
        raise MedxferError(f"{target} does not exist", "pass an image, a DICOM file or a folder")
    if target.is_file():
        return [target]
    files = sorted(
        p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise MedxferError(f"{target} holds no images", f"supported: {sorted(IMAGE_SUFFIXES)}")
    return files


@torch.no_grad()
def probs_of_arrays(
    model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Softmax probabilities of uint8 images already at the model's size ((N, H, W) or
    (N, H, W, 3)), normalized with the checkpoint's mean and std."""
    out = []
    for start in range(0, len(arrays), batch_size):
        x = preprocess_arrays(meta, arrays[start : start + batch_size])
        x = x.contiguous(memory_format=torch.channels_last)  # the layout of load_trained
        out.append(torch.softmax(model(x), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(meta["classes"])), np.float32)


def preprocess_arrays(meta: dict[str, Any], arrays: np.ndarray) -> torch.Tensor:
    """uint8 images at the model's size -> the float batch the model takes (3 channels,
    normalized with the checkpoint's mean and std)."""
    pre = Preprocess(tuple(meta["mean"]), tuple(meta["std"]), "checkpoint")
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    x = to_float(torch.from_numpy(np.require(arrays, requirements=["C", "W"])))
    return ((x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x) - mean) / std


def read_arrays(
    meta: dict[str, Any], files: list[Path]
) -> tuple[list[np.ndarray], dict[Path, str]]:
    """The readable ``files`` as uint8 arrays at the model's size and colour, in order, and
    why each unreadable one could not be read."""
    arrays, errors = [], {}
    for f in files:
        try:
            img = read_image(f, str(meta["color"]))
            arrays.append(resize(img, int(meta["image_size"]), str(meta["resize"])))
        except MedxferError as err:
            errors[f] = err.message
    return arrays, errors


def iter_file_probs(
    model: torch.nn.Module, meta: dict[str, Any], files: list[Path], batch_size: int = 32
) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """Per file, in order: its probabilities, or None and why it could not be read."""
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, errors = read_arrays(meta, chunk)
        probs = iter(probs_of_arrays(model, meta, np.stack(arrays), batch_size) if arrays else [])
        for f in chunk:
            yield (f, None, errors[f]) if f in errors else (f, next(probs), "")


def unfinished_run(path: Path) -> str | None:
    """Why the model file's run has not finished (training still running or interrupted: a
    ``last.pt`` and no ``metrics.json``), or None."""
    run = path.parent
    if (run / "last.pt").exists() and not (run / "metrics.json").exists():
        return (
            f"{run} has not finished training (no metrics.json): its best.pt is the best epoch "
            "so far, never evaluated on the test split"
        )
    return None
