"""Penultimate features and the per-image out-of-distribution detectors fitted on them.

Every score is "higher = more unusual". MSP, energy, Mahalanobis, kNN and ViM are pytorch-ood's
own implementations; what medxfer adds is the shrinkage covariance of the Mahalanobis detector
(Ledoit–Wolf, sklearn: pytorch-ood inverts the raw scatter matrix, which is singular when there
are fewer training images than feature dimensions) and the storage of every fitted tensor as
plain arrays (safetensors), so a run never unpickles a detector.

``layers`` looks at several depths, not only the penultimate features. A network trained to be
robust to contrast, blur or noise learns penultimate features that barely change under them:
that is the point of the robust policy, and it leaves the penultimate detectors blind to the
shift. The early blocks still see it. For each block the registry names (``Entry.stages``) the
image is summarised by its channel means and standard deviations; a Ledoit–Wolf Gaussian
fitted on the training images gives a Mahalanobis distance per block, and ``layers`` is the
weighted mean of those distances and the penultimate one, each standardised by its mean and
standard deviation on the validation images (Lee et al. 2018's feature ensemble, with fixed
weights instead of weights fitted on out-of-distribution examples; the statistics are those of
Gram-matrix / feature-statistics detectors). The penultimate distance takes
``PENULTIMATE_SHARE`` of the weight and the stages share the rest equally: the stages see
appearance shifts, the penultimate features a class the network never learnt, and
studies/trust_depths.py chose the share on validation images of both datasets (runs fitted
before it average all depths equally). pytorch-ood's Gram detector also reads the block groups;
the same study measured it, and it flagged a held-out class less often on both datasets.

``features_and_logits`` returns the penultimate features followed by the block statistics in
one array; the detectors read their own columns (``Detectors.dim``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medxfer.errors import MedxferError

DETECTORS = ("msp", "energy", "mahalanobis", "knn", "vim", "layers")
DISTANCES = ("mahalanobis", "knn", "vim", "layers")  # the feature-distance detectors
PENULTIMATE_SHARE = 0.75  # ``layers``: the penultimate distance's weight (studies/trust_depths.py)


def stage_modules(model: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    """The blocks of ``model`` whose outputs ``layers`` summarises (none: the architecture
    names no stages, and ``layers`` is not fitted)."""
    from medxfer.models.registry import entry

    return [model.get_submodule(path) for path in entry(arch).stages]


def _stage_stats(out: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C): each channel's mean and standard deviation over positions."""
    o = out.float()
    return torch.cat([o.mean(dim=(2, 3)), o.std(dim=(2, 3), correction=0)], dim=1).cpu()


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
    """uint8 images at the model's size ((N, H, W) or (N, H, W, 3)) -> features (N, D + S):
    the penultimate features (the input of the head Linear, D columns) followed by the channel
    means and standard deviations of each of the architecture's stages (S columns), and logits
    (N, C); preprocessed as ``predict.probs_of_arrays`` does. Forward hooks read the features,
    so timm and torchvision networks (ResNet, GoogLeNet) are handled alike."""
    from medxfer.evaluate.predict import preprocess_arrays

    head = head_module(model, str(meta["arch"]))
    stages = stage_modules(model, str(meta["arch"]))
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    stats: list[list[torch.Tensor]] = [[] for _ in stages]
    handles = [head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].float().cpu()))]
    for i, module in enumerate(stages):
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, i=i: stats[i].append(_stage_stats(out))))  # fmt: skip
    logits = []
    try:
        for start in range(0, len(arrays), batch_size):
            x = preprocess_arrays(meta, arrays[start : start + batch_size]).to(device)
            out = model(x.contiguous(memory_format=torch.channels_last))
            logits.append(out.float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    if not logits:
        return np.zeros((0, head.in_features), np.float32), np.zeros(
            (0, head.out_features), np.float32
        )
    return (
        torch.cat([torch.cat(feats), *[torch.cat(s) for s in stats]], dim=1).numpy(),
        torch.cat(logits).numpy(),
    )


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
    # ``layers`` (absent for runs fitted before it, and for architectures without stages):
    # per stage, the training mean (2C,) and Ledoit–Wolf precision (2C, 2C) of its statistics;
    # ``layer_loc`` / ``layer_scale``: the validation mean and standard deviation of each
    # stage's distance, then of the penultimate Mahalanobis distance (n_stages + 1,);
    # ``layer_weights``: how ``layers`` weighs them (None: equally, as runs fitted before the
    # weights were stored)
    layer_mean: list[np.ndarray] | None = None
    layer_precision: list[np.ndarray] | None = None
    layer_loc: np.ndarray | None = None
    layer_scale: np.ndarray | None = None
    layer_weights: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Penultimate feature columns; the stage statistics follow them."""
        return int(self.mu.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("mu", "precision", "bank", "vim_w", "vim_b", "vim_null")
        out = {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n), np.float32))
               for n in names}  # fmt: skip
        if self.layer_mean is not None and self.layer_precision is not None:
            for i, (m, p) in enumerate(zip(self.layer_mean, self.layer_precision, strict=True)):
                out[f"layer_mean_{i}"] = torch.from_numpy(np.ascontiguousarray(m, np.float32))
                out[f"layer_precision_{i}"] = torch.from_numpy(np.ascontiguousarray(p, np.float32))
            if self.layer_loc is not None and self.layer_scale is not None:
                out["layer_loc"] = torch.from_numpy(np.asarray(self.layer_loc, np.float64))
                out["layer_scale"] = torch.from_numpy(np.asarray(self.layer_scale, np.float64))
            if self.layer_weights is not None:
                out["layer_weights"] = torch.from_numpy(np.asarray(self.layer_weights, np.float64))
        return out

    def layer_distances(self, features: np.ndarray, penultimate: np.ndarray) -> np.ndarray:
        """(N, n_stages + 1): each stage's Mahalanobis distance, then the penultimate one."""
        assert self.layer_mean is not None and self.layer_precision is not None
        x = np.asarray(features[:, self.dim :], np.float64)
        if not len(x):
            return np.zeros((0, len(self.layer_mean) + 1))
        if x.shape[1] != sum(len(m) for m in self.layer_mean):
            raise MedxferError(
                f"the features have {x.shape[1]} stage-statistic columns, the detector expects "
                f"{sum(len(m) for m in self.layer_mean)}",
                "refit the run's trust statistics with `medxfer trust RUN`",
            )
        cols, start = [], 0
        for m, p in zip(self.layer_mean, self.layer_precision, strict=True):
            d = x[:, start : start + len(m)] - m
            cols.append(np.einsum("nd,de,ne->n", d, np.asarray(p, np.float64), d))
            start += len(m)
        return np.stack([*cols, penultimate], axis=1)

    def standardise_layers(self, val_features: np.ndarray) -> None:
        """Set each depth's standardisation from the validation images, and the depths'
        weights (call once, after fitting on training images)."""
        if self.layer_mean is None:
            return
        d = self.layer_distances(val_features, self._mahalanobis(val_features))
        self.layer_loc, self.layer_scale = d.mean(0), np.clip(d.std(0), 1e-12, None)
        self.layer_weights = depth_weights(d.shape[1])

    def _mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """pytorch-ood's Mahalanobis score of the penultimate columns."""
        from pytorch_ood.detector import Mahalanobis

        z = torch.from_numpy(np.ascontiguousarray(features[:, : self.dim], np.float32))
        maha = Mahalanobis(None)
        maha.mu, maha.precision = torch.from_numpy(self.mu), torch.from_numpy(self.precision)
        return maha.predict_features(z).double().numpy()

    def scores(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Every detector's score per image (higher = more unusual); ``layers`` only where it
        was fitted and standardised."""
        from pytorch_ood.detector import KNN, EnergyBased, MaxSoftmax, ViM

        if not len(features):  # pytorch-ood's Mahalanobis cannot reshape an empty batch
            fitted = self.layer_loc is not None and self.layer_scale is not None
            return {d: np.zeros(0) for d in DETECTORS if d != "layers" or fitted}
        z = torch.from_numpy(np.ascontiguousarray(features[:, : self.dim], np.float32))
        lg = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        knn = KNN(None, k=min(self.k, len(self.bank)), normalize=True)
        knn.knn.set_params(n_jobs=1)
        knn.fit_features(torch.from_numpy(self.bank), torch.zeros(len(self.bank)))
        vim = ViM(None, self.vim_null.shape[0] - self.vim_null.shape[1],
                  torch.from_numpy(self.vim_w), torch.from_numpy(self.vim_b))  # fmt: skip
        vim.principal_subspace, vim.alpha = torch.from_numpy(self.vim_null), self.vim_alpha
        got = {
            "msp": MaxSoftmax.score(lg).double().numpy(),
            "energy": EnergyBased.score(lg).double().numpy(),
            "mahalanobis": self._mahalanobis(features),
            "knn": knn.predict_features(z).double().numpy(),
            "vim": vim.predict_features(z).double().numpy(),
        }
        if self.layer_loc is not None and self.layer_scale is not None:
            d = self.layer_distances(features, got["mahalanobis"])
            std = (d - self.layer_loc) / self.layer_scale
            w = self.layer_weights
            got["layers"] = std.mean(1) if w is None else std @ np.asarray(w, np.float64)
        return got


def depth_weights(n_depths: int, share: float = PENULTIMATE_SHARE) -> np.ndarray:
    """``layers``' weights over (stages..., penultimate): ``share`` for the penultimate
    distance, the rest equally over the stages."""
    if n_depths < 2:
        return np.ones(n_depths)
    w = np.full(n_depths, (1.0 - share) / (n_depths - 1))
    w[-1] = share
    return w


def fit_detectors(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    k: int = 10,
    bank_size: int = 5000,
    seed: int = 0,
    stage_dims: tuple[int, ...] = (),
) -> Detectors:
    """Fit every feature detector on training features (N, D [+ S stage statistics]) with
    labels 0..C-1, given the head's ``weight`` (C, D) and ``bias`` (C,) and the widths of the
    stage statistics (``stage_dims``: 2 x each stage's channels; empty: no ``layers``). The
    ``layers`` detector still needs ``Detectors.standardise_layers`` on validation images."""
    from pytorch_ood.detector import ViM
    from sklearn.covariance import LedoitWolf

    dim = weight.shape[1]
    stats = np.asarray(features[:, dim:], np.float64)
    z = np.asarray(features[:, :dim], np.float64)
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
    if sum(stage_dims) != stats.shape[1]:
        raise ValueError(f"stage widths {stage_dims} do not add up to {stats.shape[1]} columns")
    layer_mean, layer_precision = [], []
    start = 0
    for width in stage_dims:  # one class-agnostic Gaussian per stage
        block = stats[:, start : start + width]
        layer_mean.append(block.mean(0).astype(np.float32))
        layer_precision.append(LedoitWolf().fit(block).precision_.astype(np.float32))
        start += width
    return Detectors(
        mu=mu.astype(np.float32), precision=precision.astype(np.float32),
        bank=bank.astype(np.float32), vim_w=weight.astype(np.float32),
        vim_b=bias.astype(np.float32), vim_null=vim.principal_subspace.numpy(),
        vim_alpha=float(vim.alpha), k=int(min(k, len(bank))),
        layer_mean=layer_mean or None, layer_precision=layer_precision or None,
    )  # fmt: skip


def detectors_from(tensors: dict[str, torch.Tensor], vim_alpha: float, k: int) -> Detectors:
    arrays = {name: t.numpy() for name, t in tensors.items()}
    n = sum(1 for name in arrays if name.startswith("layer_mean_"))
    return Detectors(
        mu=arrays["mu"], precision=arrays["precision"], bank=arrays["bank"],
        vim_w=arrays["vim_w"], vim_b=arrays["vim_b"], vim_null=arrays["vim_null"],
        vim_alpha=vim_alpha, k=k,
        layer_mean=[arrays[f"layer_mean_{i}"] for i in range(n)] or None,
        layer_precision=[arrays[f"layer_precision_{i}"] for i in range(n)] or None,
        layer_loc=arrays.get("layer_loc"), layer_scale=arrays.get("layer_scale"),
        layer_weights=arrays.get("layer_weights"),
    )  # fmt: skip


def stage_widths(
    model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray
) -> tuple[int, ...]:
    """2 x the channels of each stage (the columns its statistics take), read from one image."""
    from medxfer.evaluate.predict import preprocess_arrays

    stages = stage_modules(model, str(meta["arch"]))
    widths: list[int] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: widths.append(2 * out.shape[1]))
               for m in stages]  # fmt: skip
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(preprocess_arrays(meta, arrays[:1]).to(device))
    finally:
        for h in handles:
            h.remove()
    return tuple(widths)
