"""Per-image trust: detector scores, selective metrics, conformal coverage, validation-only
thresholds, far-OOD flags on a trained demo model, and trust for old runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import shared_dataset
from scipy.special import logsumexp, softmax

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.evaluate import conformal, selective
from medxfer.evaluate.trust_detectors import PENULTIMATE_SHARE, Detectors, fit_detectors

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=3",
    "train.batch_size=16", "eval.n_bootstrap=20", "train.steps_per_epoch=10", "train.threads=1",
]  # fmt: skip


def _tiny() -> tuple[Detectors, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z_train = rng.normal(size=(40, 6))
    y_train = np.repeat([0, 1, 2], [14, 13, 13])
    z_train[y_train == 1] += 2.0
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    det = fit_detectors(z_train, y_train, w, b, k=3)
    z = rng.normal(size=(5, 6)) * 2
    return det, z.astype(np.float32), (z @ w.T + b).astype(np.float32)


def test_detector_scores_equal_hand_computed_values() -> None:
    from sklearn.covariance import LedoitWolf

    det, z, logits = _tiny()
    got = det.scores(z, logits)
    np.testing.assert_allclose(got["msp"], -softmax(logits, 1).max(1), rtol=1e-5)
    np.testing.assert_allclose(got["energy"], -logsumexp(logits, 1), rtol=1e-5)
    maha = [0.5 * min((x - m) @ det.precision @ (x - m) for m in det.mu) for x in z]
    np.testing.assert_allclose(got["mahalanobis"], maha, rtol=1e-4)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    kth = np.sort(np.linalg.norm(unit[:, None] - det.bank[None], axis=2), axis=1)[:, det.k - 1]
    np.testing.assert_allclose(got["knn"], kth, rtol=1e-5)
    u = -np.linalg.pinv(det.vim_w) @ det.vim_b
    vlogit = det.vim_alpha * np.linalg.norm((z - u) @ det.vim_null, axis=1)
    np.testing.assert_allclose(got["vim"], vlogit - logsumexp(logits, 1), rtol=1e-4, atol=1e-4)
    # the fitted statistics themselves: class means and the inverse Ledoit-Wolf covariance
    rng = np.random.default_rng(0)
    z_train = rng.normal(size=(40, 6))
    y = np.repeat([0, 1, 2], [14, 13, 13])
    z_train[y == 1] += 2.0
    mu = np.stack([z_train[y == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(det.mu, mu, rtol=1e-5)
    lw = LedoitWolf(assume_centered=True).fit(z_train - mu[y])
    np.testing.assert_allclose(det.precision, lw.precision_, rtol=1e-4)


def test_layers_detector_equals_hand_computed_values() -> None:
    """``layers``: per-stage Ledoit-Wolf Mahalanobis of the stage statistics and the
    penultimate Mahalanobis, each standardised on validation, weighted (the penultimate
    ``PENULTIMATE_SHARE``, the stages the rest); it survives the safetensors round trip, and a
    run stored without weights averages the depths equally, as it was fitted to."""
    from sklearn.covariance import LedoitWolf

    from medxfer.evaluate.trust_detectors import detectors_from

    rng = np.random.default_rng(1)
    pen, dims = 6, (4, 2)
    train = rng.normal(size=(60, pen + sum(dims)))
    y = np.repeat([0, 1, 2], 20)
    w, b = rng.normal(size=(3, pen)), rng.normal(size=3)
    det = fit_detectors(train, y, w, b, k=3, stage_dims=dims)
    val = rng.normal(size=(30, pen + sum(dims)))
    val_logits = val[:, :pen] @ w.T + b
    assert "layers" not in det.scores(val, val_logits)  # not standardised yet
    det.standardise_layers(val)
    x = rng.normal(size=(5, pen + sum(dims))) * 3
    logits = x[:, :pen] @ w.T + b

    def hand(rows: np.ndarray) -> np.ndarray:
        cols = []
        for lo, hi in ((pen, pen + 4), (pen + 4, pen + 6)):
            lw = LedoitWolf().fit(train[:, lo:hi])
            d = rows[:, lo:hi] - train[:, lo:hi].mean(0)
            cols.append(np.einsum("nd,de,ne->n", d, lw.precision_, d))
        cols.append(det.scores(rows, rows[:, :pen] @ w.T + b)["mahalanobis"])
        return np.stack(cols, 1)

    ref = hand(val)
    z = (hand(x) - ref.mean(0)) / ref.std(0)
    share = PENULTIMATE_SHARE
    want = share * z[:, 2] + (1 - share) * z[:, :2].mean(1)  # two stages, then penultimate
    got = det.scores(x, logits)
    np.testing.assert_allclose(got["layers"], want, rtol=1e-3, atol=1e-3)
    back = detectors_from(det.tensors(), det.vim_alpha, det.k)
    np.testing.assert_allclose(back.scores(x, logits)["layers"], want, rtol=1e-3, atol=1e-3)
    older = {n: t for n, t in det.tensors().items() if n != "layer_weights"}
    old = detectors_from(older, det.vim_alpha, det.k)  # fitted before the weights were stored
    np.testing.assert_allclose(old.scores(x, logits)["layers"], z.mean(1), rtol=1e-3, atol=1e-3)
    with pytest.raises(MedxferError, match="columns"):  # features of another architecture
        det.scores(x[:, :-1], logits)
    empty = det.scores(x[:0], logits[:0])  # e.g. a batch with no images left
    assert set(empty) == set(got) and all(len(v) == 0 for v in empty.values())


def test_selective_metrics_hand_computed() -> None:
    correct = np.array([1, 0, 1, 1], bool)
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    cov, risk = selective.risk_coverage(correct, conf)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 0.5, 1 / 3, 0.25])
    assert selective.aurc(correct, conf) == pytest.approx((0.5 + 1 / 3 + 0.25) / 4)
    assert selective.augrc(correct, conf) == pytest.approx(0.75 / 4)
    assert selective.errors_flagged(correct, np.array([1, 0, 1, 0], bool)) == 1.0
    assert selective.accepted_accuracy(correct, np.array([1, 1, 0, 0], bool)) == 0.5
    auroc, fpr = selective.ood_auroc_fpr95(np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.5, 1.0]))
    assert auroc == pytest.approx(7 / 8)
    assert fpr == pytest.approx(0.25)


def _calibrated_draw(
    rng: np.random.Generator, n: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs and labels drawn from them (a calibrated model; sharper with ``scale``)."""
    probs = softmax(rng.normal(size=(n, 4)) * scale, axis=1)
    return probs, np.array([rng.choice(4, p=p) for p in probs])


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("class_conditional", [False, True])
def test_conformal_coverage_on_exchangeable_data(class_conditional: bool, score: str) -> None:
    rng = np.random.default_rng(1)
    cal_p, cal_y = _calibrated_draw(rng, 2000, 2.0)
    test_p, test_y = _calibrated_draw(rng, 4000, 2.0)
    cal = conformal.calibration_scores(cal_p, cal_y, score)
    if score == "lac":
        np.testing.assert_allclose(cal, 1 - cal_p[np.arange(2000), cal_y])
    sets = conformal.prediction_sets(cal, cal_y, test_p, 0.9, class_conditional, score=score)
    rep = conformal.coverage_report(sets, test_y, list("abcd"))
    assert abs(rep["coverage"] - 0.9) < 0.02
    if class_conditional:
        assert all(abs(v - 0.9) < 0.04 for v in rep["coverage_per_class"].values())
    else:  # the set is exactly the classes with a score at or below the stored threshold
        (t,) = conformal.thresholds(cal, cal_y, 4, 0.9)
        np.testing.assert_array_equal(sets, conformal.nonconformity(test_p, score) <= t)


