"""Per-image trust: out-of-distribution and failure scores, one flag, a conformal set.

``fit_trust(run)`` fits the detectors on the run's training images and makes every choice on
its validation images only (``trust_fit``); the run folder then holds ``trust.safetensors``
(arrays) and ``trust.json`` (thresholds, the chosen detector and the measurements that chose
it). ``load_trust(run).score(model, meta, images)`` gives each image its scores, a flag (``ok``,
``review``: in distribution but likely wrong, ``unfamiliar``: unlike the training images) and
its conformal prediction set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxfer.errors import MedxferError
from medxfer.evaluate import conformal, trust_fit
from medxfer.evaluate.trust_detectors import (
    DISTANCES,
    Detectors,
    detectors_from,
    features_and_logits,
    fit_detectors,
    head_module,
    stage_widths,
)

TRUST_JSON, TRUST_TENSORS = "trust.json", "trust.safetensors"
FLAGS = ("ok", "review", "unfamiliar")
CONFORMAL_SCORE_NAMES = {"lac": "LAC (1 - p)", "aps": "APS (mass ranked above + own)"}
PROXY_IMAGES = 500  # validation images per shifted proxy that the default detector is chosen on
FLIP_AXES = {"hflip": 2, "vflip": 1}  # axes of (N, H, W[, 3]) images; the training flips


def trained_flips(meta: dict[str, Any]) -> list[str]:
    """The flips a run was trained with (``augment.hflip``, ``augment.vflip``): the views its
    predictions are expected not to change under, as ``eval.tta`` uses them."""
    augment = meta.get("config", {}).get("augment", {})
    return [name for name in FLIP_AXES if augment.get(name, False)]


def flips_score(
    model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray, probs: np.ndarray,
    flips: list[str], batch_size: int = 64,
) -> np.ndarray:  # fmt: skip
    """Minus the probability of each image's predicted class (the argmax of ``probs``, the
    images' own softmax), averaged over the image and its ``flips``: higher = less confident.
    Where the flipped copies disagree with the image, the prediction is less likely right."""
    from medxfer.evaluate.predict import probs_of_arrays

    pred = probs.argmax(1)
    rows = np.arange(len(pred))
    total = probs[rows, pred].astype(np.float64)
    with torch.inference_mode():
        for name in flips:
            flipped = np.ascontiguousarray(np.flip(arrays, axis=FLIP_AXES[name]))
            total += probs_of_arrays(model, meta, flipped, batch_size)[rows, pred]
    return np.asarray(-total / (1 + len(flips)))


@dataclass
class TrustScores:
    probs: np.ndarray  # (N, C) softmax
    pred: np.ndarray  # (N,) argmax class index
    scores: dict[str, np.ndarray]  # detector -> (N,), higher = more unusual
    ood_score: np.ndarray  # (N,) the chosen detector's score
    failure_score: np.ndarray  # (N,) higher = more likely wrong
    flag: np.ndarray  # (N,) str in FLAGS
    sets: np.ndarray  # (N, C) bool conformal prediction sets


@dataclass
class TrustModel:
    detectors: Detectors
    record: dict[str, Any]  # what trust.json holds
    refs: dict[str, np.ndarray]  # validation msp / distance, sorted (rank_mean failure score)
    cal_scores: np.ndarray  # validation nonconformity of the true class (record's conformal_score)
    cal_labels: np.ndarray

    def views(self) -> list[str]:
        """The flips the failure score's confidence averages over (none: one view)."""
        return list(self.record["failure"].get("confidence", {}).get("flips", []))

    def score_features(self, features: np.ndarray, logits: np.ndarray,
                       flips: np.ndarray | None = None) -> TrustScores:  # fmt: skip
        """Scores from features and logits; ``flips``: ``flips_score`` of the same images,
        needed when the failure score's confidence averages over flips."""
        r = self.record
        scores = self.detectors.scores(features, logits)
        ood = scores[r["ood_detector"]]
        conf = trust_fit.confidence_score(r["failure"], scores["msp"], logits, flips)
        failure = trust_fit.failure_score(r["failure"], conf, ood, self.refs)
        probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
        sets = conformal.prediction_sets(self.cal_scores, self.cal_labels, probs,
                                         r["coverage"], r["class_conditional"],
                                         score=r.get("conformal_score", "lac"))  # fmt: skip
        return TrustScores(
            probs=probs, pred=probs.argmax(1), scores=scores, ood_score=ood,
            failure_score=failure, sets=sets,
            flag=trust_fit.flags(ood, failure, r["ood_threshold"], r["review_threshold"]),
        )  # fmt: skip

    def score(self, model: torch.nn.Module, meta: dict[str, Any], arrays: np.ndarray,
              batch_size: int = 64) -> TrustScores:  # fmt: skip
        features, logits = features_and_logits(model, meta, arrays, batch_size)
        flips = None
        if self.views():
            probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
            flips = flips_score(model, meta, arrays, probs, self.views(), batch_size)
        return self.score_features(features, logits, flips)

    def save(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        from medxfer.train.checkpoint import atomic_write_json

        tensors = self.detectors.tensors() | {
            n: torch.from_numpy(np.ascontiguousarray(a, np.float64))
            for n, a in (self.refs | {"cal_scores": self.cal_scores}).items()
        }
        tensors["cal_labels"] = torch.from_numpy(np.ascontiguousarray(self.cal_labels, np.int64))
        tmp = run_dir / (TRUST_TENSORS + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(run_dir / TRUST_TENSORS)
        atomic_write_json(self.record, run_dir / TRUST_JSON)  # last: marks the fit complete


def load_trust(run_dir: Path) -> TrustModel:
    """The trust statistics of a run folder (written by training or ``medxfer trust``)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / TRUST_JSON).is_file() or not (run_dir / TRUST_TENSORS).is_file():
        raise MedxferError(
            f"{run_dir} has no trust statistics ({TRUST_JSON}, {TRUST_TENSORS})",
            f"compute them with `medxfer trust {run_dir}` (needs the run's training data)",
        )
    record = json.loads((run_dir / TRUST_JSON).read_text())
    t = load_file(str(run_dir / TRUST_TENSORS))
    det = detectors_from(t, record["vim_alpha"], record["knn_k"])
    refs = {n: t[n].numpy() for n in ("ref_msp", "ref_dist")}
    return TrustModel(det, record, refs, t["cal_scores"].numpy(), t["cal_labels"].numpy())


def fit_on_arrays(
    model: torch.nn.Module, meta: dict[str, Any], train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray], *, acceptance: float = 0.95, coverage: float = 0.90,
    class_conditional: bool = False, ood_share: float = 0.5, k: int = 10,
    bank_size: int = 5000, seed: int = 0, batch_size: int = 64, detector: str = "auto",
    conformal_score: str = "lac",
) -> TrustModel:  # fmt: skip
    """Fit on (images, labels) of the training split (at most ``bank_size`` of them, seeded)
    and choose on those of the validation split."""
    from medxfer.evaluate.trust_proxies import proxy_shifts

    _check(acceptance, coverage, ood_share, len(val[0]))
    _check_score(conformal_score)  # before minutes of feature extraction
    model.eval()
    keep = _subsample(train[1], bank_size, seed)
    train_f, _ = features_and_logits(model, meta, train[0][keep], batch_size)
    val_f, val_logits = features_and_logits(model, meta, val[0], batch_size)
    head = head_module(model, str(meta["arch"]))
    det = fit_detectors(train_f, train[1][keep], head.weight.detach().cpu().double().numpy(),
                        head.bias.detach().cpu().double().numpy(), k=k, seed=seed,
                        stage_dims=stage_widths(model, meta, val[0]))  # fmt: skip
    det.standardise_layers(val_f)
    val_scores = det.scores(val_f, val_logits)
    views = trained_flips(meta)
    val_flips = None
    if views:  # a candidate confidence: the mean over the training flips
        val_probs = torch.softmax(torch.from_numpy(val_logits).double(), 1).numpy()
        val_flips = flips_score(model, meta, val[0], val_probs, views, batch_size)
    few = val[0][_subsample(val[1], PROXY_IMAGES, seed)]
    proxies = {
        name: det.scores(*features_and_logits(model, meta, arrays, batch_size))
        for name, arrays in proxy_shifts(few, seed).items()
    }
    return fit_from_scores(
        det, val_scores, val_logits, val[1], proxies, acceptance=acceptance, coverage=coverage,
        class_conditional=class_conditional, ood_share=ood_share, seed=seed,
        n_train=len(keep), classes=list(meta["classes"]), detector=detector,
        val_flips=(views, val_flips) if val_flips is not None else None,
        conformal_score=conformal_score,
    )  # fmt: skip


def _subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``n`` of ``labels`` (seeded), with at least two of every
    class present (so that each class keeps a mean to measure distances to)."""
    keep = np.random.default_rng(seed).permutation(len(labels))[:n]
    for c in np.unique(labels):
        if (labels[keep] == c).sum() < 2:
            keep = np.r_[keep, np.flatnonzero(labels == c)[:2]]
    return np.unique(keep)


def fit_from_scores(
    det: Detectors, val_scores: dict[str, np.ndarray], val_logits: np.ndarray,
    val_labels: np.ndarray, proxies: dict[str, dict[str, np.ndarray]], *, acceptance: float,
    coverage: float, class_conditional: bool, ood_share: float, seed: int, n_train: int,
    classes: list[str], detector: str = "auto",
    val_flips: tuple[list[str], np.ndarray] | None = None, conformal_score: str = "lac",
) -> TrustModel:  # fmt: skip
    """Every choice, from validation scores (and those of its shifted proxies) only;
    ``detector`` other than auto fixes the ``unfamiliar`` detector (still measured);
    ``val_flips``: the training flips and the validation images' ``flips_score``, a candidate
    confidence for the failure score."""
    chosen, table = trust_fit.choose_detector(val_scores, proxies)
    if detector != "auto":
        if detector not in table or detector not in DISTANCES:
            raise MedxferError(
                f"trust.detector={detector} is not available for this model",
                f"use auto or one of {', '.join(d for d in DISTANCES if d in table)}",
            )
        chosen = detector
    probs = torch.softmax(torch.from_numpy(val_logits).double(), 1).numpy()
    correct = probs.argmax(1) == val_labels
    msp, dist = val_scores["msp"], val_scores[chosen]
    failure, measured, conf = trust_fit.fit_failure(msp, dist, correct, seed, val_logits,
                                                    val_flips)  # fmt: skip
    refs = {"ref_msp": np.sort(conf), "ref_dist": np.sort(dist)}  # ref_msp: the confidence's
    fail = trust_fit.failure_score(failure, conf, dist, refs)
    t_ood, t_review = trust_fit.thresholds(dist, fail, acceptance, ood_share)
    flag = trust_fit.flags(dist, fail, t_ood, t_review)
    _check_score(conformal_score)
    cal = conformal.calibration_scores(probs, val_labels, conformal_score)
    record: dict[str, Any] = {
        "classes": classes, "acceptance": acceptance, "ood_share": ood_share,
        "coverage": coverage, "class_conditional": class_conditional,
        "ood_detector": chosen, "ood_threshold": t_ood, "review_threshold": t_review,
        "ood_detector_from": ("validation proxies" if detector == "auto"
                              else "trust.detector"),
        "failure": failure, "knn_k": det.k, "vim_alpha": det.vim_alpha,
        "layers_weights": (None if det.layer_weights is None  # stages..., then penultimate
                           else [round(float(w), 6) for w in det.layer_weights]),
        "conformal_score": conformal_score,
        "conformal": {"score": CONFORMAL_SCORE_NAMES[conformal_score], "library": "crepes",
                      "empty_sets": "allowed",
                      "thresholds": conformal.thresholds(cal, val_labels, len(classes), coverage,
                                                         class_conditional),
                      "validation_crossfit": conformal.validation_crossfit(
                          probs, np.asarray(val_labels), coverage, class_conditional,
                          seed=seed, score=conformal_score)},
        "fitted_on": {"train_images": n_train, "validation_images": len(val_labels)},
        "validation": {
            "detectors_vs_proxy_shifts": table, "failure_score": measured,
            "flags": {f: float((flag == f).mean()) for f in FLAGS},
            "accuracy": float(correct.mean()),
            "accepted_accuracy": float(correct[flag == "ok"].mean()),
        },
    }  # fmt: skip
    return TrustModel(det, record, refs, cal, np.asarray(val_labels, np.int64))


def _check_score(conformal_score: str) -> None:
    if conformal_score not in conformal.SCORES:
        raise MedxferError(
            f"trust.conformal_score={conformal_score} is not a conformal score",
            f"use one of {', '.join(conformal.SCORES)}",
        )


def _check(acceptance: float, coverage: float, ood_share: float, n_val: int) -> None:
    if not 0 < acceptance < 1 or not 0 < coverage < 1 or not 0 <= ood_share <= 1:
        raise MedxferError(
            f"acceptance {acceptance} and coverage {coverage} must lie in (0, 1), ood_share "
            f"{ood_share} in [0, 1]",
            "e.g. --acceptance 0.95 --coverage 0.9",
        )
    if n_val < 20:
        raise MedxferError(
            f"only {n_val} validation images: too few to choose trust thresholds on",
            "raise data.val_fraction",
        )


def fit_trust(
    run_dir: Path, *, acceptance: float = 0.95, coverage: float = 0.90,
    class_conditional: bool = False, ood_share: float = 0.5, k: int = 10,
    detector: str = "auto", conformal_score: str = "lac",
) -> TrustModel:  # fmt: skip
    """Fit a finished run's trust statistics from its training and validation images (the
    data split exactly as training made it; never the test images) and write them into the
    run folder."""
    from medxfer.evaluate.trust_run import run_split_arrays

    run_dir = Path(run_dir)
    model, meta, arrays = run_split_arrays(run_dir, ("train", "val"))
    seed, bank = run_settings(meta)
    tm = fit_on_arrays(model, meta, arrays["train"], arrays["val"], acceptance=acceptance,
                       coverage=coverage, class_conditional=class_conditional,
                       ood_share=ood_share, k=k, seed=seed, bank_size=bank,
                       detector=detector, conformal_score=conformal_score)  # fmt: skip
    tm.save(run_dir)
    return tm


def run_settings(meta: dict[str, Any]) -> tuple[int, int]:
    """The run's seed and ``trust.train_images`` (defaults for runs older than the key)."""
    cfg = meta.get("config", {})
    return int(cfg.get("train", {}).get("seed", 0)), int(
        cfg.get("trust", {}).get("train_images", 5000)
    )
