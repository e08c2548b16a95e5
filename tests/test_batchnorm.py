"""BatchNorm statistics re-estimated after training (``train.bn_recalibrate``) and at a new site
(``medxfer adapt``): the estimate itself, the rule that keeps it, resume, and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.evaluate.adapt import adapt_batchnorm, batches, cross_fitted_check, folder_labels
from medxfer.train import batchnorm
from medxfer.train.batchnorm import batchnorm_layers, recompute_batchnorm

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
    "train.batch_size=16", "eval.n_bootstrap=20", "train.eval_batch_size=64",
    "train.steps_per_epoch=6",
]  # fmt: skip


def test_statistics_are_the_average_over_the_batches() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(nn.Dropout(0.5), bn).train()  # dropout must stay off meanwhile
    xs = [torch.randn(8, 3, 4, 4) * (i + 1) + i for i in range(5)]
    assert recompute_batchnorm(model, xs) == 40
    assert bn.running_mean is not None and bn.running_var is not None
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.1 and model.training and model[0].training  # flags restored
    # nothing seen: the statistics stay as they were
    before = bn.running_mean.clone()
    assert recompute_batchnorm(model, []) == 0
    torch.testing.assert_close(bn.running_mean, before)


def test_weights_and_pruned_zeros_are_untouched() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        conv.weight[:, :, 0, 0] = 0.0  # as a pruning mask folded in
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    recompute_batchnorm(model, [torch.randn(6, 3, 8, 8) for _ in range(3)])
    for k, v in weights.items():
        if k != "1.num_batches_tracked":
            torch.testing.assert_close(model.state_dict()[k], v)
    assert not model.training and len(batchnorm_layers(model)) == 1


@pytest.mark.parametrize("n", [2, 3, 64, 65, 129, 200])
def test_batches_cover_every_image_once_and_never_hold_one(n: int) -> None:
    parts = batches(n, 64, seed=0)
    sizes = [len(b) for b in parts]
    assert min(sizes) >= 2 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 64
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


class _Offset(nn.Module):
    """Class 0 is brighter than class 1; BatchNorm centres on the training mean. A site whose
    images are all brighter fools the training statistics; its own statistics do not."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, affine=False)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).mean(dim=(2, 3)))


def _images(rng: np.random.Generator, n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    base = np.where(labels == 0, 140, 100) + offset
    pixels = base[:, None, None] + rng.normal(0, 8, (n, 8, 8))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def test_adaptation_removes_a_site_offset_and_the_check_measures_it() -> None:
    rng = np.random.default_rng(0)
    meta = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "classes": ["bright", "dark"]}
    source, _ = _images(rng, 200, 0)
    model = adapt_batchnorm(_Offset(), meta, source)  # the "training" statistics
    site, labels = _images(rng, 200, 60)
    check = cross_fitted_check(model, meta, site, labels)
    assert check["unadapted"]["accuracy"] == pytest.approx(float((labels == 0).mean()))
    assert check["adapted"]["accuracy"] > 0.97
    assert check["accuracy_difference_ci95"][0] > 0.3
    assert check["stratified"] and check["n_images"] == 200
    # class-sorted input order gives the same model: the images are shuffled into batches
    order = np.argsort(labels, kind="stable")
    a = adapt_batchnorm(model, meta, site[order]).get_submodule("bn")
    b = adapt_batchnorm(model, meta, site).get_submodule("bn")
    torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-6, rtol=1e-6)
    with pytest.raises(MedxferError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), meta, site)
    with pytest.raises(MedxferError, match="at least 2 images"):
        adapt_batchnorm(model, meta, site[:1])


def test_folder_labels(tmp_path: Path) -> None:
    files = [tmp_path / "a" / "1.png", tmp_path / "b" / "x" / "2.png"]
    assert folder_labels(tmp_path, files, ["a", "b"]) == [0, 1]
    assert folder_labels(tmp_path, [*files, tmp_path / "3.png"], ["a", "b"]) is None
    assert folder_labels(tmp_path, files, ["a", "c"]) is None


def _bn_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if "running" in k}