def test_aps_scores_hand_computed() -> None:
    """APS: the mass of the classes ranked above a class plus its own (ties: lower index first)."""
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    want = np.array([[0.6, 0.9, 1.0], [1.0, 0.5, 0.8], [0.4, 0.8, 1.0]])
    np.testing.assert_allclose(conformal.nonconformity(probs, "aps"), want)
    np.testing.assert_allclose(conformal.calibration_scores(probs, np.array([1, 2, 1]), "aps"),
                               [0.9, 0.8, 0.8])  # fmt: skip
    with pytest.raises(ValueError, match="unknown conformal score"):
        conformal.nonconformity(probs, "raps")


def test_aps_sets_grow_when_a_shift_flattens_the_softmax() -> None:
    """New images on which the model is less sure than on validation (logits shrunk, labels
    still drawn from the sharp model): LAC lets fewer classes in and under-covers; APS lets
    more in and keeps closer to nominal."""
    rng = np.random.default_rng(3)
    cal_p, cal_y = _calibrated_draw(rng, 2000, 6.0)
    logits = rng.normal(size=(4000, 4)) * 6.0
    new_y = np.array([rng.choice(4, p=p) for p in softmax(logits, axis=1)])
    flat = softmax(logits / 3.0, axis=1)
    cover = {}
    for score in ("lac", "aps"):
        cal = conformal.calibration_scores(cal_p, cal_y, score)
        sets = conformal.prediction_sets(cal, cal_y, flat, 0.9, score=score)
        cover[score] = conformal.coverage_report(sets, new_y, list("abcd"))["coverage"]
    assert cover["lac"] < 0.85 and cover["aps"] > cover["lac"] + 0.05


