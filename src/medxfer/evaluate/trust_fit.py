"""Choices made on validation only: the default detector, the failure score and the thresholds.

* The ``unfamiliar`` detector is the feature distance (Mahalanobis, kNN, ViM, or ``layers``:
  Mahalanobis distances at several depths) that best tells
  validation images from shifted copies of themselves (uniform noise, inverted intensities,
  blur, resolution loss): mean AUROC over those proxies, ties to the earlier in ``DISTANCES``.
* The failure score combines a confidence with that distance, either as the mean of their
  percentiles among validation images (``rank_mean``) or as a logistic regression of the error
  on both (``logistic``, measured cross-fitted on validation, then refitted on all of it). The
  confidence is MSP or MaxLogit-pNorm (the largest centred logit over the logits' p-norm;
  Cattelan & Silva, "How to fix a broken confidence estimator", 2024), whose ``p`` is chosen
  on validation, or, for a run trained with flips, the predicted class's probability averaged
  over the image and its flipped copies (``flips``; test-time augmentation as a confidence,
  the prediction itself unchanged). Every pair is measured cross-fitted (``p`` chosen inside
  each fold) and the one with the lowest validation AUGRC is kept. MSP alone is measured
  beside them.
* Thresholds: ``ood_share`` of the rejection budget ``1 - acceptance`` goes to ``unfamiliar``
  (a validation quantile of the distance), the rest to ``review`` (a threshold on the failure
  score among familiar validation images), so that ``acceptance`` of validation ends ``ok``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medxfer.evaluate.selective import augrc, ood_auroc_fpr95
from medxfer.evaluate.trust_detectors import DETECTORS, DISTANCES

MIN_ERRORS_FOR_LOGISTIC = 10  # fewer validation errors: a 2-feature fit is noise, rank_mean only
PNORM_PS = tuple(range(1, 11))  # MaxLogit-pNorm's candidate p (the paper's grid)


def choose_detector(
    val: dict[str, np.ndarray], proxies: dict[str, dict[str, np.ndarray]]
) -> tuple[str, dict[str, Any]]:
    """The distance detector with the best mean AUROC, validation against each proxy shift,
    and the table of every detector's AUROC / FPR@95 per proxy."""
    table: dict[str, dict[str, Any]] = {}
    for name in [d for d in DETECTORS if d in val]:  # ``layers``: not for every run
        per = {p: ood_auroc_fpr95(val[name], s[name]) for p, s in proxies.items()}
        table[name] = {
            "auroc": {p: round(a, 4) for p, (a, _) in per.items()},
            "fpr95": {p: round(f, 4) for p, (_, f) in per.items()},
            "mean_auroc": round(float(np.mean([a for a, _ in per.values()])), 4),
        }
    best = max([d for d in DISTANCES if d in table],
               key=lambda n: (table[n]["mean_auroc"], -DISTANCES.index(n)))  # fmt: skip
    return best, table