def test_training_recalibrates_keeps_by_validation_and_resumes(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medxfer.train import loop

    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]) == 0
    m = json.loads((run / "metrics.json").read_text())
    r = m["bn_recalibration"]
    n_train = sum(m["data"]["counts"]["train"].values())
    assert r["images"] == n_train // 64 * 64 > 0  # full batches: never one of a single image
    assert r["kept"] == (r["val_balanced_accuracy_after"] >= r["val_balanced_accuracy_before"])
    assert torch.load(run / "best.pt", weights_only=True)["bn_recalibration"] == r
    if r["kept"]:  # the evaluation is that of the recalibrated model
        assert m["val"]["balanced_accuracy"] == pytest.approx(r["val_balanced_accuracy_after"])

    # a run killed after recalibrating and resumed does not recalibrate again
    def refuse(*args: object) -> int:
        raise AssertionError("recalibrated twice")

    monkeypatch.setattr(batchnorm, "recompute_batchnorm", refuse)
    (run / "metrics.json").unlink()
    assert main(["train", "--data", str(synth_root), "--run-dir", str(run), "--resume", *FAST]) == 0
    assert json.loads((run / "metrics.json").read_text())["bn_recalibration"] == r
    monkeypatch.undo()

    # validation drops: the training statistics are restored, exactly
    real_recompute, real_validate = batchnorm.recompute_batchnorm, loop._validate
    trained: dict[str, torch.Tensor] = {}

    def recompute(model: nn.Module, inputs: object) -> int:
        trained.update({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
        return real_recompute(model, inputs)  # type: ignore[arg-type]

    def validate(*args: object) -> dict[str, float]:
        out = real_validate(*args)  # type: ignore[arg-type]
        return out | ({"val_balanced_accuracy": -1.0} if trained else {})

    monkeypatch.setattr(batchnorm, "recompute_batchnorm", recompute)
    monkeypatch.setattr(loop, "_validate", validate)
    worse = tmp_path / "worse"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(worse), *FAST]) == 0
    mw = json.loads((worse / "metrics.json").read_text())
    assert not mw["bn_recalibration"]["kept"]
    # "before" is the best epoch's score from the history: equal to evaluating best.pt afresh
    before = mw["bn_recalibration"]["val_balanced_accuracy_before"]
    assert mw["val"]["balanced_accuracy"] == pytest.approx(before, abs=1e-12)
    restored = _bn_state(worse / "best.pt")
    assert trained and restored.keys() == trained.keys()
    assert all(torch.equal(restored[k], trained[k]) for k in trained)


def test_adapt_command_end_to_end(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medxfer.evaluate.predict import load_trained

    run = tmp_path / "run"  # recalibration off here (and its record absent): adapt needs none
    args = ["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]
    assert main([*args, "train.bn_recalibrate=false"]) == 0
    assert "bn_recalibration" not in json.loads((run / "metrics.json").read_text())
    # a "new site": the test images, darker and with less contrast, one subfolder per class
    site, flat = tmp_path / "site", tmp_path / "flat"
    flat.mkdir()
    for f in sorted((synth_root / "test").rglob("*.png")):
        dst = site / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(f)).astype(np.float32) * 0.6 + 20
        Image.fromarray(pixels.astype(np.uint8)).save(dst)
        shutil.copy(dst, flat / f"{f.parent.name}-{f.name}")
    (site / "notes.txt").write_text("not an image: ignored")
    capsys.readouterr()
    assert main(["adapt", str(run), str(site)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == run / "adapted-site"
    rec = json.loads((out / "adapt.json").read_text())
    check = rec["labelled_check"]
    assert rec["n_images"] == check["n_images"] == len(list(site.rglob("*.png")))
    assert rec["batchnorm_layers"] == 20 and rec["few_images"] == (rec["n_images"] < 100)
    assert check["folds"] == 2
    assert set(check["adapted"]["recall"]) == set(check["unadapted"]["recall"])
    lo, hi = check["accuracy_difference_ci95"]
    assert lo <= check["accuracy_difference"] <= hi
    model, meta = load_trained(out)  # what predict and shift load
    assert meta["adapted"]["n_images"] == rec["n_images"] and meta["arch"] == "resnet18"
    original, _ = load_trained(run)
    changed = [k for k, v in model.state_dict().items()
               if not torch.equal(v, original.state_dict()[k])]  # fmt: skip
    assert changed and all("running" in k or "num_batches" in k for k in changed)
    assert main(["predict", str(out), str(site), "--out", str(tmp_path / "p.csv")]) == 0
    # no class subfolders: adapted, but the effect on accuracy is not claimed
    assert main(["adapt", str(run), str(flat), "--out", str(tmp_path / "a2")]) == 0
    a2 = json.loads((tmp_path / "a2" / "adapt.json").read_text())
    assert a2["labelled_check"] is None and a2["labelled_images"] == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no labels" in err and "not measured" in err
    # labelled, but too few for two folds of two: said as such, not as "no labels"
    cls = next(p for p in site.iterdir() if p.is_dir())
    few = tmp_path / "few"
    (few / cls.name).mkdir(parents=True)
    for f in sorted(cls.glob("*.png"))[:3]:
        shutil.copy(f, few / cls.name / f.name)
    assert main(["adapt", str(run), str(few), "--out", str(tmp_path / "a3")]) == 0
    a3 = json.loads((tmp_path / "a3" / "adapt.json").read_text())
    assert a3["labelled_check"] is None and a3["labelled_images"] == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "only 3 labelled images" in err and "not measured" in err
    assert main(["adapt", str(run), str(site), "--batch-size", "1"]) == 2
    assert "at least 2" in " ".join(capsys.readouterr().err.split())
