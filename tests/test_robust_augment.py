"""The appearance-robust augmentation policy: seeded, resumable bit for bit, in range, and every
op really changes an image in the way it is meant to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stopping import StopAfterOneEpoch, Stopped

from medxfer.config import AugmentConfig, ExperimentConfig, load_config
from medxfer.data import robust
from medxfer.data.loader import augment_batch, epoch_generator
from medxfer.errors import MedxferError
from medxfer.train.loop import fit

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=3",
    "train.batch_size=16", "eval.n_bootstrap=20", "train.eval_batch_size=64",
    "train.steps_per_epoch=4", "augment.policy=robust",
]  # fmt: skip


def _scene(n: int = 6, c: int = 1, size: int = 64) -> torch.Tensor:
    """Images with structure: a bright disc on a dark background, a ramp and fine stripes."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.4).float() * 0.6
    stripes = (torch.arange(size) % 4 < 2).float().view(1, -1) * 0.2
    img = (disc + 0.2 * (xx + 1) / 2 + stripes * (yy > 0.5)).clamp(0, 1)
    shade = torch.linspace(0.6, 1.0, n).view(n, 1, 1, 1)
    return (img.expand(n, c, size, size) * shade).contiguous()


def test_deterministic_under_its_seed_and_standard_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.rand(16, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(policy="robust")
    a = augment_batch(x, cfg, epoch_generator(3, 1))
    b = augment_batch(x, cfg, epoch_generator(3, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, cfg, epoch_generator(3, 2)))
    standard = augment_batch(x, AugmentConfig(), epoch_generator(3, 1))
    assert not torch.equal(a, standard)
    # the robust policy is the standard one followed by its own ops: with them all off, the
    # standard result, exactly (the standard policy draws nothing more than it used to)
    monkeypatch.setattr(robust, "P", dict.fromkeys(robust.P, 0.0))
    assert torch.equal(augment_batch(x, cfg, epoch_generator(3, 1)), standard)


@pytest.mark.parametrize(("c", "size"), [(1, 48), (3, 67), (1, 224)])
def test_shapes_kept_and_range_valid(c: int, size: int) -> None:
    x = torch.rand(12, c, size, size, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        y = augment_batch(x, AugmentConfig(policy="robust"), epoch_generator(seed, 0))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()


def _high_freq(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontal neighbours, per image."""
    return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", list(robust.OPS))
def test_each_op_changes_the_image_as_meant(name: str) -> None:
    x = _scene()
    y = robust.OPS[name](x, torch.Generator().manual_seed(0)).clamp(0, 1)
    assert y.shape == x.shape
    change = (y - x).abs().mean(dim=(1, 2, 3))
    assert (change > 0.005).all(), f"{name} left an image (nearly) unchanged: {change}"
    if name == "invert":
        torch.testing.assert_close(y, 1 - x)
    if name == "gamma":  # a monotone curve: the order of intensities is kept
        flat_x, flat_y = x[0].flatten(), y[0].flatten()
        assert torch.equal(flat_y[flat_x.argsort()], flat_y[flat_x.argsort()].sort().values)
    if name == "noise":
        assert (_high_freq(y) > _high_freq(x)).all()
    if name == "resolution":  # fine detail lost
        assert (_high_freq(y) < _high_freq(x)).all()
    if name == "fov":  # the framing moved: the disc's centre of mass or its size changed
        assert ((y.sum(dim=(1, 2, 3)) - x.sum(dim=(1, 2, 3))).abs() > 0.5).all()


def test_blur_and_sharpen_act_opposite_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _scene(n=40)
    y = robust.blur_sharpen(x, torch.Generator().manual_seed(0))
    hf_x, hf_y = _high_freq(x), _high_freq(y)
    assert (hf_y < hf_x).any() and (hf_y > hf_x).any()  # both kinds were drawn
    assert ((hf_y - hf_x).abs() > 1e-3).all()


def test_curve_includes_non_monotone_and_keeps_some_backgrounds_dark() -> None:
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(64, 1, 4, 64).contiguous()
    y = robust.curve(ramp, torch.Generator().manual_seed(0))[:, 0, 0]
    steps = y[:, 1:] - y[:, :-1]
    monotone = (steps >= -1e-6).all(1) | (steps <= 1e-6).all(1)
    assert monotone.any() and (~monotone).any()
    assert (y[:, 0] == 0).sum() >= 16 and (y[:, 0] > 0).any()


def test_every_op_is_reached_through_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _scene(n=8)
    for name in robust.OPS:
        monkeypatch.setattr(robust, "P", {k: float(k == name) for k in robust.P})
        y = robust.robust_augment(x, torch.Generator().manual_seed(0))
        assert ((y - x).abs().mean(dim=(1, 2, 3)) > 0.005).all(), name


def test_config_key_validated_and_default_keeps_fingerprints() -> None:
    assert ExperimentConfig().augment.policy == "standard"
    with pytest.raises(MedxferError, match=r"augment\.policy"):
        load_config(None, ["augment.policy=strong"])
    plain, robust_cfg = load_config(None, []), load_config(None, ["augment.policy=robust"])
    assert plain.fingerprint() != robust_cfg.fingerprint()
    before = ExperimentConfig().to_dict()
    before["augment"].pop("policy")
    from medxfer.config import drop_later_defaults

    assert drop_later_defaults(plain.to_dict())["augment"] == before["augment"]


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted_with_the_robust_policy(
    synth_root: Path, tmp_path: Path
) -> None:
    cfg = load_config(None, [f"data.root={synth_root}", f"out_dir={tmp_path}", *FAST])
    fit(cfg, tmp_path / "straight")
    with pytest.raises(Stopped):
        fit(cfg, tmp_path / "killed", callbacks=(StopAfterOneEpoch(),))
    fit(cfg, tmp_path / "killed", resume=True)
    assert _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "killed" / "last.pt")
    # and the policy mattered: the standard policy trains other weights
    fit(load_config(None, [f"data.root={synth_root}", f"out_dir={tmp_path}", *FAST[:-1]]),
        tmp_path / "standard")  # fmt: skip
    assert not _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "standard" / "last.pt")
