"""WGAN-GP synthesis: penalty, networks, train/resume, sampling, train-split-only, bad inputs."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from medxfer.cli import main
from medxfer.config import ExperimentConfig, load_config
from medxfer.data.prepare import prepare
from medxfer.errors import MedxferError
from medxfer.gan.compare import strategy_config, verdict
from medxfer.gan.distances import fid, kid, two_sample_accuracy
from medxfer.gan.losses import gradient_penalty
from medxfer.gan.networks import Critic, Generator, check_image_size
from medxfer.gan.report import bootstrap_class_metrics
from medxfer.gan.synthesize import sample_gan
from medxfer.gan.trainer import check_gan_config, train_gan

TINY = ["gan.width=4", "gan.z_dim=8", "gan.batch_size=8", "gan.n_critic=2", "gan.steps=4",
        "gan.checkpoint_every=1", "gan.sample_every=2", "gan.min_images=10"]  # fmt: skip


def _cfg(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"data.root={root}", "data.image_size=32", *TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Networks this small gain nothing from threads; two busy-waiting OpenMP threads on a
    shared 2-core machine made each step ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_gan(_cfg(synth_root), tmp_path_factory.mktemp("gan") / "run")


def test_gradient_penalty_matches_hand_computation() -> None:
    w = torch.tensor([[[0.5, -1.0], [2.0, 0.25]]])  # linear critic: gradient w everywhere

    def linear(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    expected = 10.0 * (w.norm() - 1.0) ** 2
    assert torch.allclose(gradient_penalty(linear, real, fake, weight=10.0), expected)

    def quadratic(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return (x**2).flatten(1).sum(1)  # gradient 2 x_hat

    real, fake = torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)
    eps = torch.tensor([0.25, 1.0])  # x_hat = eps * 1: grad norms 2 * eps * sqrt(2)
    norms = 2 * eps * 2**0.5
    hand = 10.0 * ((norms - 1) ** 2).mean()
    assert torch.allclose(gradient_penalty(quadratic, real, fake, eps=eps), hand)


def test_gradient_penalty_non_negative_and_differentiable() -> None:
    critic = Critic(image_size=64, channels=1, n_classes=3, width=4)
    real, fake = torch.rand(4, 1, 64, 64) * 2 - 1, torch.rand(4, 1, 64, 64) * 2 - 1
    gp = gradient_penalty(critic, real, fake, torch.tensor([0, 1, 2, 0]))
    assert gp.item() >= 0
    gp.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


@pytest.mark.parametrize("size,channels,classes", [(64, 1, 3), (128, 3, 1)])
def test_generator_shape_and_range(size: int, channels: int, classes: int) -> None:
    g = Generator(image_size=size, channels=channels, n_classes=classes, z_dim=8, width=4)
    y = torch.arange(5) % classes if classes > 1 else None
    x = g(torch.randn(5, 8) * 10, y)  # large z: tanh must still bound the output
    assert x.shape == (5, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    d = Critic(image_size=size, channels=channels, n_classes=classes, width=4)
    assert d(x, y).shape == (5,)


def test_unsupported_image_size(synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MedxferError, match="not supported"):
        check_image_size(96)
    with pytest.raises(MedxferError, match="batch_size at least 2"):
        check_gan_config(load_config(None, ["gan.batch_size=1"]).gan)
    assert main(["gan", "train", "--data", str(synth_root), "gan.image_size=96"]) == 2
    assert "gan.image_size=96 is not supported" in capsys.readouterr().err


def test_too_few_images_says_oversample(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(MedxferError, match="too few training images") as err:
        train_gan(_cfg(synth_root, "gan.min_images=100"), tmp_path / "g")
    assert "weighted_sampling" in (err.value.fix or "")
    args = ["gan", "train", "--data", str(synth_root), "--out", str(tmp_path / "g2"),
            "gan.min_images=100", *TINY[:-1]]  # fmt: skip
    assert main(args) == 2
    out = capsys.readouterr().err
    assert "cross" in out and "oversample" in out and "Traceback" not in out


def test_sampling_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gan", "sample", str(tmp_path / "nope" / "generator.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_training_writes_checkpoint_grids_and_history(trained: Path) -> None:
    folder = trained.parent
    for name in ("state.pt", "history.json", "gan.json", "samples/step_000002.png"):
        assert (folder / name).exists(), name
    payload = torch.load(trained, weights_only=True)
    assert payload["modelled"] == payload["classes"]  # conditional: every class
    assert payload["runs"]["*"]["steps"] == 4


def test_sampling_deterministic_and_balanced(trained: Path, tmp_path: Path) -> None:
    a = sample_gan(trained, tmp_path / "a", balance=1.0, seed=3, gate=False)
    b = sample_gan(trained, tmp_path / "b", balance=1.0, seed=3, gate=False)
    c = sample_gan(trained, tmp_path / "c", n_per_class={"cross": 5}, seed=4, gate=False)
    rows_a = list(csv.DictReader(a.open()))
    counts = torch.load(trained, weights_only=True)["train_counts"]
    per_class = {k: sum(r["label"] == k for r in rows_a) for k in counts}
    top = max(counts.values())
    assert all(per_class[k] == top - n for k, n in counts.items())  # balanced to the majority
    assert all(r["synthetic"] == "true" and r["checkpoint"] for r in rows_a)
    for r in rows_a:
        assert (a.parent / r["path"]).read_bytes() == (b.parent / r["path"]).read_bytes()
    first_c = next(iter(csv.DictReader(c.open())))
    same_name = a.parent / first_c["path"].replace("-s4-", "-s3-")
    assert (c.parent / first_c["path"]).read_bytes() != same_name.read_bytes()


def test_synthetic_images_only_in_training_split(
    synth_root: Path, trained: Path, tmp_path: Path
) -> None:
    from medxfer.train.compute import resolve
    from medxfer.train.setup import build

    manifest = sample_gan(trained, tmp_path / "s", balance=1.0, seed=0, gate=False)
    plain = prepare(_cfg(synth_root).data)
    cfg = _cfg(synth_root, f"data.synthetic={manifest}", "model.arch=resnet18",
               "model.weights=none", "train.batch_size=8")  # fmt: skip
    s = build(cfg, resolve(cfg.train))
    data = s.data
    generated = {str(manifest.parent / r["path"]) for r in csv.DictReader(manifest.open())}
    synthetic = {i for i, smp in enumerate(data.samples) if smp.path in generated}
    n_manifest = len(generated)
    assert len(synthetic) == n_manifest
    assert synthetic <= set(data.split_index["train"].tolist())
    for split, loader in (("val", s.val_loader), ("test", s.test_loader)):
        assert not synthetic & set(loader.indices.tolist())
        assert torch.equal(data.images[loader.indices], plain.images[plain.split_index[split]])
    info = data.info["synthetic_images"]
    assert sum(info["per_class"].values()) == n_manifest
    assert info["real_train_counts"] == plain.counts("train")
    # a ratio caps what is used: up to 0.5 x the largest class
    half = prepare(_cfg(synth_root, f"data.synthetic={manifest}", "data.synthetic_ratio=0.5").data)
    top = max(plain.counts("train").values())
    for k, n in plain.counts("train").items():
        assert half.counts("train")[k] == max(n, round(0.5 * top))


def test_manifest_rows_for_test_split_are_refused(synth_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    png = next((synth_root / "train" / "cross").glob("*.png"))
    bad.write_text(f"path,label,split,synthetic\n{png},cross,test,true\n")
    with pytest.raises(MedxferError, match="only be used for training"):
        prepare(_cfg(synth_root, f"data.synthetic={bad}").data)


def test_interrupted_training_resumes_to_the_same_result(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root)
    whole = train_gan(cfg, tmp_path / "whole")

    def kill(step: int, row: dict[str, float]) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, tmp_path / "parts", on_step=kill)
    assert not (tmp_path / "parts" / "generator.pt").exists()
    resumed = train_gan(cfg, tmp_path / "parts")
    ga = torch.load(whole, weights_only=True)["generators"]["*"]
    gb = torch.load(resumed, weights_only=True)["generators"]["*"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    da = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["d"]
    db = torch.load(tmp_path / "parts" / "state.pt", weights_only=True)["d"]
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_per_class_mode_trains_minority_classes_only(synth_root: Path, tmp_path: Path) -> None:
    ckpt = train_gan(_cfg(synth_root, "gan.conditional=false", "gan.steps=1"), tmp_path / "pc")
    payload = torch.load(ckpt, weights_only=True)
    counts = payload["train_counts"]
    assert set(payload["modelled"]) == {
        c for c, n in counts.items() if n < 0.8 * max(counts.values())
    }
    assert set(payload["generators"]) == set(payload["modelled"])


def test_oversampling_draws_classes_equally(synth_root: Path) -> None:
    from medxfer.train.compute import resolve
    from medxfer.train.setup import build

    cfg = _cfg(synth_root, "train.weighted_sampling=true", "model.arch=resnet18",
               "model.weights=none", "train.batch_size=8")  # fmt: skip
    s = build(cfg, resolve(cfg.train))
    drawn = torch.cat([s.train_loader._order(torch.Generator().manual_seed(e)) for e in range(20)])
    share = torch.bincount(s.data.labels[drawn], minlength=4).float() / len(drawn)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03)


def test_class_fraction_cuts_training_split_only(synth_root: Path) -> None:
    full = prepare(_cfg(synth_root).data)
    cut = prepare(_cfg(synth_root, "data.class_fraction=disc:0.25").data)
    assert cut.counts("train")["disc"] == round(full.counts("train")["disc"] * 0.25)
    assert cut.counts("train")["ring"] == full.counts("train")["ring"]
    assert cut.counts("val") == full.counts("val") and cut.counts("test") == full.counts("test")
    with pytest.raises(MedxferError, match="class_fraction"):
        load_config(None, ["data.class_fraction=disc:2"])


def test_fingerprint_counts_synthetic_not_gan(tmp_path: Path) -> None:
    base = ExperimentConfig()
    other_gan = load_config(None, ["gan.steps=7", "gan.image_size=128"])
    assert base.fingerprint() == other_gan.fingerprint()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split,synthetic\n")
    with_synth = load_config(None, [f"data.synthetic={manifest}"]).fingerprint()
    assert with_synth != base.fingerprint()
    manifest.write_text("path,label,split,synthetic\nx.png,a,train,true\n")  # re-sampled
    assert load_config(None, [f"data.synthetic={manifest}"]).fingerprint() != with_synth


def test_quality_measures_behave() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
    far = rng.normal(size=(400, 6)) + 3.0
    assert fid(a, b) < 0.5 < 50 < fid(a, far)  # shift 3 in 6 dims: about 54
    assert abs(fid(a, far) - 54) < 5
    assert abs(kid(a, b)) < 0.05 < kid(a, far)
    assert two_sample_accuracy(a, b) < 0.62 and two_sample_accuracy(a, far) > 0.95


def test_bootstrap_class_metrics() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2] * 5)
    perfect = bootstrap_class_metrics(labels, labels, 3, [1], n_bootstrap=50)
    assert perfect["per_class_recall"] == [[1.0, 1.0]] * 3 and perfect["minority_recall"] == [
        1.0,
        1.0,
    ]
    pred = labels.copy()
    pred[labels == 1] = 0
    worse = bootstrap_class_metrics(labels, pred, 3, [1], n_bootstrap=50)
    assert worse["minority_recall"] == [0.0, 0.0] and worse["macro_f1"][1] < 1


def test_strategies_change_only_their_keys() -> None:
    cfg = load_config(None, ["train.class_weight=true"])  # the base's own fix is switched off
    none = strategy_config(cfg, "none", "m.csv", 0.5)
    assert not none.train.class_weight and not none.data.synthetic
    gcw = strategy_config(cfg, "gan+class_weight", "m.csv", 0.5)
    assert gcw.train.class_weight and gcw.data.synthetic == "m.csv"
    assert gcw.data.synthetic_ratio == 0.5 and not gcw.train.weighted_sampling
    assert strategy_config(cfg, "oversample", "", 1).train.weighted_sampling
    with pytest.raises(MedxferError, match="unknown strategy"):
        strategy_config(cfg, "smote", "", 1)
    row = {"minority_recall": 0.5, "test_balanced_accuracy": 0.8}
    lines = verdict({"gan": row, "oversample": row | {"minority_recall": 0.6}})
    assert lines == [lines[0]] and "does not beat `oversample`" in lines[0]
    # the gate kept every synthetic image out: the gan row is its fallback, and says so
    lines = verdict({"gan": row | {"synthetic_images_total": 0}, "oversample": row})
    assert len(lines) == 1 and "no synthetic image" in lines[0] and "beat" not in lines[0]


def test_quality_skips_a_class_with_too_few_synthetic_images() -> None:
    """A class filled with only a few images (nearly as large as the largest) is reported as
    skipped instead of failing the cross-validated two-sample test or giving a degenerate FID."""
    from medxfer.gan.quality import MIN_COMPARED, _per_class

    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    few = _per_class(real, rng.normal(size=(3, 8)), seed=0)
    assert few["n_compared"] == 0 and "skipped" in few and "fid_synthetic_vs_real" not in few
    enough = _per_class(real, rng.normal(size=(MIN_COMPARED + 5, 8)), seed=0)
    assert enough["n_compared"] == MIN_COMPARED + 5
    assert 0.0 <= enough["two_sample_accuracy"] <= 1.0


def test_minority_rule_falls_back_to_the_smallest_class() -> None:
    """Imbalanced: the classes under 80% of the largest. Nearly balanced (brain tumor MRI):
    the smallest class stands in, and the rule says so, so minority recall is never empty."""
    from medxfer.gan.compare import compared_minority

    assert compared_minority({"a": 100, "b": 50, "c": 79})[0] == ["b", "c"]
    chosen, rule = compared_minority({"glioma": 1123, "meningioma": 1047, "notumor": 1229})
    assert chosen == ["meningioma"] and "smallest" in rule and "1047 of 1229" in rule
