"""Sample a trained generator: PNGs per class plus a manifest that marks them synthetic.

    manifest = sample_gan(Path("runs/gan/generator.pt"), Path("runs/gan/samples"), balance=1.0)
    medxfer train data.synthetic=runs/gan/samples/manifest.csv

Every class draws from its own random stream, seeded by (seed, class name), so the images of
one class do not change when another class's count does, and the same call writes the same
bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medxfer.data.generated import MANIFEST_FIELDS
from medxfer.errors import MedxferError
from medxfer.gan.data import to_uint8
from medxfer.gan.networks import Generator
from medxfer.train.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint


def load_generator(checkpoint: Path) -> dict[str, Any]:
    """The payload of ``generator.pt`` (see trainer.train_gan); a clear error if it is not one."""
    if checkpoint.is_dir():
        checkpoint = checkpoint / "generator.pt"
    if not checkpoint.exists():
        raise MedxferError(
            f"GAN checkpoint {checkpoint} does not exist",
            "train one with `medxfer gan train` (it writes <out>/generator.pt)",
        )
    payload = load_checkpoint(checkpoint)  # weights only; one message for anything else
    if not isinstance(payload, dict) or payload.get("kind") != "medxfer-wgan-gp":
        raise MedxferError(
            f"{checkpoint} is not a medxfer GAN checkpoint",
            "pass the generator.pt that `medxfer gan train` wrote",
        )
    payload["path"] = checkpoint
    return payload


def generator_for(payload: dict[str, Any], key: str) -> Generator:
    n_classes = len(payload["modelled"]) if key == "*" else 1
    gen = Generator(
        image_size=payload["image_size"],
        channels=payload["channels"],
        n_classes=n_classes,
        z_dim=payload["z_dim"],
        width=payload["width"],
    )
    gen.load_state_dict(payload["generators"][key])
    return gen.eval()


def _class_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:6], "little")


@torch.no_grad()
def generate(
    payload: dict[str, Any], name: str, n: int, seed: int, batch: int = 256
) -> torch.Tensor:
    """``n`` uint8 images of class ``name`` (the cache's layout), deterministic under ``seed``."""
    modelled: list[str] = payload["modelled"]
    if name not in modelled:
        raise MedxferError(
            f"the GAN does not model class {name!r}", f"it models {', '.join(modelled)}"
        )
    conditional = payload["mode"] == "conditional"
    gen = generator_for(payload, "*" if conditional else name)
    g = torch.Generator().manual_seed(_class_seed(seed, name))
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), payload["z_dim"], generator=g)
        y = torch.full((len(z),), modelled.index(name), dtype=torch.long) if conditional else None
        out.append(to_uint8(gen(z, y)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def plan_counts(
    payload: dict[str, Any], n_per_class: dict[str, int] | None, balance: float | None
) -> dict[str, int]:
    """Images to write per class: given, or enough to lift each modelled class to
    ``balance`` x the largest class's real training count."""
    if n_per_class is not None:
        for name in n_per_class:
            if name not in payload["modelled"]:
                raise MedxferError(
                    f"the GAN does not model class {name!r}",
                    f"it models {', '.join(payload['modelled'])}",
                )
        return {k: int(v) for k, v in n_per_class.items() if v > 0}
    ratio = payload["config"]["gan"]["balance"] if balance is None else balance
    if ratio <= 0:
        raise MedxferError("--balance must be positive", "e.g. --balance 1.0 (up to the majority)")
    counts: dict[str, int] = payload["train_counts"]
    target = round(ratio * max(counts.values()))
    plan = {c: target - counts[c] for c in payload["modelled"] if target > counts[c]}
    return plan


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def gate_generated(
    payload: dict[str, Any], images: dict[str, torch.Tensor], seed: int, out_dir: Path
) -> dict[str, Any]:
    """Run the quality gate (medxfer.gan.gate) on ``images`` against the training split the
    GAN learnt from; write ``out_dir/gate.json`` and ``out_dir/gate.png`` (real beside
    synthetic, every judged class) and print the verdict."""
    from rich.console import Console

    from medxfer.config import config_from_dict
    from medxfer.gan.data import load_train_split
    from medxfer.gan.gate import describe, fallback, run_gate
    from medxfer.gan.projected import feature_variant
    from medxfer.gan.report import real_vs_synthetic_grid

    cfg = config_from_dict(payload["config"])
    data = load_train_split(cfg, payload["image_size"])
    real = {c: data.images[data.labels == i] for i, c in enumerate(data.classes)}
    gc = cfg.gan
    variant = feature_variant(gc.critic)
    result = run_gate(
        real, images, n_images=gc.gate_images, size=gc.gate_size, seed=seed, variant=variant
    )
    result["fallback"] = {
        "strategy": gc.gate_fallback,
        "overrides": fallback(result, gc.gate_fallback),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out_dir / "gate.json")
    real_vs_synthetic_grid(real, images, out_dir / "gate.png")
    console = Console(stderr=True)
    for line in describe(result, gc.gate_fallback):
        console.print(("[bold red]" if "FAILS" in line else "") + line)
    return result


def sample_gan(
    checkpoint: Path,
    out_dir: Path,
    *,
    n_per_class: dict[str, int] | None = None,
    balance: float | None = None,
    seed: int = 0,
    gate: bool = True,
) -> Path:
    """Write PNGs under ``out_dir/<class>/`` and ``out_dir/manifest.csv``; return the manifest.

    Without ``n_per_class``, ``balance`` (default: the GAN config's ``gan.balance``) fills every
    modelled class up to that ratio of the largest class's real training count. With ``gate``
    (the default) only the classes that pass the quality gate are written (``gate.json``
    says which and why); the manifest of a run where none passes has no rows.
    """
    payload = load_generator(Path(checkpoint))
    plan = plan_counts(payload, n_per_class, balance)
    if not plan:
        raise MedxferError(
            "nothing to sample: every modelled class already has that many real images",
            "raise --balance or give --n",
        )
    images = {name: generate(payload, name, n, seed) for name, n in plan.items()}
    if gate:
        passed = gate_generated(payload, images, seed, out_dir)["passed"]
        images = {c: x for c, x in images.items() if c in passed}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = str(Path(payload["path"]).resolve())
    rows = []
    for name, batch in images.items():
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(batch.numpy()):
            rel = f"{name}/gan-s{seed}-{i:05d}.png"
            (out_dir / rel).write_bytes(_png_bytes(img))
            rows.append(
                {
                    "path": rel,
                    "label": name,
                    "split": "train",
                    "synthetic": "true",
                    "checkpoint": ckpt,
                    "seed": seed,
                }
            )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    manifest = out_dir / "manifest.csv"
    atomic_write_text(buf.getvalue(), manifest)  # written last: marks the sample complete
    return manifest
