from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.sources import assign_splits, discover
from medxfer.errors import MedxferError


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


def _tree(root: Path, layout: dict[str, int]) -> None:
    for rel, n in layout.items():
        for i in range(n):
            _img(root / rel / f"{i}.png", i)


def test_class_folders_get_stratified_val_and_test(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 40, "b": 20})
    s = assign_splits(discover(tmp_path), val_fraction=0.25, test_fraction=0.25, seed=0)
    c = Counter((x.split, x.label) for x in s)
    assert c[("test", "a")] == 10 and c[("test", "b")] == 5
    assert c[("val", "a")] == 8 and c[("val", "b")] == 4  # 25% of the remaining 30 / 15, rounded
    assert len({x.path for x in s}) == len(s) == 60


def test_given_test_split_is_untouched(tmp_path: Path) -> None:
    _tree(tmp_path, {"train/a": 20, "train/b": 20, "test/a": 5, "test/b": 5})
    samples = discover(tmp_path)
    s = assign_splits(samples, 0.2, 0.3, seed=1)
    test = sorted(x.path for x in s if x.split == "test")
    assert test == sorted(x.path for x in samples if x.split == "test")
    assert all("/test/" not in x.path for x in s if x.split in ("train", "val"))
    assert Counter(x.split for x in s) == {"train": 32, "val": 8, "test": 10}


def test_split_is_seeded(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 30, "b": 30})
    one = assign_splits(discover(tmp_path), 0.2, 0.2, seed=3)
    two = assign_splits(discover(tmp_path), 0.2, 0.2, seed=3)
    other = assign_splits(discover(tmp_path), 0.2, 0.2, seed=4)
    assert one == two and one != other


def test_manifest_groups_patients(tmp_path: Path) -> None:
    rows = ["path,label,split,patient_id"]
    for p in range(30):
        label = "sick" if p % 3 == 0 else "well"
        for k in range(3):  # three images per patient
            rel = f"img/{p}_{k}.png"
            _img(tmp_path / rel, p * 3 + k)
            rows.append(f"{rel},{label},train,P{p}")
    for k in range(4):
        _img(tmp_path / f"img/t{k}.png", 500 + k)
        rows.append(f"img/t{k}.png,{'sick' if k % 2 else 'well'},test,T{k}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    s = assign_splits(discover(tmp_path / "m.csv"), 0.2, 0.0, seed=0)
    by_split: dict[str, set[str]] = {}
    for x in s:
        by_split.setdefault(x.split, set()).add(x.patient_id)
    assert by_split["train"].isdisjoint(by_split["val"])  # no patient on both sides
    assert {x.label for x in s if x.split == "val"} == {"sick", "well"}
    assert sum(x.split == "test" for x in s) == 4


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"a": 3}, "at least two"),
        ({"a": 3, "b": 0}, "no images"),
    ],
)
def test_bad_folders(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    for k, n in layout.items():
        (tmp_path / k).mkdir()
        _tree(tmp_path, {k: n})
    with pytest.raises(MedxferError, match=message):
        discover(tmp_path)


def test_missing_path_and_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(MedxferError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "m.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(MedxferError, match="path,label"):
        discover(tmp_path / "m.csv")
