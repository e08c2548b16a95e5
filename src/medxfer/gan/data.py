"""The real images a GAN learns from: the training split of ``cfg.data`` at the GAN's size.

The split is the one ``medxfer train`` uses (same seeds and fractions; it does not depend on the
image size), so the GAN never sees a validation or test image, and generated images that enter
training later cannot carry a test image's likeness in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from medxfer.config import ExperimentConfig
from medxfer.data.generated import MINORITY_BELOW, minority_classes
from medxfer.data.prepare import prepare
from medxfer.errors import MedxferError


@dataclass
class GanData:
    images: torch.Tensor  # uint8 (N, S, S) or (N, S, S, 3): the training split only
    labels: torch.Tensor  # int64 (N,) indices into ``classes``
    classes: list[str]
    counts: dict[str, int]  # real training images per class
    color: str
    resize: str

    @property
    def channels(self) -> int:
        return 3 if self.images.dim() == 4 else 1


def load_train_split(cfg: ExperimentConfig, image_size: int) -> GanData:
    """Real training images at ``image_size``; generated images (data.synthetic) never."""
    dcfg = replace(cfg.data, image_size=image_size, synthetic="", synthetic_ratio=0.0)
    prep = prepare(dcfg)
    idx = prep.split_index["train"]
    return GanData(
        prep.images[idx],
        prep.labels[idx],
        prep.classes,
        prep.counts("train"),
        cfg.data.color,
        cfg.data.resize,
    )


def classes_to_model(data: GanData, *, conditional: bool, min_images: int) -> list[str]:
    """Every class (a conditional GAN) or the minority classes (one GAN each), checked for size."""
    targets = data.classes if conditional else minority_classes(data.counts)
    if not targets:
        raise MedxferError(
            f"no minority class to synthesise: every class has at least {MINORITY_BELOW:.0%} of "
            "the largest one's training images",
            "train without synthetic images (an imbalance this small needs no fix)",
        )
    small = {c: data.counts[c] for c in targets if data.counts[c] < min_images}
    if small:
        listed = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise MedxferError(
            f"too few training images to train a GAN for class(es) {listed}; "
            f"gan.min_images is {min_images}",
            "oversample the real images instead (train.weighted_sampling=true), or add images",
        )
    return targets


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S[, 3]) -> float (B, C, S, S) in [-1, 1]."""
    x = batch.unsqueeze(1) if batch.dim() == 3 else batch.permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, S, S) in [-1, 1] -> uint8 (B, S, S[, 3]) (the cache's layout)."""
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return u[:, 0] if u.shape[1] == 1 else u.permute(0, 2, 3, 1).contiguous()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedxferError(f"gan.device={name} but CUDA is not available", "use gan.device=cpu")
    return torch.device(name)
