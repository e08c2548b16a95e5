"""Structured (channel) pruning: channels really go, the head keeps its classes, the optimizer
built before pruning still trains the pruned tensors, the saved model reloads with the same
predictions, and bad input ends in one clear message."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from stopping import StopAfterOneEpoch
from torch import nn

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.evaluate.finish import evaluate_trained
from medxfer.evaluate.predict import load_trained
from medxfer.models import create_model
from medxfer.models.registry import entry
from medxfer.prune.export import measure_latency, onnxruntime_latency
from medxfer.prune.structured import (
    _finetune_cfg,
    count,
    load_structured,
    prune_channels,
    pruned_model,
    ratio_for_speedup,
    run_structured,
    soft_ratios,
    step_ratios,
    zero_channels,
)
from medxfer.train.checkpoint import load_checkpoint

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=1",
    "train.batch_size=8", "train.steps_per_epoch=1", "train.eval_batch_size=128",
    "eval.n_bootstrap=20", "train.optimizer=sgd",
]  # fmt: skip


def _convs(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (m.in_channels, m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = {
        "conv1": nn.Conv2d(3, 32, 3), "bn1": nn.BatchNorm2d(32), "relu": nn.ReLU(),
        "conv2": nn.Conv2d(32, 64, 3, bias=False), "bn2": nn.BatchNorm2d(64),
        "pool": nn.AdaptiveAvgPool2d(1), "flat": nn.Flatten(), "fc": nn.Linear(64, 3),
    }  # fmt: skip
    return nn.Sequential(OrderedDict(layers))


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_channels_are_removed_and_classes_kept(arch: str) -> None:
    torch.manual_seed(0)
    head = entry(arch).head
    model = create_model(arch, weights="none", num_classes=4).model
    before, shapes = count(model, 32), _convs(model)
    features = model.get_submodule(head).in_features
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before pruning, as ``fit`` does
    prune_channels(model, head, 0.5, 32)
    after, pruned = count(model, 32), _convs(model)
    assert after["params"] < 0.5 * before["params"] and after["macs"] < 0.5 * before["macs"]
    assert sum(p.numel() for p in model.parameters()) == after["params"]
    assert all(pruned[n][1] <= shapes[n][1] for n in shapes)  # no conv grew
    smaller = [n for n in shapes if pruned[n][1] < shapes[n][1]]
    assert len(smaller) > len(shapes) // 2  # most convs lost output channels
    fc = model.get_submodule(head)
    assert isinstance(fc, nn.Linear) and fc.out_features == 4
    assert fc.in_features < features
    x = torch.randn(2, 3, 32, 32)
    assert model.train()(x).shape == (2, 4)
    first = next(iter(model.parameters())).detach().clone()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    opt.step()  # the optimizer's parameters are the pruned tensors
    assert not torch.equal(first, next(iter(model.parameters())))


def test_pruning_removes_the_smallest_l1_channels_with_their_bn() -> None:
    model = _tiny().eval()
    weak = torch.arange(0, 32, 2)  # make these channels the smallest in every coupled layer
    with torch.no_grad():
        model.conv1.weight[weak] *= 0.01
        model.bn1.weight[weak] *= 0.01
        model.conv2.weight[:, weak] *= 0.01
    strong = torch.arange(1, 32, 2)
    w1, mean1 = model.conv1.weight.detach().clone(), model.bn1.running_mean.clone()
    rows = model.conv2.weight.detach().clone()[:, strong]  # conv2's inputs follow conv1's outputs
    prune_channels(model, "fc", 0.5, 32)
    assert model.conv1.out_channels == 16 and model.conv2.in_channels == 16
    assert torch.equal(model.conv1.weight, w1[strong])
    assert torch.equal(model.bn1.running_mean, mean1[strong])  # tracing ran in eval mode
    assert all(any(torch.equal(r, q) for q in rows) for r in model.conv2.weight)
    assert model.fc.out_features == 3


def test_ratio_for_speedup_is_the_smallest_that_reaches_it() -> None:
    model, target = _tiny(), 2.0
    ratio = ratio_for_speedup(model, "fc", 32, target)
    dense = count(model, 32)["macs"]

    def speedup(r: float) -> float:
        return dense / count(prune_channels(_tiny(), "fc", r, 32), 32)["macs"]

    assert speedup(ratio) >= target > speedup(ratio - 1 / 64)
    assert count(model, 32)["macs"] == dense  # searched on copies
    with pytest.raises(MedxferError, match="must be above 1"):
        ratio_for_speedup(model, "fc", 32, 1.0)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(MedxferError, match=r"not in \(0, 1\)"):
            prune_channels(_tiny(), "fc", bad, 32)


def test_measure_latency_reports_every_model() -> None:
    lat = measure_latency({"dense": _tiny(), "small": prune_channels(_tiny(), "fc", 0.5, 32)}, 32,
                          batches=(1, 4), repeats=2, threads=1)  # fmt: skip
    assert lat["threads"] == 1 and lat["baseline"] == "dense"
    assert lat["batch_4"]["speedup"]["dense"] == 1.0 and lat["batch_1"]["ms"]["small"] > 0
    dense = _tiny()
    nhwc = measure_latency({"dense": dense}, 32, batches=(2,), repeats=1, channels_last=True)
    assert (lat["memory_format"], nhwc["memory_format"]) == ("contiguous", "channels_last")
    assert nhwc["batch_2"]["ms"]["dense"] > 0
    assert dense.conv1.weight.is_contiguous()  # timed on a copy: the caller's model is as it was
    nhwc_model = dense.to(memory_format=torch.channels_last)  # as load_trained returns models
    nchw = measure_latency({"dense": nhwc_model}, 32, batches=(2,), repeats=1)
    assert nchw["memory_format"] == "contiguous" and nchw["batch_2"]["ms"]["dense"] > 0
    assert nhwc_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_onnxruntime_latency_times_the_exported_pruned_graph(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    models = {"dense": _tiny(), "small": prune_channels(_tiny(), "fc", 0.5, 32)}
    lat = onnxruntime_latency(models, 32, tmp_path, batches=(1, 3), repeats=2, threads=1)
    assert lat["runtime"].startswith("onnxruntime") and lat["threads"] == 1
    assert lat["batch_3"]["speedup"]["dense"] == 1.0 and lat["batch_1"]["ms"]["small"] > 0

    def weights(name: str) -> int:  # the graph onnxruntime ran has the channels removed
        graph = onnx.load(str(tmp_path / f"{name}-32.onnx")).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer)

    assert weights("small") < 0.7 * weights("dense")


@pytest.fixture(scope="module")
def dense_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("structured") / "dense"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDXFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]) == 0
    return run


def test_structured_end_to_end_and_reload(dense_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    args = ["prune-structured", str(dense_run), "train.lr=0.01", "--ratio", "0.5"]
    args += ["--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "structured.json").read_text())
    assert report["ratio"] == 0.5 and report["macs_speedup"] > 2
    assert report["pruned"]["params"] < 0.5 * report["dense"]["params"]
    assert report["pruned"]["test_accuracy"] is not None and report["finetune"]["epochs"] == 1
    assert set(report["latency"]["batch_32"]["ms"]) == {"dense", "structured"}
    if importlib.util.find_spec("onnxruntime") is not None:  # installed with the `prune` extra
        assert set(report["latency"]["onnxruntime"]["batch_1"]["ms"]) == {"dense", "structured"}
        assert (out / "onnx" / "structured-32.onnx").is_file()
    model, meta = load_structured(out)
    best = load_checkpoint(out / "best.pt")
    assert meta["classes"] == best["meta"]["classes"]
    dense = load_checkpoint(dense_run / "best.pt")["model"]
    rebuilt = pruned_model("resnet18", dense, len(meta["classes"]), 0.5, 32)
    rebuilt.load_state_dict(best["model"])  # the checkpoint fits the re-pruned network
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
        assert model(x).shape == (5, len(meta["classes"]))
    loaded, _ = load_trained(out)  # what `medxfer predict` and Grad-CAM load, in NHWC
    nhwc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded(nhwc), model.to(memory_format=torch.channels_last)(nhwc))
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "scan.png")
    csv_out = tmp_path / "p.csv"
    assert main(["predict", str(out), str(tmp_path / "scan.png"), "--out", str(csv_out)]) == 0
    header = csv_out.read_text().splitlines()[0]
    assert header.startswith("path,predicted") and f"p_{meta['classes'][0]}" in header
    assert main([*args, "--no-latency"]) == 0  # complete: only re-reports
    assert json.loads((out / "structured.json").read_text())["pruned"] == report["pruned"]


def test_bad_input_is_one_clear_message(
    dense_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prune-structured", str(dense_run), "--ratio", "1.5"]) == 2
    assert "not in (0, 1)" in capsys.readouterr().err
    (tmp_path / "untrained").mkdir()
    assert main(["prune-structured", str(tmp_path / "untrained"), "--ratio", "0.3"]) == 2
    assert "never trained" in capsys.readouterr().err
    assert main(["prune-structured", str(dense_run), "--speedup", "0.9"]) == 2
    assert "must be above 1" in capsys.readouterr().err
    assert [p.name for p in dense_run.parent.iterdir()] == ["dense"]  # no folder left behind


def test_a_newer_config_key_at_its_default_keeps_a_structured_folder(tmp_path: Path) -> None:
    """A folder bound before a later medxfer added config keys (here ``prune.image_size``,
    ``prune.epochs``, ``tune.image_size``, all at their defaults) is still "these settings";
    a changed training value still refuses it."""
    from medxfer.prune.structured import _bind

    new = load_config(None, ["train.epochs=8"]).to_dict()
    old = json.loads(json.dumps(new))
    for section, key in (("prune", "image_size"), ("prune", "epochs"), ("tune", "image_size")):
        del old[section][key]
    _bind(tmp_path, {"source": "x", "ratio": 0.3, "config": old})
    _bind(tmp_path, {"source": "x", "ratio": 0.3, "config": new})
    changed = load_config(None, ["train.epochs=8", "train.lr=0.002"]).to_dict()
    with pytest.raises(MedxferError, match="other settings"):
        _bind(tmp_path, {"source": "x", "ratio": 0.3, "config": changed})
    with pytest.raises(MedxferError, match="other settings"):
        _bind(tmp_path, {"source": "x", "ratio": 0.4, "config": new})


def test_step_ratios_reach_the_cut_in_equal_shares() -> None:
    assert step_ratios(0.36, 1) == [0.36]
    ratios = step_ratios(0.36, 4)
    left = 1.0
    for i, r in enumerate(ratios, 1):
        left *= 1 - r
        assert left == pytest.approx(1 - 0.36 * i / 4)  # a quarter of the cut per step


def test_iterative_structured_pruning_steps_resume_and_rebuild(
    dense_run: Path, tmp_path: Path
) -> None:
    """Two steps share the fine-tuning epochs; the first is a run of its own that never sees
    the test split; the final network is the replay of both cuts, and a rerun only re-reports."""
    out = tmp_path / "iterative"
    base = ["prune-structured", str(dense_run), "train.lr=0.01", "--ratio", "0.5", "--epochs", "3"]
    args = [*base, "--steps", "2", "--out", str(out), "--no-latency"]
    assert main(args) == 0
    report = json.loads((out / "structured.json").read_text())
    steps = report["finetune"]["steps"]
    assert [s["channels_gone"] for s in steps] == [0.25, 0.5]
    assert [s["epochs"] for s in steps] == [1, 2] and "2 steps" in report["method"]
    assert json.loads((out / "step_1" / "metrics.json").read_text()).get("test") is None
    dense = load_checkpoint(dense_run / "best.pt")["model"]
    step1 = load_checkpoint(out / "step_1" / "best.pt")["model"]
    model, meta = load_structured(out)
    rebuilt = pruned_model("resnet18", dense, len(meta["classes"]), 0.5, 32, steps=2,
                           states=[step1])  # fmt: skip
    rebuilt.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    once = pruned_model("resnet18", dense, len(meta["classes"]), 0.5, 32)
    assert report["pruned"]["params"] == count(once, 32)["params"]  # same cut, other channels
    assert report["macs_speedup"] > 2
    assert main(args) == 0  # complete: only re-reports
    assert json.loads((out / "structured.json").read_text())["pruned"] == report["pruned"]
    with pytest.raises(MedxferError, match="other settings"):  # the folder is bound to 2 steps
        one_step = ["train.lr=0.01", "structured.ratio=0.5", "structured.epochs=3"]
        run_structured(dense_run, out, evaluate=evaluate_trained, overrides=one_step, latency=False)
    assert main([*base, "--steps", "5", "--out", str(tmp_path / "x")]) == 2  # 3 epochs < 5 steps


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_soft_zeroing_computes_what_the_cut_computes(arch: str) -> None:
    """Zeroed channels output nothing: the zeroed network (shapes kept) equals the network the
    cut of the same ratio leaves, so soft pruning trains the very sub-network the cut keeps."""
    torch.manual_seed(0)
    head = entry(arch).head
    model = create_model(arch, weights="none", num_classes=3).model
    for m in model.modules():  # BatchNorm as a trained model has it: every channel matters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    cut = prune_channels(copy.deepcopy(model), head, 0.5, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense_out = model(x)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        zeroed = zero_channels(model, head, 0.5, 32)
        assert {n: p.shape for n, p in model.named_parameters()} == shapes
        assert zeroed > 0 and not model.training
        assert torch.allclose(model(x), cut(x), atol=1e-4)
        assert not torch.allclose(model(x), dense_out, atol=1e-2)
    assert soft_ratios(0.4, 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_soft_pruning_phase_resumes_and_feeds_the_cut(
    dense_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--soft 2``: a soft phase of its own (never tested) whose last weights the cut is made
    on; a run killed inside it resumes to the same weights; the final network rebuilds."""
    out = tmp_path / "soft"
    args = ["prune-structured", str(dense_run), "train.lr=0.01", "--ratio", "0.5", "--epochs",
            "1", "--soft", "2", "structured.warmup=0.5", "--out", str(out),
            "--no-latency"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "structured.json").read_text())
    assert report["soft"]["epochs"] == 2 and len(report["soft"]["val_balanced_accuracy"]) == 2
    assert "soft filter pruning" in report["method"]
    assert report["finetune"]["warmup_epochs"] == 0.5
    assert report["command"] == ["medxfer", *args]
    assert json.loads((out / "soft" / "metrics.json").read_text()).get("test") is None
    soft_last = load_checkpoint(out / "soft" / "last.pt")["model"]
    dense = load_checkpoint(dense_run / "best.pt")["model"]
    assert any(not torch.equal(soft_last[k], dense[k]) for k in dense)  # it trained
    model, meta = load_structured(out)
    rebuilt = pruned_model("resnet18", soft_last, len(meta["classes"]), 0.5, 32)
    rebuilt.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    # killed after the first soft epoch: the resumed phase ends where the uninterrupted one did
    import medxfer.prune.structured as structured

    real_fit = structured.fit

    def killed_after_one_epoch(cfg: Any, run_dir: Path, *, callbacks: Any, **kw: Any) -> Any:
        kill = StopAfterOneEpoch(KeyboardInterrupt)
        return real_fit(cfg, run_dir, callbacks=(*callbacks, kill), **kw)

    again = [*args[:-3], "--out", str(tmp_path / "again"), "--no-latency"]
    monkeypatch.setattr(structured, "fit", killed_after_one_epoch)
    assert main(again) == 130  # interrupted
    monkeypatch.setattr(structured, "fit", real_fit)
    assert load_checkpoint(tmp_path / "again" / "soft" / "last.pt")["epoch"] == 0
    assert main(again) == 0
    resumed = load_checkpoint(tmp_path / "again" / "soft" / "last.pt")["model"]
    assert all(torch.equal(resumed[k], soft_last[k]) for k in soft_last)
    assert main([*again[:-3], "--soft", "-1", "--out", str(tmp_path / "x")]) == 2


def test_structured_warmup_reaches_each_finetune() -> None:
    """The fine-tune has no warm-up unless ``structured.warmup`` asks for one (the dense
    run's own warm-up is not inherited, as before the key existed)."""
    dense = load_config(None, ["train.warmup_epochs=2", "train.lr=0.01"])
    assert _finetune_cfg(dense, 3, 0.5).train.warmup_epochs == 0.0
    warm = load_config(None, ["train.warmup_epochs=2", "structured.warmup=0.5"])
    ft = _finetune_cfg(warm, 3, 1.0)
    assert ft.train.warmup_epochs == 0.5 and ft.train.epochs == 3
    with pytest.raises(MedxferError, match=r"structured\.warmup must be >= 0"):
        load_config(None, ["structured.warmup=-1"])
