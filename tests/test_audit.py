from __future__ import annotations

import csv
import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from medxfer.data import audit as audit_mod
from medxfer.data.audit import audit, leaking_train_paths, near_pairs, print_audit
from medxfer.data.sources import Sample, discover
from medxfer.data.synthetic import make_synthetic, render

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri"
COUNTS = {"disc": 6, "ring": 6, "bars": 6, "cross": 6}

Transform = Callable[[np.ndarray], np.ndarray]
PLANTED: dict[str, tuple[str, str, Transform]] = {
    # test file: (train file, expected transform, how the test copy is made)
    "test/bars/leak_hflip.png": ("train/bars/bars_0001.png", "hflip", lambda a: a[:, ::-1]),
    "test/cross/leak_vflip.png": ("train/cross/cross_0002.png", "vflip", lambda a: a[::-1]),
    "test/ring/leak_rot180.png": ("train/ring/ring_0003.png", "rot180", lambda a: a[::-1, ::-1]),
    "test/disc/leak_contrast.png": (
        "train/disc/disc_0004.png",
        "identity",
        lambda a: np.round(a * 0.6 + 40).astype(np.uint8),
    ),
}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic set with planted leaks, an in-split copy, a label conflict and a corrupt file."""
    root = make_synthetic(tmp_path_factory.mktemp("audit") / "set", counts=COUNTS, test_per_class=4)
    for test, (train, _, fn) in PLANTED.items():
        Image.fromarray(fn(_read(root / train))).save(root / test)
    # a JPEG in train and a PNG of its decoded pixels in test: exact duplicates
    disc = render("disc", 64, np.random.default_rng(123))
    Image.fromarray(disc).save(root / "train/disc/lossy.jpg", quality=80)
    Image.fromarray(_read(root / "train/disc/lossy.jpg")).save(root / "test/disc/from_jpeg.png")
    # the same pixels with another label in test: exact duplicate with a label conflict
    Image.fromarray(_read(root / "train/ring/ring_0005.png")).save(root / "test/cross/wrong.bmp")
    (root / "train/bars/copy.png").write_bytes((root / "train/bars/bars_0000.png").read_bytes())
    (root / "test/ring/x.png").write_bytes(b"this is not an image at all" * 10)
    return root


@pytest.fixture(scope="module")
def report(planted: Path) -> dict:
    return audit(discover(planted), workers=1)


def _rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def test_near_duplicates_are_exactly_the_planted_ones(report: dict, planted: Path) -> None:
    found = {
        (_rel(p["a_path"], planted), _rel(p["b_path"], planted), p["transform"])
        for p in report["near_duplicates"]
    }
    assert found == {(train, test, t) for test, (train, t, _) in PLANTED.items()}
    assert all(p["corr"] >= 0.99 and not p["label_conflict"] for p in report["near_duplicates"])
    assert {p["split_pair"] for p in report["near_duplicates"]} == {"train-test"}


def test_exact_duplicates_within_and_across(report: dict, planted: Path) -> None:
    exact = report["exact_duplicates"]
    within = exact["within_split"]["train"]
    groups = sorted(sorted(_rel(f["path"], planted) for f in g["files"]) for g in within)
    assert groups == [["train/bars/bars_0000.png", "train/bars/copy.png"]]
    across = {
        tuple(sorted(_rel(f["path"], planted) for f in g["files"])): g["label_conflict"]
        for g in exact["across_splits"]
    }
    assert across == {
        ("test/disc/from_jpeg.png", "train/disc/lossy.jpg"): False,
        ("test/cross/wrong.bmp", "train/ring/ring_0005.png"): True,
    }
    assert report["summary"]["exact_label_conflicts"] == 1


def test_unreadable_and_image_stats(report: dict, planted: Path) -> None:
    assert [_rel(u["path"], planted) for u in report["unreadable"]] == ["test/ring/x.png"]
    assert "UnidentifiedImageError" in report["unreadable"][0]["error"]
    images = report["images"]
    assert images["width"] == {"min": 64, "max": 64, "median": 64.0}
    assert images["modes"] == {"L": report["n_samples"] - 1}
    assert report["counts"]["train"]["bars"] == COUNTS["bars"] + 1
    json.dumps(report)  # JSON-able


def test_leaking_train_paths(report: dict, planted: Path) -> None:
    expected = {train for train, _, _ in PLANTED.values()}
    expected |= {"train/disc/lossy.jpg", "train/ring/ring_0005.png"}
    assert {_rel(p, planted) for p in leaking_train_paths(report)} == expected
    assert report["summary"]["leaking_train_files"] == len(expected)


def test_process_pool_gives_the_same_report(
    report: dict, planted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_mod, "SERIAL_BELOW", 0)
    assert audit(discover(planted), workers=2) == report


def test_print_audit(report: dict) -> None:
    console = Console(record=True, width=120)
    print_audit(report, console)
    text = console.export_text()
    assert "Findings" in text and "x.png" in text and "leaking into test" in text
    assert "2 training images have a near copy" in text and "group_near_duplicates" in text


def test_near_copies_within_train_are_counted(
    report: dict, planted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the one in-train copy (bars_0000 = copy.png); the planted test copies are across splits
    assert report["near_within_train"] == {"images": 2, "groups": 1, "checked": True}
    assert report["summary"]["train_images_with_near_copy"] == 2
    monkeypatch.setattr(audit_mod, "WITHIN_TRAIN_MAX", 5)  # too many to compare: not checked
    samples = discover(planted)
    decoded = [audit_mod.inspect_file(s.path) for s in samples]
    out = audit_mod._near_within_train(samples, decoded, 32, 0.99)
    assert out == {"images": None, "groups": None, "checked": False}


def test_near_pairs_transforms_and_unrelated() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 8, 8)).astype(np.float32)
    b = np.stack([a[0][:, ::-1], rng.normal(size=(8, 8)), a[2][::-1, ::-1]]).astype(np.float32)

    def norm(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    pairs = near_pairs(norm(a), norm(b), 8, 0.99)
    assert [(i, j, audit_mod.TRANSFORMS[t]) for i, j, t, _ in pairs] == [
        (0, 0, "hflip"),
        (2, 2, "rot180"),
    ]


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real data not present at {REAL}")
def test_real_data_known_pairs_are_found() -> None:
    with open(REAL / "train_test_near_duplicates.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for t in ("identity", "hflip", "vflip", "rot180") for r in _first(rows, t, 8)]
    samples = [Sample(str(REAL / r["train_path"]), r["label"], "train") for r in picked]
    samples += [Sample(str(REAL / r["test_path"]), r["label"], "test") for r in picked]
    samples = list(dict.fromkeys(samples))
    rep = audit(samples, workers=1)
    found = {(p["a_path"], p["b_path"]): p["transform"] for p in rep["near_duplicates"]}
    for r in picked:
        key = (str(REAL / r["train_path"]), str(REAL / r["test_path"]))
        assert found.get(key) == r["transform"], key
    assert leaking_train_paths(rep) == {str(REAL / r["train_path"]) for r in picked}


def _first(rows: list[dict[str, str]], transform: str, n: int) -> list[dict[str, str]]:
    return list(islice((r for r in rows if r["transform"] == transform), n))


def test_patients_across_splits(tmp_path: Path) -> None:
    from medxfer.data.sources import with_patient_ids

    files = {"train/a": ["p1_0", "p1_1", "p2_0"], "train/b": ["p3_0", "p1_2"], "test/a": ["p2_5"]}
    rng = np.random.default_rng(0)
    for folder, names in files.items():
        (tmp_path / folder).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder / f"{name}.png")
    plain = audit(discover(tmp_path), workers=1)
    assert "patients" not in plain and "patients" not in plain["summary"]
    rep = audit(with_patient_ids(discover(tmp_path), r"^(p\d+)_"), workers=1)
    p = rep["patients"]
    assert p["patients"] == {"train": 3, "test": 1} and p["multi_image_patients"] == 2
    assert p["shared_across_splits"] == {"train-test": {"patients": 1, "examples": ["p2"]}}
    assert p["patients_with_several_labels"] == 1  # p1 is under a and b
    assert rep["summary"]["patients_across_splits"] == {"train-test": 1}
    console = Console(record=True, width=120)
    print_audit(rep, console)
    assert "patients in both train-test" in console.export_text()


def test_has_near_copy_and_accuracy_apart(planted: Path) -> None:
    from medxfer.evaluate.metrics import by_near_copy, format_near_copies

    samples = discover(planted)
    train = [s.path for s in samples if s.split == "train"]
    test = sorted(s.path for s in samples if s.split == "test")
    copy = audit_mod.has_near_copy(test, train, 0.99, workers=1)
    copied = {str(planted / t) for t in PLANTED} | {
        str(planted / "test/disc/from_jpeg.png"), str(planted / "test/cross/wrong.bmp")
    }  # fmt: skip
    assert {t for t, c in zip(test, copy, strict=True) if c} == copied  # x.png: unreadable
    # the copies all predicted right, the other images right one time in two
    labels = np.zeros(len(test), dtype=np.int64)
    right = np.where(copy, True, np.arange(len(test)) % 2 == 0)
    probs = np.zeros((len(test), 2))
    probs[np.arange(len(test)), np.where(right, 0, 1)] = 1.0
    r = by_near_copy(copy, labels, probs, 0.99)
    n_other = len(test) - len(copied)
    assert r["with_a_near_copy"] == {
        "images": 6,
        "accuracy": 1.0,
        "ci95": r["with_a_near_copy"]["ci95"],
    }
    assert r["without"]["images"] == n_other
    assert r["without"]["accuracy"] == round(float(right[~copy].mean()), 4)
    lo, hi = r["without"]["ci95"]
    assert lo < r["without"]["accuracy"] < hi
    assert format_near_copies(r).startswith(f"6 of {len(test)} test images have a near copy")