def test_empty_sets_go_to_the_least_sure_images_with_lac_and_the_surest_with_aps() -> None:
    """A model more accurate than the coverage asks gives some images no class. With LAC they
    are the least sure (no class reaches the threshold); with APS the surest (the top class's
    own mass passes it). The review page words an empty set accordingly."""
    from medxfer.evaluate.review_page import EMPTY_SET, _card, empty_set_note

    rng = np.random.default_rng(4)
    cal_p, cal_y = _calibrated_draw(rng, 2000, 15.0)
    test_p, _ = _calibrated_draw(rng, 4000, 15.0)
    top = test_p.max(1)
    for score, surest in (("lac", False), ("aps", True)):
        cal = conformal.calibration_scores(cal_p, cal_y, score)
        empty = ~conformal.prediction_sets(cal, cal_y, test_p, 0.9, score=score).any(1)
        assert 0.01 < empty.mean() < 0.2
        if surest:
            assert top[empty].min() > np.quantile(top[~empty], 0.8)
        else:
            assert top[empty].max() < np.quantile(top[~empty], 0.2)
    assert empty_set_note(None) == EMPTY_SET["lac"] == empty_set_note({"coverage": 0.9})
    assert empty_set_note({"conformal_score": "aps"}) == EMPTY_SET["aps"] != EMPTY_SET["lac"]
    rec = {"flag": "ok", "probs": [0.99, 0.01], "set": [], "failure": 0.01, "ood": 0.2,
           "pred": 0, "path": "x.png", "array": np.zeros((8, 8), np.uint8)}  # fmt: skip
    card = _card(rec, None, ["a", "b"], empty_set_note({"conformal_score": "aps"}))
    assert "surer of its top class" in card and "no class fits" not in card
    assert "no class fits" in _card(rec, None, ["a", "b"])


def test_conformal_accurate_model_keeps_nominal_coverage() -> None:
    """A model more accurate than the coverage asks: standard sets (empty ones allowed) cover
    at the nominal level; filling empty sets would over-cover (coverage >= accuracy). The
    validation cross-fit sees the same on the calibration images alone."""
    rng = np.random.default_rng(2)
    cal_p, cal_y = _calibrated_draw(rng, 2000, 15.0)
    test_p, test_y = _calibrated_draw(rng, 4000, 15.0)
    assert (test_p.argmax(1) == test_y).mean() > 0.95
    cal = conformal.calibration_scores(cal_p, cal_y)
    std = conformal.coverage_report(conformal.prediction_sets(cal, cal_y, test_p, 0.9),
                                    test_y, list("abcd"))  # fmt: skip
    full = conformal.coverage_report(
        conformal.prediction_sets(cal, cal_y, test_p, 0.9, never_empty=True), test_y, list("abcd")
    )
    assert abs(std["coverage"] - 0.9) < 0.02 and std["empty"] > 0.02
    assert full["coverage"] > 0.95 and full["empty"] == 0.0
    cf = conformal.validation_crossfit(cal_p, cal_y, 0.9, repeats=5)
    assert abs(cf["standard"]["coverage"] - 0.9) < 0.02
    assert cf["never_empty"]["coverage"] > 0.95


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from medxfer.data.synthetic import make_synthetic
    from medxfer.evaluate.finish import fit_and_evaluate

    base = tmp_path_factory.mktemp("trust")
    root = make_synthetic(base / "set", size=64, seed=0)
    cfg = load_config(None, [f"data.root={root}", f"out_dir={base}", *FAST])
    metrics = fit_and_evaluate(cfg, base / "run")
    return {"run": base / "run", "root": root, "metrics": metrics}