def percentile(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of ``reference`` (sorted) at or below each value."""
    return np.searchsorted(reference, values, side="right") / max(len(reference), 1)


def pnorm_score(logits: np.ndarray, p: float) -> np.ndarray:
    """MaxLogit-pNorm as an unusualness score (higher = less confident): minus the largest
    centred logit divided by the centred logits' p-norm."""
    z = logits - logits.mean(1, keepdims=True)
    norm = np.clip(np.linalg.norm(z, ord=p, axis=1), 1e-12, None)
    return np.asarray(-z.max(1) / norm)


def confidence_score(params: dict[str, Any], msp: np.ndarray, logits: np.ndarray | None,
                     flips: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The failure score's confidence input (higher = less confident): MSP's score,
    MaxLogit-pNorm's at the chosen p, or ``flips`` (the predicted class's probability averaged
    over the image and its training flips); runs older than that choice used MSP."""
    conf = params.get("confidence", {"kind": "msp"})
    if conf["kind"] == "msp":
        return msp
    if conf["kind"] == "flips":
        if flips is None:
            raise ValueError("the flips confidence needs the flipped images' scores")
        return flips
    if logits is None:
        raise ValueError("MaxLogit-pNorm needs the logits")
    return pnorm_score(logits, float(conf["p"]))


def _best_p(logits: np.ndarray, correct: np.ndarray) -> int:
    """The p of MaxLogit-pNorm with the lowest AUGRC on these images (ties: smaller p)."""
    return min(PNORM_PS, key=lambda p: (augrc(correct, -pnorm_score(logits, p)), p))


def failure_score(params: dict[str, Any], msp: np.ndarray, dist: np.ndarray,
                  refs: dict[str, np.ndarray]) -> np.ndarray:  # fmt: skip
    """P(error)-like score, higher = more likely wrong, from ``params`` (``fit_failure``)."""
    if params["method"] == "rank_mean":
        return 0.5 * (percentile(refs["ref_msp"], msp) + percentile(refs["ref_dist"], dist))
    x = _standard(params, msp, dist)
    z = x @ np.asarray(params["coef"]) + float(params["intercept"])
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def _standard(params: dict[str, Any], msp: np.ndarray, dist: np.ndarray) -> np.ndarray:
    x = np.stack([msp, dist], axis=1)
    return (x - np.asarray(params["mean"])) / np.asarray(params["std"])


def _logistic(msp: np.ndarray, dist: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    x = np.stack([msp, dist], axis=1)
    params: dict[str, Any] = {"method": "logistic", "mean": x.mean(0).tolist(),
                              "std": np.clip(x.std(0), 1e-12, None).tolist()}  # fmt: skip
    lr = LogisticRegression().fit(_standard(params, msp, dist), wrong)
    return params | {"coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])}


def fit_failure(
    msp: np.ndarray, dist: np.ndarray, correct: np.ndarray, seed: int = 0,
    logits: np.ndarray | None = None, flips: tuple[list[str], np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:  # fmt: skip
    """The failure score's parameters, the validation measurements that chose them, and the
    chosen confidence score of the validation images (the reference for ``rank_mean``);
    ``flips``: the training flips and the images' ``trust.flips_score`` (a candidate)."""
    from sklearn.model_selection import StratifiedKFold

    wrong = ~correct.astype(bool)
    measured: dict[str, Any] = {"msp_augrc": augrc(correct, -msp),
                                "validation_errors": int(wrong.sum())}  # fmt: skip
    enough = min(int(wrong.sum()), int((~wrong).sum())) >= MIN_ERRORS_FOR_LOGISTIC
    kinds = ["msp"] + (["pnorm"] if logits is not None and enough else [])
    fixed = {"msp": msp}  # the confidences without a parameter to choose
    if flips is not None:
        kinds.append("flips")
        fixed["flips"] = flips[1]
        measured["flips_augrc"] = augrc(correct, -flips[1])
    combiners = ["rank_mean"] + (["logistic"] if enough else [])
    if not enough:
        measured["logistic"] = measured["pnorm"] = (
            f"not tried: fewer than {MIN_ERRORS_FOR_LOGISTIC} validation errors (or correct "
            "predictions) to fit them on"
        )
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(msp, wrong))
    results: dict[str, float] = {}
    for kind in kinds:
        for comb in combiners:
            name = comb if kind == "msp" else f"{kind}_{comb}"
            if kind in fixed and comb == "rank_mean":  # no parameter: measured on all of val
                c = fixed[kind]
                refs = {"ref_msp": np.sort(c), "ref_dist": np.sort(dist)}
                results[name] = augrc(correct, -failure_score({"method": comb}, c, dist, refs))
                continue
            out = np.zeros(len(msp))
            for fit_idx, out_idx in folds:
                conf = fixed.get(kind, msp)
                if kind == "pnorm":
                    assert logits is not None
                    conf = pnorm_score(logits, _best_p(logits[fit_idx], correct[fit_idx]))
                refs = {"ref_msp": np.sort(conf[fit_idx]), "ref_dist": np.sort(dist[fit_idx])}
                params = (_logistic(conf[fit_idx], dist[fit_idx], wrong[fit_idx])
                          if comb == "logistic" else {"method": comb})  # fmt: skip
                out[out_idx] = failure_score(params, conf[out_idx], dist[out_idx], refs)
            results[name] = augrc(correct, -out)
    in_sample = [("rank_mean" if k == "msp" else f"{k}_rank_mean") for k in fixed]
    measured |= {f"{n}_{'augrc' if n in in_sample else 'crossfit_augrc'}": v
                 for n, v in results.items()}  # fmt: skip
    chosen = min(results, key=lambda n: (results[n], list(results).index(n)))
    comb = chosen.removeprefix("pnorm_").removeprefix("flips_")
    confidence: dict[str, Any] = {"kind": "msp"}
    conf = msp
    if chosen.startswith("flips_") and flips is not None:
        confidence, conf = {"kind": "flips", "flips": list(flips[0])}, flips[1]
    elif chosen.startswith("pnorm_"):
        assert logits is not None
        p = _best_p(logits, correct)
        confidence, conf = {"kind": "pnorm", "p": p}, pnorm_score(logits, p)
    params = _logistic(conf, dist, wrong) if comb == "logistic" else {"method": comb}
    return params | {"confidence": confidence}, measured | {"chosen": chosen}, conf


def upper_quantile(values: np.ndarray, q: float) -> float:
    """The smallest value with at least ``q`` of ``values`` at or below it."""
    s = np.sort(values)
    return float(s[min(len(s), max(1, math.ceil(q * len(s)))) - 1])


def thresholds(
    ood: np.ndarray, failure: np.ndarray, acceptance: float, ood_share: float
) -> tuple[float, float]:
    """(unfamiliar threshold on ``ood``, review threshold on ``failure``) such that
    ``1 - ood_share * (1 - acceptance)`` of validation is familiar and ``acceptance`` ends ok."""
    t_ood = upper_quantile(ood, 1.0 - ood_share * (1.0 - acceptance))
    familiar = failure[ood <= t_ood]
    n_ok = max(1, math.ceil(acceptance * len(ood)))
    if n_ok >= len(familiar):
        return t_ood, math.inf
    return t_ood, float(np.sort(familiar)[n_ok - 1])


def flags(ood: np.ndarray, failure: np.ndarray, t_ood: float, t_review: float) -> np.ndarray:
    """``unfamiliar`` beyond the distance threshold, else ``review`` beyond the failure one."""
    return np.where(ood > t_ood, "unfamiliar", np.where(failure > t_review, "review", "ok"))
