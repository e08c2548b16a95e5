"""Ship a pruned model: a compact file, its honest sizes, CPU latency, and an ONNX check.

The compact format keeps, for each masked weight, the surviving values (fp32, exact) and the
mask packed 8 positions per byte (``numpy.packbits``); every other tensor is stored as is.
``load_compact`` rebuilds the exact dense state dict, so a restored model predicts bit for bit
what the run's ``best.pt`` predicts.

Unstructured sparsity saves storage, not time: the zeros stay inside dense tensors and the
dense convolution kernels do the same work, so the latency report measures both and says so.
"""

from __future__ import annotations

import copy
import gzip
import io
import math
import time
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models import create_model
from medxfer.prune.magnitude import check_pruned, fold_reparam
from medxfer.prune.mask import Mask
from medxfer.train.checkpoint import atomic_save, atomic_write_json, load_checkpoint

FORMAT = "medxfer-sparse-v1"
State = dict[str, torch.Tensor]


def compact(state: State, mask: Mask) -> dict[str, Any]:
    """Pure: a state dict pruned with ``mask`` -> packed bits + surviving values."""
    check_pruned(state, mask, "the checkpoint")
    sparse, dense = {}, {}
    for key, value in state.items():
        if key in mask:
            keep = mask[key].reshape(-1)
            sparse[key] = {
                "shape": list(value.shape),
                "bits": torch.from_numpy(np.packbits(keep.numpy())),
                "values": value.detach().cpu().reshape(-1)[keep].clone(),
            }
        else:
            dense[key] = value.detach().cpu()
    return {"format": FORMAT, "order": list(state), "dense": dense, "sparse": sparse}


def expand(obj: dict[str, Any]) -> State:
    """The exact dense state dict back from ``compact``'s output."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise MedxferError("not a medxfer compact model file", "create it with `prune --export`")
    out: State = {}
    for key in obj["order"]:
        if key in obj["dense"]:
            out[key] = obj["dense"][key]
            continue
        e = obj["sparse"][key]
        n = math.prod(e["shape"])
        keep = torch.from_numpy(np.unpackbits(e["bits"].numpy(), count=n).astype(bool))
        w = torch.zeros(n, dtype=e["values"].dtype)
        w[keep] = e["values"]
        out[key] = w.view(e["shape"])
    return out


def save_compact(path: Path, state: State, mask: Mask, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the compact file (atomically); returns what was written."""
    packed = compact(state, mask) | {"meta": meta}
    atomic_save(packed, path)
    return packed


def load_compact(path: Path) -> tuple[State, dict[str, Any]]:
    """(dense state dict, meta): ``meta`` is what ``predict`` needs (arch, classes, size...)."""
    obj = load_checkpoint(path)
    return expand(obj), obj.get("meta", {})


def load_compact_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    state, meta = load_compact(path)
    model = create_model(meta["arch"], weights="none", num_classes=len(meta["classes"])).model
    model.load_state_dict(state)
    return model.eval(), meta