def test_training_writes_trust_files_and_metrics(trained: dict[str, Any]) -> None:
    run = trained["run"]
    assert (run / "trust.json").is_file() and (run / "trust.safetensors").is_file()
    t = trained["metrics"]["trust"]
    assert set(t["test"]["flags"]) == {"ok", "review", "unfamiliar"}
    assert 0 < t["test"]["conformal"]["mean_set_size"] <= 4
    record = json.loads((run / "trust.json").read_text())
    assert record["validation"]["flags"]["ok"] == pytest.approx(0.95, abs=0.02)
    assert record["ood_detector"] in ("mahalanobis", "knn", "vim", "layers")
    weights = record["layers_weights"]  # the demo's resnet18: 4 stages, then the penultimate
    assert len(weights) == 5 and weights[-1] == PENULTIMATE_SHARE
    assert sum(weights) == pytest.approx(1.0)
    assert (
        json.loads((run / "metrics.json").read_text())["trust"]["ood_detector"]
        == (record["ood_detector"])
    )


def test_thresholds_come_from_validation_only(
    trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit_trust never runs the model on a test image, and refitting gives the same numbers."""
    from medxfer.evaluate import trust, trust_run

    run = trained["run"]
    before = json.loads((run / "trust.json").read_text())
    _, _, arrays = trust_run.run_split_arrays(run, ("test",))
    test_images = arrays["test"][0]
    seen: list[np.ndarray] = []
    real = trust.features_and_logits

    def spy(model: Any, meta: Any, images: np.ndarray, batch_size: int = 64) -> Any:
        seen.append(images)
        return real(model, meta, images, batch_size)

    real_flips = trust.flips_score

    def spy_flips(model: Any, meta: Any, images: np.ndarray, *args: Any) -> Any:
        seen.append(images)  # the flipped copies are made from these
        return real_flips(model, meta, images, *args)

    monkeypatch.setattr(trust, "features_and_logits", spy)
    monkeypatch.setattr(trust, "flips_score", spy_flips)
    tm = trust.fit_trust(run)
    test_rows = {bytes(im.tobytes()) for im in test_images}
    assert seen and not any(im.tobytes() in test_rows for batch in seen for im in batch)
    for key in ("ood_detector", "ood_threshold", "review_threshold", "failure", "conformal"):
        assert tm.record[key] == before[key]


def test_trust_detector_fixes_the_unfamiliar_detector(trained: dict[str, Any]) -> None:
    """``--detector`` overrides the validation choice (which is still measured and recorded);
    an unknown or non-distance detector is refused with the choices."""
    from medxfer.evaluate import trust

    run = trained["run"]
    auto = json.loads((run / "trust.json").read_text())
    assert auto["ood_detector_from"] == "validation proxies"
    fixed = "knn" if auto["ood_detector"] != "knn" else "mahalanobis"
    tm = trust.fit_trust(run, detector=fixed)
    assert tm.record["ood_detector"] == fixed and tm.record["ood_detector_from"] == "trust.detector"
    table = tm.record["validation"]["detectors_vs_proxy_shifts"]
    assert "layers" in table and table == auto["validation"]["detectors_vs_proxy_shifts"]
    with pytest.raises(MedxferError, match="not available"):
        trust.fit_trust(run, detector="msp")
    trust.fit_trust(run)  # leave the run as the other tests expect it
    assert json.loads((run / "trust.json").read_text())["ood_detector"] == auto["ood_detector"]


def _far_ood(size: int, n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:size, 0:size] / size
    smooth = [((np.sin(6 * xx * (i + 1)) * np.cos(4 * yy) + 1) * 127).astype(np.uint8)
              for i in range(n)]  # fmt: skip
    return {"noise": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
            "smooth patterns": np.stack(smooth)}  # fmt: skip


def test_far_ood_is_flagged_unfamiliar(trained: dict[str, Any]) -> None:
    from medxfer.evaluate.predict import load_trained
    from medxfer.evaluate.trust import load_trust

    model, meta = load_trained(trained["run"])
    tm = load_trust(trained["run"])
    for name, images in _far_ood(int(meta["image_size"])).items():
        flags = tm.score(model, meta, images).flag
        assert (flags == "unfamiliar").mean() >= 0.9, name


def test_other_modality_is_flagged_unfamiliar(trained: dict[str, Any]) -> None:
    from medxfer.data.io import read_image, resize
    from medxfer.evaluate.predict import load_trained
    from medxfer.evaluate.trust import load_trust

    folder = shared_dataset("brain-tumor-mri")
    files = sorted(folder.rglob("*.jpg"))[::500][:16]
    model, meta = load_trained(trained["run"])
    images = np.stack([resize(read_image(f, "gray"), 48, "pad") for f in files])
    flags = load_trust(trained["run"]).score(model, meta, images).flag
    assert (flags == "unfamiliar").mean() >= 0.9


def test_old_run_gets_trust_without_retraining(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = trained["run"]
    weights = (run / "best.pt").stat().st_mtime_ns
    for name in ("trust.json", "trust.safetensors"):
        (run / name).unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("trust")
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["trust", str(run), "--conformal-score", "aps"]) == 0
    assert (run / "trust.json").is_file() and (run / "best.pt").stat().st_mtime_ns == weights
    record = json.loads((run / "trust.json").read_text())
    assert record["conformal_score"] == "aps" and record["conformal"]["score"].startswith("APS")
    from medxfer.evaluate.trust import load_trust

    tm = load_trust(run)  # the stored calibration scores are APS's, and scoring uses them
    assert tm.cal_scores.max() <= 1.0 + 1e-9 and tm.cal_scores.min() > 0.0
    assert main(["trust", str(run)]) == 0  # back to the default
    assert json.loads((run / "trust.json").read_text())["conformal_score"] == "lac"
    assert "test" in json.loads((run / "metrics.json").read_text())["trust"]
    # predict writes each image's flag, set and scores, and the review page lists flagged first
    noise = tmp_path / "new"
    noise.mkdir()
    from PIL import Image

    for i, im in enumerate(_far_ood(48, 3)["noise"]):
        Image.fromarray(im).save(noise / f"noise{i}.png")
    first = next((trained["root"] / "test").rglob("*.png"))
    (noise / "a_test.png").write_bytes(first.read_bytes())
    out, page = tmp_path / "p.csv", tmp_path / "p.html"
    capsys.readouterr()
    assert main(["predict", str(run), str(noise), "--out", str(out), "--html", str(page)]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "3 unfamiliar (validation: 95% ok)" in said  # the folder's flags, counted
    assert "need not hold for them" in said  # and a warning: 3 of 4 flagged is not validation
    rows = list(csv.DictReader(out.open()))
    assert {"flag", "set", "ood_score", "failure_score", "score_knn"} <= set(rows[0])
    assert [r["flag"] for r in rows if "noise" in r["path"]] == ["unfamiliar"] * 3
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 8 and "http" not in html.split("<body>")[1]
    assert html.index("noise") < html.index("a_test.png")


def test_folder_summary_warns_only_when_few_images_end_ok() -> None:
    from medxfer.evaluate.predict_trust import folder_summary

    record = {"acceptance": 0.95, "coverage": 0.9}
    like_validation = {"ok": 94, "review": 4, "unfamiliar": 2}
    line, warning = folder_summary(like_validation, record)
    assert line == "94 ok, 4 review, 2 unfamiliar (validation: 95% ok)" and warning == ""
    assert folder_summary({"review": 1}, record)[1] == ""  # one image: not evidence enough
    assert folder_summary({"ok": 2, "review": 1}, record)[1] == ""
    shifted = {"ok": 60, "review": 10, "unfamiliar": 30}
    line, warning = folder_summary(shifted, record)
    assert "only 60% of these 100 images end ok" in warning and "`unfamiliar`" in warning
    assert "90% coverage need not hold" in warning and "medxfer shift" in warning
    assert "`review`" in folder_summary({"ok": 60, "review": 40}, record)[1]
    assert folder_summary({}, record)[1] == ""


def test_missing_trust_names_the_command(tmp_path: Path) -> None:
    from medxfer.errors import MedxferError
    from medxfer.evaluate.trust import load_trust

    with pytest.raises(MedxferError) as err:
        load_trust(tmp_path)
    assert f"medxfer trust {tmp_path}" in str(err.value.fix)


def test_report_section_summarises_the_run(trained: dict[str, Any], tmp_path: Path) -> None:
    from medxfer.report.blocks import Image, Table
    from medxfer.report.trust_section import trust

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"rows": [{"run_dir": str(trained["run"]),
                                                "pruned": False}]}))  # fmt: skip
    r = {"outputs": {"evaluate": {"evaluation": str(evaluation)}}, "status": {}}
    s = trust(r)
    assert s.title == "Will it work on new images?"
    (table,) = [b for b in s.blocks if isinstance(b, Table)]
    t = json.loads((trained["run"] / "metrics.json").read_text())["trust"]["test"]
    assert table.rows[0][3] == f"{100 * t['ok_fraction']:.1f}%"
    assert any(isinstance(b, Image) and b.path.name == "test_risk_coverage.png" for b in s.blocks)


def test_pnorm_confidence_hand_computed_and_chosen_on_validation_folds() -> None:
    """MaxLogit-pNorm equals its formula. Where the logits' direction says which predictions
    fail and their scale is noise (over-confidence that varies from image to image), MSP is
    misled by the scale and pNorm is not: the cross-fitted validation choice picks pNorm."""
    from medxfer.evaluate import trust_fit

    logits = np.array([[2.0, 0.0, -2.0], [1.0, 1.0, 1.0 + 3.0]])
    got = trust_fit.pnorm_score(logits, 2)
    z = logits - logits.mean(1, keepdims=True)
    np.testing.assert_allclose(got, -z.max(1) / np.sqrt((z**2).sum(1)))
    assert got[0] == pytest.approx(-2 / np.sqrt(8))
    rng = np.random.default_rng(0)
    n = 600
    d = rng.normal(size=(n, 3))
    d -= d.mean(1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    correct = rng.random(n) < np.clip((-trust_fit.pnorm_score(d, 2) - 0.4) / 0.45, 0.05, 0.95)
    logits = d * rng.uniform(0.5, 10, size=n)[:, None]
    msp = -softmax(logits, axis=1).max(1)
    dist = rng.normal(size=n)  # an uninformative distance
    params, measured, conf = trust_fit.fit_failure(msp, dist, correct, 0, logits)
    assert params["confidence"]["kind"] == "pnorm"
    assert measured["chosen"].startswith("pnorm_")
    best = measured[f"{measured['chosen']}_crossfit_augrc"]
    assert best < measured["msp_augrc"] and best < measured["logistic_crossfit_augrc"]
    np.testing.assert_allclose(conf, trust_fit.pnorm_score(logits, params["confidence"]["p"]))
    # no logits (or too few errors): MSP only, as before
    params, measured, conf = trust_fit.fit_failure(msp, dist, correct, 0)
    assert params["confidence"] == {"kind": "msp"} and not measured["chosen"].startswith("pnorm")


def test_flips_confidence_hand_computed_and_chosen_on_validation_folds() -> None:
    """``flips`` averages the probability of the one-view prediction over the image and its
    training flips (hflip: the width axis). Where flip disagreement says which predictions
    fail and MSP is noise, the cross-fitted validation choice picks it; without flipped
    scores it is never a candidate, and a record that names it cannot be scored without them."""
    import torch

    from medxfer.evaluate import trust, trust_fit
    from medxfer.evaluate.predict import probs_of_arrays

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 3)).eval()
    meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "config": {"augment": {"hflip": True}}}
    arrays = np.random.default_rng(0).integers(0, 256, size=(6, 4, 5), dtype=np.uint8)
    assert trust.trained_flips(meta) == ["hflip"]
    assert trust.trained_flips({"config": {"augment": {"hflip": True, "vflip": True}}}) == [
        "hflip", "vflip"]  # fmt: skip
    with torch.inference_mode():
        plain = probs_of_arrays(model, meta, arrays)
        mirrored = probs_of_arrays(model, meta, np.ascontiguousarray(arrays[:, :, ::-1]))
    pred = plain.argmax(1)
    rows = np.arange(len(pred))
    got = trust.flips_score(model, meta, arrays, plain, ["hflip"])
    np.testing.assert_allclose(got, -(plain[rows, pred] + mirrored[rows, pred]) / 2, rtol=1e-5)
    assert not np.allclose(got, -plain.max(1))  # the flip changes this model's output

    rng = np.random.default_rng(1)
    n = 600
    flips = -rng.uniform(0.3, 1.0, n)  # higher = less confident
    correct = rng.random(n) < np.clip((-flips - 0.3) / 0.6, 0.05, 0.95)
    msp = -rng.uniform(0.5, 1.0, n)  # uninformative
    dist = rng.normal(size=n)
    params, measured, conf = trust_fit.fit_failure(msp, dist, correct, 0, None, (["hflip"], flips))
    assert params["confidence"] == {"kind": "flips", "flips": ["hflip"]}
    assert measured["chosen"].startswith("flips_")
    assert measured["flips_augrc"] < measured["msp_augrc"]
    np.testing.assert_array_equal(conf, flips)
    np.testing.assert_array_equal(trust_fit.confidence_score(params, msp, None, flips), flips)
    with pytest.raises(ValueError, match="flipped"):
        trust_fit.confidence_score(params, msp, None)
    params, measured, _ = trust_fit.fit_failure(msp, dist, correct, 0)
    assert params["confidence"] == {"kind": "msp"} and "flips_augrc" not in measured


def test_score_averages_the_recorded_flips(trained: dict[str, Any]) -> None:
    """A run whose failure score chose ``flips`` scores new images through their flipped
    copies: the same failure score as computed by hand from ``flips_score``. The training fit
    measured the candidate on validation (the demo model trains with hflip)."""
    from medxfer.evaluate import trust, trust_fit, trust_run
    from medxfer.evaluate.predict import folded_for_inference

    run = trained["run"]
    tm = trust.load_trust(run)
    assert "flips_augrc" in tm.record["validation"]["failure_score"]
    model, meta, arrays = trust_run.run_split_arrays(run, ("test",))
    model, _ = folded_for_inference(model.eval(), meta)
    images = arrays["test"][0][:24]
    assert trust.trained_flips(meta) == ["hflip"]
    tm.record["failure"]["confidence"] = {"kind": "flips", "flips": ["hflip"]}
    ts = tm.score(model, meta, images)
    by_hand = trust.flips_score(model, meta, images, ts.probs, ["hflip"])
    expect = trust_fit.failure_score(tm.record["failure"], by_hand, ts.ood_score, tm.refs)
    np.testing.assert_allclose(ts.failure_score, expect, rtol=1e-6)
    tm.record["failure"]["confidence"] = {"kind": "msp"}
    assert not np.allclose(tm.score(model, meta, images).failure_score, expect)


def test_unknown_conformal_score_is_refused_before_any_work() -> None:
    """A score that does not exist ends in one message naming the choices, before the model
    is run (the model here is not even one)."""
    from medxfer.evaluate.trust import fit_on_arrays

    images, labels = np.zeros((30, 8, 8), np.uint8), np.zeros(30, np.int64)
    with pytest.raises(MedxferError, match="not a conformal score") as err:
        fit_on_arrays(None, {}, (images, labels), (images, labels), conformal_score="raps")  # type: ignore[arg-type]
    assert "lac, aps" in (err.value.fix or "")
