"""The GAN quality gate and the data-efficient recipe: DiffAugment, the gate's verdicts,
memorisation, and that a gated-out class never reaches the training loader."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medxfer.config import ExperimentConfig, load_config
from medxfer.gan.augment import diff_augment
from medxfer.gan.data import load_train_split
from medxfer.gan.gate import memorisation, run_gate
from medxfer.gan.synthesize import sample_gan
from medxfer.gan.trainer import train_gan

TINY = ["gan.width=4", "gan.z_dim=8", "gan.batch_size=8", "gan.n_critic=1", "gan.steps=2",
        "gan.checkpoint_every=1", "gan.sample_every=2", "gan.min_images=10",
        "gan.gate_size=64", "gan.gate_images=60"]  # fmt: skip


def _cfg(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"data.root={root}", "data.image_size=32", *TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(synth_root: Path) -> dict[str, torch.Tensor]:
    data = load_train_split(_cfg(synth_root), 32)
    return {c: data.images[data.labels == i] for i, c in enumerate(data.classes)}


def test_diffaugment_same_parameters_for_same_stream() -> None:
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    a = diff_augment(x, torch.Generator().manual_seed(5))
    b = diff_augment(x.clone(), torch.Generator().manual_seed(5))
    c = diff_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    # real and fake given one stream's draw get the same translation, cutout and colour
    real, fake = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    both = diff_augment(torch.cat([real, fake]), torch.Generator().manual_seed(1), pairs=True)
    ones = diff_augment(torch.ones(8, 1, 16, 16), torch.Generator().manual_seed(1), pairs=True)
    assert torch.equal(ones[:4] == ones[:4].max(), ones[4:] == ones[4:].max())  # same cutout
    assert both.shape == (8, 1, 16, 16)


def test_diffaugment_is_differentiable() -> None:
    x = (torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)

    def f(inp: torch.Tensor) -> torch.Tensor:
        return diff_augment(inp, torch.Generator().manual_seed(2))

    assert torch.autograd.gradcheck(f, (x,))
    diff_augment(x, torch.Generator().manual_seed(2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gate_accepts_real_images_and_rejects_noise(real: dict[str, torch.Tensor]) -> None:
    c = "disc"  # the largest class: two halves of real training images
    half = len(real[c]) // 2
    reference = real | {c: real[c][:half]}
    ok = run_gate(reference, {c: real[c][half:]}, n_images=60, size=64)
    assert ok["passed"] == [c], ok["per_class"][c]["reasons"]
    assert ok["per_class"][c]["memorised"] == 0
    noise = torch.randint(0, 256, (60, *real[c].shape[1:]), dtype=torch.uint8)
    bad = run_gate(reference, {c: noise}, n_images=60, size=64)
    assert bad["failed"] == [c] and bad["per_class"][c]["two_sample_accuracy"] > 0.85


def test_memorisation_finds_a_planted_copy(real: dict[str, torch.Tensor]) -> None:
    x = real["disc"]
    half = len(x) // 2
    clean = memorisation(x[:half], x[half:])
    planted = x[half:].clone()
    planted[7] = x[3]  # a training image, copied
    found = memorisation(x[:half], planted)
    assert clean["memorised"] == 0
    assert found["memorised"] >= 1 and 7 in found["memorised_index"]


def test_gated_out_class_never_reaches_the_loader(synth_root: Path, tmp_path: Path) -> None:
    from medxfer.train.compute import resolve
    from medxfer.train.setup import build

    ckpt = train_gan(_cfg(synth_root), tmp_path / "g")  # two steps: noise, fails the gate
    manifest = sample_gan(ckpt, tmp_path / "s", balance=1.0, seed=0)
    gate = json.loads((tmp_path / "s" / "gate.json").read_text())
    assert gate["failed"] and not gate["passed"]
    assert gate["fallback"]["overrides"] == ["train.weighted_sampling=true"]
    assert list(csv.DictReader(manifest.open())) == []
    cfg = _cfg(synth_root, f"data.synthetic={manifest}", "model.arch=resnet18",
               "model.weights=none", "train.batch_size=8")  # fmt: skip
    data = build(cfg, resolve(cfg.train)).data
    assert data.info["synthetic_images"]["total"] == 0
    assert not any(s.path.startswith(str(tmp_path / "s")) for s in data.samples)
    assert not any(p.is_file() for c in gate["failed"] for p in (tmp_path / "s" / c).glob("*"))


def test_recipe_fills_defaults_and_keeps_what_is_set() -> None:
    from medxfer.errors import MedxferError
    from medxfer.gan.trainer import check_gan_config, gan_fingerprint, with_recipe

    cpu = with_recipe(load_config(None, ["gan.recipe=cpu-64", "gan.width=8"]))
    assert cpu.gan.width == 8 and cpu.gan.ema == 0.995 and cpu.gan.max_minutes == 60
    gpu = load_config(None, ["gan.recipe=gpu-128"])
    assert with_recipe(gpu).gan.image_size == 128
    assert gan_fingerprint(gpu) != gan_fingerprint(load_config(None, []))
    gate_only = load_config(None, ["gan.gate_fallback=class_weight", "gan.gate_images=9"])
    assert gan_fingerprint(gate_only) == gan_fingerprint(load_config(None, []))
    with pytest.raises(MedxferError, match="recipe"):
        with_recipe(load_config(None, ["gan.recipe=tpu"]))
    with pytest.raises(MedxferError, match="gate_fallback"):
        check_gan_config(load_config(None, ["gan.gate_fallback=smote"]).gan)


def test_comparison_winner_is_chosen_on_validation() -> None:
    from medxfer.gan.compare import val_winner

    rows = {
        "oversample": {"val_balanced_accuracy": 0.90, "test_balanced_accuracy": 0.70},
        "gan": {"val_balanced_accuracy": 0.80, "test_balanced_accuracy": 0.95},
    }
    won = val_winner(rows)
    assert won["strategy"] == "oversample" and "`oversample` wins" in won["sentence"]