def _sizes(obj: Any) -> dict[str, int]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    return {"raw_bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, compresslevel=6))}


def _without_meta(packed: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in packed.items() if k != "meta"}  # dense sizes exclude it too


def size_report(state: State, mask: Mask, packed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nonzero parameters and bytes (raw and gzip) of the dense and the compact layout."""
    floats = [v for v in state.values() if v.is_floating_point()]  # BN statistics included
    return {
        "values": sum(v.numel() for v in floats),
        "nonzero_values": sum(int(v.count_nonzero()) for v in floats),
        "masked_weights": mask.total,
        "kept_weights": mask.kept,
        "sparsity": mask.sparsity,
        "dense": _sizes(state),
        "compact": _sizes(_without_meta(packed) if packed else compact(state, mask)),
    }


def round_robin_ms(
    calls: Mapping[str, Callable[[], object]], repeats: int = 20
) -> dict[str, float]:
    """Median ms of each call after 2 warm-up rounds (allocations, kernel selection), measured
    round-robin so that load from other processes (or CPU frequency changes) hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(2 + repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i >= 2:
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


@torch.inference_mode()
def interleaved_latency_ms(
    models: Mapping[str, nn.Module], image_size: int, batch: int, repeats: int = 20,
    channels_last: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Median ms per forward of each model (``round_robin_ms``) on one random batch: copies of
    the models and the batch all in one memory layout, NHWC with ``channels_last``, else NCHW
    (``load_trained`` returns NHWC models, the other loaders NCHW: mixed, they would not
    compare)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=layout)
    models = {n: copy.deepcopy(m).eval().to(memory_format=layout) for n, m in models.items()}
    return round_robin_ms({name: partial(m, x) for name, m in models.items()}, repeats)


def paired_latency_ms(
    dense: nn.Module, pruned: nn.Module, image_size: int, batch: int, repeats: int = 20
) -> tuple[float, float]:
    """Median ms per forward of a dense and a pruned model, measured alternately."""
    t = interleaved_latency_ms({"dense": dense, "pruned": pruned}, image_size, batch, repeats)
    return t["dense"], t["pruned"]


def measure_latency(
    models: Mapping[str, nn.Module], image_size: int, batches: tuple[int, ...] = (1, 32),
    repeats: int = 20, threads: int = 0, channels_last: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """CPU latency of several models at each batch size, with the speed-up of each over the
    first model (the baseline); ``threads`` > 0 sets torch's CPU threads first;
    ``channels_last``: every model and batch in the NHWC layout (``interleaved_latency_ms``)."""
    if threads > 0:
        torch.set_num_threads(threads)
    base = next(iter(models))
    out: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "warmup": 2,
                           "repeats": repeats, "statistic": "median ms per forward",
                           "image_size": image_size, "baseline": base, "memory_format":
                           "channels_last" if channels_last else "contiguous"}  # fmt: skip
    for b in batches:
        ms = interleaved_latency_ms(models, image_size, b, repeats, channels_last)
        out[f"batch_{b}"] = {"ms": ms, "speedup": {k: ms[base] / v for k, v in ms.items()}}
    return out


def latency_report(
    pruned: nn.Module, dense: nn.Module, image_size: int, batches: tuple[int, ...] = (1, 32),
    repeats: int = 20,
) -> dict[str, Any]:  # fmt: skip
    """CPU latency of the pruned model against the same architecture with dense weights."""
    rows: dict[str, Any] = {}
    for b in batches:
        d, p = paired_latency_ms(dense, pruned, image_size, b, repeats)
        rows[f"batch_{b}"] = {"dense_ms": d, "pruned_ms": p, "pruned_over_dense": p / d}
    ratios = [r["pruned_over_dense"] for r in rows.values()]
    note = (
        "unstructured sparsity is not faster: the zeros stay in dense tensors and the dense "
        "kernels do the same work; it saves storage (see sizes), not time"
    )
    if min(ratios) < 0.9 or max(ratios) > 1.1:
        note += (
            f" (ratios measured here {min(ratios):.2f}-{max(ratios):.2f}: timing noise such as "
            "other processes, not the zeros; measure on an idle machine)"
        )
    return {"device": "cpu", "threads": torch.get_num_threads(), **rows, "note": note}


def export_onnx(model: nn.Module, image_size: int, path: Path) -> Path:
    """``model`` as an ONNX file with a dynamic batch axis (input ``image``, output ``logits``)."""
    model.eval()
    x = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript dependency
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    return path


def ort_options(threads: int = 0, spin: bool = False) -> Any:
    """onnxruntime session options for timing on CPU: ``threads`` intra-op threads (0: torch's
    current count), one inter-op thread, and no spin-waiting unless ``spin``: by default the
    intra-op threads keep spinning after a run and take the cores from whatever runs next
    (``studies/ort_spin.py`` measures what that does to the next eager PyTorch call)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


def onnxruntime_latency(
    models: Mapping[str, nn.Module], image_size: int, workdir: Path,
    batches: tuple[int, ...] = (1, 32), repeats: int = 20, threads: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """``measure_latency``'s report for the models exported to ONNX and run by onnxruntime's
    CPU provider (the usual way to ship a CPU model; its per-operator overhead is lower than
    eager PyTorch's, which matters at batch 1). Timed round-robin like the PyTorch one, with
    ``threads`` intra-op threads (0: torch's current thread count)."""
    import onnxruntime as ort

    opts = ort_options(threads)
    sessions = {}
    for name, model in models.items():
        path = export_onnx(model, image_size, workdir / f"{name}-{image_size}.onnx")
        sessions[name] = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    base = next(iter(models))
    out: dict[str, Any] = {"device": "cpu", "runtime": f"onnxruntime {ort.__version__}",
                           "threads": opts.intra_op_num_threads, "warmup": 2,
                           "repeats": repeats, "statistic": "median ms per run",
                           "image_size": image_size, "baseline": base}  # fmt: skip
    for b in batches:
        x = {"image": np.random.default_rng(0).standard_normal(
            (b, 3, image_size, image_size), dtype=np.float32)}  # fmt: skip
        ms = round_robin_ms(
            {name: partial(s.run, None, x) for name, s in sessions.items()}, repeats
        )
        out[f"batch_{b}"] = {"ms": ms, "speedup": {k: ms[base] / v for k, v in ms.items()}}
    return out


def onnx_check(model: nn.Module, image_size: int, path: Path) -> dict[str, Any]:
    """Export to ONNX and compare onnxruntime's output with PyTorch's (optional extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"available": False, "note": "pip install 'medxfer[prune]' for the ONNX export"}
    export_onnx(model, image_size, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, image_size, image_size)
    with torch.inference_mode():
        ref = model(x5).numpy()
    got = session.run(None, {"image": x5.numpy()})[0]
    raw = path.read_bytes()
    return {
        "available": True,
        "path": str(path),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "raw_bytes": len(raw),
        "gzip_bytes": len(gzip.compress(raw, compresslevel=6)),
    }


def _trained(run: Path) -> tuple[State, dict[str, Any], Mask]:
    if not (run / "best.pt").exists():
        raise MedxferError(f"{run} was never trained (no best.pt)", "train or prune it first")
    if not (run / "mask.pt").exists():
        raise MedxferError(f"{run} has no mask.pt", "export a level folder of `medxfer prune`")
    best = load_checkpoint(run / "best.pt")
    mask = Mask.load(run / "mask.pt")
    return fold_reparam(best["model"]), best["meta"], mask


def export_run(
    run: Path, *, latency: bool = True, onnx: bool = True, repeats: int = 20
) -> dict[str, Any]:
    """Export a pruned run's best.pt into ``run/export/``; returns (and writes) the report."""
    state, meta, mask = _trained(run)
    out = run / "export"
    out.mkdir(exist_ok=True)
    packed = save_compact(out / "model.sparse.pt", state, mask, meta)
    report: dict[str, Any] = {"run_dir": str(run), "file": str(out / "model.sparse.pt")}
    report["sizes"] = size_report(state, mask, packed)
    model, _ = load_compact_model(out / "model.sparse.pt")
    size = int(meta["image_size"])
    if latency:
        dense = create_model(meta["arch"], weights="none", num_classes=len(meta["classes"]))
        report["latency"] = latency_report(model, dense.model, size, repeats=repeats)
    if onnx:
        report["onnx"] = onnx_check(model, size, out / "model.onnx")
    atomic_write_json(report, out / "export.json")
    return report
