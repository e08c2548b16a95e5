"""How good are the synthetic images? FID/KID per class, a two-sample test, TSTR.

Features: EfficientNet-Lite0 with its offline ImageNet weights, global-average-pooled (1280-d),
the images resized to ``gan.quality_size`` px (224 by default). Not Inception-v3, so the numbers
are not comparable with published FIDs; they are comparable with the real-versus-real value
beside them: two random halves of the real training images of a class, and synthetic images
(as many as one half) against the first half, so both FIDs share sample sizes (FID is biased
by sample size). Inception-v3 FID/KID through torch-fidelity is added when that package and
its weights are already present (no download).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medxfer.config import ExperimentConfig
from medxfer.data.cache import load_images
from medxfer.data.generated import read_generated
from medxfer.data.prepare import prepare
from medxfer.gan.distances import fid, fit_score, kid, two_sample_accuracy
from medxfer.gan.projected import feature_variant
from medxfer.gan.synthesize import generate, load_generator
from medxfer.train.checkpoint import atomic_write_json

FEATURE_SIZE = 224  # the default of gan.quality_size


def extractor(size: int = FEATURE_SIZE, variant: int = 0) -> str:
    return f"efficientnet_lite{variant} (ImageNet, offline), pooled 1280-d, {size} px input"


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@torch.no_grad()
def lite0_features(
    images: torch.Tensor, batch: int = 64, size: int = FEATURE_SIZE, variant: int = 0
) -> np.ndarray:
    """uint8 (N, S, S[, 3]) -> float64 (N, 1280) pooled features of the images resized to
    ``size`` px (eval mode, CPU/GPU auto), by EfficientNet-Lite0 (or Lite``variant``)."""
    from medxfer.models.backbones import LITE0_PREPROCESS, imagenet_lite

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = imagenet_lite(variant).eval().to(device)  # timm: forward_features / head
    mean = torch.tensor(LITE0_PREPROCESS.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_PREPROCESS.std, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        x = (x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)).float() / 255.0
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=size, mode="bilinear", align_corners=False)
        feats = model.forward_head(model.forward_features((x - mean) / std), pre_logits=True)
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 1280))


def _inception(real: dict[str, torch.Tensor], synth: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inception-v3 FID/KID per class via torch-fidelity, only when its weights are on disk."""
    try:
        import torch_fidelity
    except ImportError:
        return {"skipped": "torch-fidelity is not installed (pip install torch-fidelity)"}
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not weights.exists():
        return {"skipped": f"Inception-v3 weights {weights} are absent (no download attempted)"}
    from medxfer.gan.report import write_pngs

    out: dict[str, Any] = {"extractor": "Inception-v3 (torch-fidelity)"}
    for name, s in synth.items():
        with tempfile.TemporaryDirectory() as tmp:
            write_pngs(real[name], Path(tmp) / "real")
            write_pngs(s, Path(tmp) / "synth")
            m = torch_fidelity.calculate_metrics(
                input1=str(Path(tmp) / "synth"),
                input2=str(Path(tmp) / "real"),
                fid=True,
                kid=True,
                kid_subset_size=min(1000, len(s), len(real[name])),
                cuda=torch.cuda.is_available(),
                verbose=False,
                feature_extractor_weights_path=str(weights),
            )
        out[name] = {
            "fid": float(m["frechet_inception_distance"]),
            "kid": float(m["kernel_inception_distance_mean"]),
        }
    return out


