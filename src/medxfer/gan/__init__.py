"""WGAN-GP synthesis of minority-class images, measured against the simple fixes for imbalance.

ckpt = train_gan(cfg, Path("runs/gan"))                     # training split only
manifest = sample_gan(ckpt, Path("runs/gan/synthetic"), balance=1.0)  # gated: see gate.json
quality = gan_quality(cfg, manifest, Path("runs/gan/quality"))
# medxfer train data.synthetic=runs/gan/synthetic/manifest.csv

Only the classes that pass the quality gate (medxfer.gan.gate, on the training split) are
written; the others should be trained with gan.gate_fallback (default: oversampling).
"""

from __future__ import annotations

from medxfer.gan.compare import STRATEGIES, compare_strategies
from medxfer.gan.losses import gradient_penalty
from medxfer.gan.quality import gan_quality
from medxfer.gan.synthesize import sample_gan
from medxfer.gan.trainer import train_gan

__all__ = [
    "STRATEGIES",
    "compare_strategies",
    "gan_quality",
    "gradient_penalty",
    "sample_gan",
    "train_gan",
]
