"""Penultimate features and the per-image out-of-distribution detectors fitted on them.

Every score is "higher = more unusual". MSP, energy, Mahalanobis, kNN and ViM are pytorch-ood's
own implementations; what medxfer adds is the shrinkage covariance of the Mahalanobis detector
(Ledoit–Wolf, sklearn: pytorch-ood inverts the raw scatter matrix, which is singular when there
are fewer training images than feature dimensions) and the storage of every fitted tensor as
plain arrays (safetensors), so a run never unpickles a detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medxfer.errors import MedxferError

DETECTORS = ("msp", "energy", "mahalanobis", "knn", "vim")
DISTANCES = ("mahalanobis", "knn", "vim")  # the feature-distance detectors


def head_module(model: torch.nn.Module, arch: str) -> torch.nn.Linear:
    """The final Linear of ``arch`` (its registry entry names it) inside ``model``."""
    from medxfer.models.registry import entry

    path = entry(arch).head
    try:
        head = model.get_submodule(path)
    except AttributeError:
        head = None
    if not isinstance(head, torch.nn.Linear):
        raise MedxferError(
            f"the {arch} model has no Linear head at {path!r}, so its features cannot be read",
            "per-image trust scores need a model built by medxfer.models.create_model",
        )
    return head


@torch.no_grad()
def features_and_logits(
    model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images at the model's size ((N, H, W) or (N, H, W, 3)) -> penultimate features
    (N, D), the input of the head Linear, and logits (N, C); preprocessed as
    ``predict.probs_of_arrays`` does. A forward hook on the head reads the features, so timm
    and torchvision networks (ResNet, GoogLeNet) are handled alike."""
    from medxfer.evaluate.predict import preprocess_arrays

    head = head_module(model, str(meta["arch"]))
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].float().cpu()))
    logits = []
    try:
        for start in range(0, len(arrays), batch_size):
            x = preprocess_arrays(meta, arrays[start : start + batch_size]).to(device)
            out = model(x.contiguous(memory_format=torch.channels_last))
            logits.append(out.float().cpu())
    finally:
        handle.remove()
    if not logits:
        return np.zeros((0, head.in_features), np.float32), np.zeros(
            (0, head.out_features), np.float32
        )
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@dataclass
class Detectors:
    """Fitted detector state as arrays (what trust.safetensors holds)."""

    mu: np.ndarray  # (C, D) class means of training features
    precision: np.ndarray  # (D, D) inverse Ledoit–Wolf shared covariance
    bank: np.ndarray  # (M, D) L2-normalised training features, M <= bank_size
    vim_w: np.ndarray  # (C, D) head weight
    vim_b: np.ndarray  # (C,) head bias
    vim_null: np.ndarray  # (D, D - d) the directions outside ViM's principal subspace
    vim_alpha: float
    k: int  # kNN: distance to the k-th nearest training feature

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("mu", "precision", "bank", "vim_w", "vim_b", "vim_null")
        return {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n), np.float32))
                for n in names}  # fmt: skip

    def scores(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Every detector's score per image (higher = more unusual)."""
        from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis, MaxSoftmax, ViM

        z = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        lg = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        maha = Mahalanobis(None)
        maha.mu, maha.precision = torch.from_numpy(self.mu), torch.from_numpy(self.precision)
        knn = KNN(None, k=min(self.k, len(self.bank)), normalize=True)
        knn.knn.set_params(n_jobs=1)
        knn.fit_features(torch.from_numpy(self.bank), torch.zeros(len(self.bank)))
        vim = ViM(None, self.vim_null.shape[0] - self.vim_null.shape[1],
                  torch.from_numpy(self.vim_w), torch.from_numpy(self.vim_b))  # fmt: skip
        vim.principal_subspace, vim.alpha = torch.from_numpy(self.vim_null), self.vim_alpha
        out = {
            "msp": MaxSoftmax.score(lg),
            "energy": EnergyBased.score(lg),
            "mahalanobis": maha.predict_features(z),
            "knn": knn.predict_features(z),
            "vim": vim.predict_features(z),
        }
        return {name: v.double().numpy() for name, v in out.items()}


def fit_detectors(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    k: int = 10,
    bank_size: int = 5000,
    seed: int = 0,
) -> Detectors:
    """Fit every feature detector on training features (N, D) with labels 0..C-1, given the
    head's ``weight`` (C, D) and ``bias`` (C,)."""
    from pytorch_ood.detector import ViM
    from sklearn.covariance import LedoitWolf

    z = np.asarray(features, np.float64)
    n_classes = weight.shape[0]
    missing = sorted(set(range(n_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise MedxferError(f"classes {missing} have no training features to fit detectors on")
    mu = np.stack([z[labels == c].mean(0) for c in range(n_classes)])
    centred = z - mu[labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(z))[:bank_size] if len(z) > bank_size else np.arange(len(z))
    bank = z[np.sort(keep)]
    bank = bank / np.clip(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12, None)
    d = max(1, min(512, z.shape[1] // 2))
    vim = ViM(None, d, torch.from_numpy(weight).float(), torch.from_numpy(bias).float())
    vim.fit_features(torch.from_numpy(z).float(), torch.from_numpy(labels))
    assert vim.principal_subspace is not None and vim.alpha is not None
    return Detectors(
        mu=mu.astype(np.float32), precision=precision.astype(np.float32),
        bank=bank.astype(np.float32), vim_w=weight.astype(np.float32),
        vim_b=bias.astype(np.float32), vim_null=vim.principal_subspace.numpy(),
        vim_alpha=float(vim.alpha), k=int(min(k, len(bank))),
    )  # fmt: skip


def detectors_from(tensors: dict[str, torch.Tensor], vim_alpha: float, k: int) -> Detectors:
    arrays = {name: t.numpy() for name, t in tensors.items()}
    return Detectors(
        mu=arrays["mu"], precision=arrays["precision"], bank=arrays["bank"],
        vim_w=arrays["vim_w"], vim_b=arrays["vim_b"], vim_null=arrays["vim_null"],
        vim_alpha=vim_alpha, k=k,
    )  # fmt: skip