def _synthetic_images(manifest: Path, size: int, cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    samples, _ = read_generated(manifest)
    arr, _ = load_images(
        [s.path for s in samples], size, cfg.data.color, cfg.data.resize, cfg.data.cache_dir
    )
    labels = np.array([s.label for s in samples])
    return {c: torch.from_numpy(arr[labels == c]) for c in sorted(set(labels.tolist()))}


MIN_COMPARED = 20  # fewer synthetic images than this in a class: no FID/KID/two-sample for it


def _per_class(real: np.ndarray, synth: np.ndarray, seed: int) -> dict[str, Any]:
    if min(len(synth), len(real) // 2) < MIN_COMPARED:  # a nearly full class gets few images
        return {"n_real": len(real), "n_synthetic": len(synth), "n_compared": 0,
                "skipped": f"fewer than {MIN_COMPARED} images to compare"}  # fmt: skip
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    half_a, half_b = real[perm[: len(real) // 2]], real[perm[len(real) // 2 :]]
    s = synth[rng.permutation(len(synth))[: len(half_b)]]
    return {
        "n_real": len(real),
        "n_synthetic": len(synth),
        "n_compared": min(len(s), len(half_b)),
        "fid_synthetic_vs_real": fid(s, half_a),
        "fid_real_vs_real": fid(half_b, half_a),
        "kid_synthetic_vs_real": kid(s, half_a, seed=seed),
        "kid_real_vs_real": kid(half_b, half_a, seed=seed),
        "two_sample_accuracy": two_sample_accuracy(real, synth, seed),
    }


def _tstr(
    cfg: ExperimentConfig,
    manifest: Path,
    feats: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    seed: int,
    variant: int,
    cap: int = 500,
) -> dict[str, Any]:
    """Train on synthetic, test on real (the real test split), beside train-real-test-real."""
    ckpt = _checkpoint_of(manifest)
    if ckpt is None:
        return {"skipped": "the manifest names no readable GAN checkpoint"}
    payload = load_generator(ckpt)
    classes = [c for c in payload["modelled"] if c in test]
    if len(classes) < 2:
        return {"skipped": f"the GAN models {len(classes)} class(es); TSTR needs two or more"}
    n = {c: min(cap, len(feats[c])) for c in classes}
    px = cfg.gan.quality_size
    synth = {
        c: lite0_features(generate(payload, c, n[c], seed + 1), size=px, variant=variant)
        for c in classes
    }
    y_syn = np.concatenate([np.full(n[c], i) for i, c in enumerate(classes)])
    y_test = np.concatenate([np.full(len(test[c]), i) for i, c in enumerate(classes)])
    x_test = np.concatenate([test[c] for c in classes])
    rng = np.random.default_rng(seed)
    real = np.concatenate([feats[c][rng.permutation(len(feats[c]))[: n[c]]] for c in classes])
    return {
        "classes": classes,
        "n_train_per_class": n,
        "tstr": fit_score(np.concatenate([synth[c] for c in classes]), y_syn, x_test, y_test),
        "trtr": fit_score(real, y_syn, x_test, y_test),
        "classifier": f"logistic regression on lite{variant} features (standardised, C=0.1)",
    }


def _checkpoint_of(manifest: Path) -> Path | None:
    _, source = read_generated(manifest)
    path = Path(source.get("checkpoint") or "")
    return path if source.get("checkpoint") and path.exists() else None


def gan_quality(cfg: ExperimentConfig, manifest: Path, out_dir: Path) -> dict[str, Any]:
    """FID/KID (lite0 features) per class against real-vs-real, two-sample accuracy, TSTR.

    Real images are cfg's training split (the GAN's own data), at the synthetic images' size;
    TSTR tests on cfg's real test split. Written to ``out_dir/quality.json`` and returned.
    """
    from medxfer.gan.report import real_vs_synthetic_grid
    from medxfer.gan.trainer import with_recipe

    manifest = Path(manifest)
    samples, _ = read_generated(manifest)
    from PIL import Image

    size = Image.open(samples[0].path).size[0] if samples else cfg.gan.image_size
    synth = _synthetic_images(manifest, size, cfg)
    prep = prepare(replace(cfg.data, image_size=size, synthetic="", synthetic_ratio=0.0))
    by_split = {}
    for split in ("train", "test"):
        idx = prep.split_index[split]
        lab = prep.labels[idx]
        by_split[split] = {c: prep.images[idx[lab == i]] for i, c in enumerate(prep.classes)}
    px = cfg.gan.quality_size
    variant = feature_variant(with_recipe(cfg).gan.critic)  # as the gate judges it

    def feats(x: torch.Tensor) -> np.ndarray:
        return lite0_features(x, size=px, variant=variant)

    real_feats = {c: feats(x) for c, x in by_split["train"].items()}
    test_feats = {c: feats(x) for c, x in by_split["test"].items() if len(x)}
    seed = cfg.train.seed
    per_class = {c: _per_class(real_feats[c], feats(x), seed) for c, x in synth.items()}
    tstr = _tstr(cfg, manifest, real_feats, test_feats, seed, variant)

    def mean(key: str) -> float | None:
        vals = [v[key] for v in per_class.values() if v.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    result: dict[str, Any] = {
        "manifest": str(manifest),
        "image_size": size,
        "per_class": per_class,
        "fid": {
            "synthetic_vs_real": mean("fid_synthetic_vs_real"),
            "real_vs_real": mean("fid_real_vs_real"),
            "extractor": extractor(px, variant),
        },
        "kid": {
            "synthetic_vs_real": mean("kid_synthetic_vs_real"),
            "real_vs_real": mean("kid_real_vs_real"),
            "extractor": extractor(px, variant),
        },
        "two_sample_accuracy": mean("two_sample_accuracy"),
        "tstr_accuracy": tstr.get("tstr", {}).get("accuracy"),
        "trtr_accuracy": tstr.get("trtr", {}).get("accuracy"),
        "tstr": tstr,
        "inception": _inception(by_split["train"], synth),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    real_vs_synthetic_grid(by_split["train"], synth, out_dir / "real_vs_synthetic.png")
    atomic_write_json(result, out_dir / "quality.json")
    return result
