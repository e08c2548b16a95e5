"""The projected critic (frozen Lite0 features, hinge loss): only its heads learn, the
generator gets gradients through the frozen backbone, training resumes exactly, and the gate
judges such a GAN through another network (Lite2) than the one its critic saw."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from medxfer.config import ExperimentConfig, load_config
from medxfer.gan.projected import ProjectedCritic, feature_size, feature_variant, hinge_critic_loss
from medxfer.gan.synthesize import sample_gan
from medxfer.gan.trainer import train_gan, with_recipe

TINY = ["gan.critic=projected", "gan.width=4", "gan.z_dim=8", "gan.batch_size=4",
        "gan.n_critic=1", "gan.steps=2", "gan.checkpoint_every=1", "gan.sample_every=2",
        "gan.min_images=10", "gan.gate_size=64", "gan.gate_images=40"]  # fmt: skip


def _cfg(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"data.root={root}", "data.image_size=32", *TINY, *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_trunk() -> torch.nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)


def test_only_the_heads_learn_and_gradients_reach_the_images() -> None:
    torch.manual_seed(0)
    d = ProjectedCritic(image_size=64, channels=1, n_classes=3, trunk=_random_trunk()).train()
    assert not d.stem.training and not d.blocks.training  # ImageNet BN statistics kept
    frozen = {k: v.clone() for k, v in d.state_dict().items() if k.startswith(("stem", "blocks"))}
    x = (torch.rand(4, 1, 64, 64) * 2 - 1).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0])
    scores = d(x, y)
    assert scores.shape == (4,)
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator can learn through it
    trained = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("heads") for n in trained)
    assert all(p.grad is None for n, p in d.named_parameters() if not p.requires_grad)
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = hinge_critic_loss(d(x.detach(), y), d(-x.detach(), y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = d.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert feature_size(64) == 128 and feature_size(128) == 224


def test_hinge_loss_matches_its_formula() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    loss, gap = hinge_critic_loss(real, fake)
    # relu(1 - real): 0, 0.5, 2 -> 2.5/3; relu(1 + fake): 0, 1, 2.5 -> 3.5/3
    assert loss.item() == pytest.approx(6.0 / 3)
    assert gap.item() == pytest.approx(real.mean() - fake.mean())


def test_projected_training_resumes_and_the_gate_uses_lite2(
    synth_root: Path, tmp_path: Path
) -> None:
    cfg = _cfg(synth_root)
    whole = train_gan(cfg, tmp_path / "whole")

    def kill(step: int, row: dict[str, float]) -> None:
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, tmp_path / "parts", on_step=kill)
    resumed = train_gan(cfg, tmp_path / "parts")
    ga = torch.load(whole, weights_only=True)["generators"]["*"]
    gb = torch.load(resumed, weights_only=True)["generators"]["*"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert all(row["gp"] == 0.0 for row in history)  # hinge loss, no gradient penalty

    modelled = torch.load(whole, weights_only=True)["modelled"]
    sample_gan(whole, tmp_path / "s", n_per_class={c: 12 for c in modelled}, seed=0)
    gate = json.loads((tmp_path / "s" / "gate.json").read_text())
    assert gate["extractor"].startswith("efficientnet_lite2")
    assert feature_variant("plain") == 0 and feature_variant("projected") == 2


def test_projected_recipe_and_fingerprint() -> None:
    from medxfer.gan.trainer import gan_fingerprint

    cfg = with_recipe(load_config(None, ["gan.recipe=cpu-64-projected"]))
    assert cfg.gan.critic == "projected" and cfg.gan.n_critic == 1 and cfg.gan.image_size == 64
    assert cfg.gan.diversity == 1.0
    plain = load_config(None, [])
    assert gan_fingerprint(load_config(None, ["gan.diversity=1"])) != gan_fingerprint(plain)
    assert gan_fingerprint(load_config(None, ["gan.critic=projected"])) != gan_fingerprint(plain)
    grouped = load_config(None, ["data.group_near_duplicates=true"])  # another training split
    assert gan_fingerprint(grouped) != gan_fingerprint(plain)
    # generators trained before the key existed keep their fingerprint (value before it)
    assert gan_fingerprint(plain) == "2c00ba593e87"


def test_minibatch_std_sees_a_collapsed_batch() -> None:
    from medxfer.gan.projected import minibatch_std

    torch.manual_seed(0)
    same = torch.randn(1, 3, 4, 4).expand(8, -1, -1, -1).contiguous()
    spread = torch.randn(8, 3, 4, 4)
    a, b = minibatch_std(same), minibatch_std(spread)
    assert a.shape == (8, 4, 4, 4) and torch.equal(a[:, :3], same)
    assert a[:, 3].max() < 1e-3 < b[:, 3].min()
    assert minibatch_std(torch.randn(3, 2, 4, 4)).shape == (3, 3, 4, 4)  # odd batch: groups of 3


def test_mode_seeking_term_by_hand_and_the_paired_labels(synth_root: Path, tmp_path: Path) -> None:
    """MSGAN's term is 1 / (mean image distance / mean z distance) between the halves; with
    ``gan.diversity`` the halves of a generator batch share their labels, and the term is
    logged; a collapsed generator (same image for every z) pays far more than a varied one."""
    from medxfer.gan.losses import mode_seeking_loss

    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
    fake = torch.tensor([[[[0.0]]], [[[1.0]]], [[[0.5]]], [[[-1.0]]]])
    want = 1.0 / ((0.5 + 2.0) / 2 / ((2.0 + 0.0 + 0.0 + 2.0) / 4) + 1e-5)
    assert float(mode_seeking_loss(fake, z)) == pytest.approx(want, rel=1e-6)
    same = fake[:1].expand(4, -1, -1, -1)
    assert float(mode_seeking_loss(same, z)) > 1e4 * float(mode_seeking_loss(fake, z))

    seen: list[torch.Tensor] = []
    cfg = _cfg(synth_root, "gan.diversity=1", "gan.critic=plain", "gan.steps=1")
    import medxfer.gan.loop as loop

    real_forward = loop.Generator.forward

    def spy(self: loop.Generator, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and y is not None:
            seen.append(y.clone())
        return real_forward(self, z, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Generator, "forward", spy)
        train_gan(cfg, tmp_path / "gan", resume=False)
    y = seen[-1]
    half = len(y) // 2
    assert torch.equal(y[:half], y[half : 2 * half])
    (path,) = (tmp_path / "gan").rglob("history.json")
    history = json.loads(path.read_text())
    assert history[-1]["mode_seeking"] > 0
    from medxfer.errors import MedxferError
    from medxfer.gan.trainer import check_gan_config

    with pytest.raises(MedxferError, match="diversity"):
        check_gan_config(load_config(None, ["gan.diversity=-1"]).gan)
