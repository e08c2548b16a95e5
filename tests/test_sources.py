from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.sources import assign_splits, discover, patient_summary, with_patient_ids
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


def _patients_tree(root: Path) -> None:
    """Kermany-style names: several images per patient, the ID before the first underscore."""
    n = 0
    for p in range(24):
        label = ("bacterial", "viral", "normal")[p % 3]
        for k in range(1 + p % 4):
            _img(root / "train" / label / f"person{p}_{label}_{k}.png", n)
            n += 1
    for k in range(3):
        _img(root / "test" / "normal" / f"IM-{k:04d}-0001.png", 900 + k)


REGEX = r"^(person\d+|IM-\d+)"


def test_patient_regex_groups_folder_layouts(tmp_path: Path) -> None:
    _patients_tree(tmp_path)
    samples = with_patient_ids(discover(tmp_path), REGEX)
    ids = {sp: {s.patient_id for s in samples if s.split == sp} for sp in ("train", "test")}
    assert ids["train"] == {f"person{p}" for p in range(24)}
    assert ids["test"] == {f"IM-000{k}" for k in range(3)}
    for seed in range(5):
        s = assign_splits(samples, 0.25, 0.0, seed=seed)
        train = {x.patient_id for x in s if x.split == "train"}
        val = {x.patient_id for x in s if x.split == "val"}
        assert val and train.isdisjoint(val)  # no patient on both sides of the boundary
        assert len(train | val) == 24
    summary = patient_summary(assign_splits(samples, 0.25, 0.0, seed=0))
    assert summary["shared_across_splits"]["train-val"]["patients"] == 0
    assert sum(summary["patients"].values()) == 27 and summary["images_per_patient"]["max"] == 4
    # without the regex the same split puts images of one patient on both sides
    plain = assign_splits(discover(tmp_path), 0.25, 0.0, seed=0)
    ids = [(x.split, Path(x.path).name.split("_")[0]) for x in plain]
    assert {p for sp, p in ids if sp == "train"} & {p for sp, p in ids if sp == "val"}


def test_patient_regex_errors_and_manifest_ids_win(tmp_path: Path) -> None:
    _patients_tree(tmp_path)
    _img(tmp_path / "train" / "normal" / "scan7.png", 999)
    with pytest.raises(MedxferError, match="no patient ID in 1 training file") as err:
        with_patient_ids(discover(tmp_path), REGEX)
    assert "data.patient_regex=''" in (err.value.fix or "")  # a shipped config's regex: the way out
    with pytest.raises(MedxferError, match="no patient ID in 1 training file"):
        with_patient_ids(discover(tmp_path), r"^(person\d+)?|IM-")  # empty group on scan7
    with pytest.raises(MedxferError, match="not a regular expression"):
        with_patient_ids(discover(tmp_path), "(person")
    # a test file that does not match stays without an ID; no regex changes nothing
    assert with_patient_ids(discover(tmp_path), "") == discover(tmp_path)
    only_train = with_patient_ids(discover(tmp_path), r"^(person\d+|scan\d+)")
    assert all(s.patient_id == "" for s in only_train if s.split == "test")
    rows = "train/normal/scan7.png,normal,P9\ntrain/viral/person1_viral_0.png,viral,\n"
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + rows)
    ids = [s.patient_id for s in with_patient_ids(discover(tmp_path / "m.csv"), REGEX)]
    assert ids == ["P9", "person1"]  # the column's ID kept, a missing one taken from the name


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


def _smooth(seed: int) -> np.ndarray:
    """A smooth random 32x32 image: distinct seeds correlate far below 0.99."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4)).astype(np.float32)
    big = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC))
    return np.clip(big, 0, 255).astype(np.uint8)


def _near_copies_tree(root: Path) -> dict[str, list[str]]:
    """Per class, 12 scans of 3 near copies each (as is, mirrored, darker and lower contrast):
    returns each scan's file names, keyed by scan."""
    scans: dict[str, list[str]] = {}
    for c, label in enumerate(("a", "b")):
        for k in range(12):
            arr = _smooth(100 * c + k)
            copies = (arr, arr[:, ::-1], (arr.astype(np.float32) * 0.7 + 20).astype(np.uint8))
            names = []
            for j, img in enumerate(copies):
                path = root / label / f"scan{k}_{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(img)).save(path)
                names.append(str(path))
            scans[f"{label}{k}"] = names
    return scans


def test_near_duplicate_groups_link_flipped_and_recontrasted_copies(tmp_path: Path) -> None:
    from medxfer.data.audit import near_duplicate_groups

    scans = _near_copies_tree(tmp_path)
    lone = tmp_path / "a" / "lone.png"
    Image.fromarray(_smooth(999)).save(lone)
    paths = [*sorted(p for names in scans.values() for p in names), str(lone)]
    groups = near_duplicate_groups(paths, 0.99, workers=1, show=False)
    assert str(lone) not in groups  # no copy of it: in no group
    assert len(set(groups.values())) == len(scans)  # one group per scan, none merged
    for names in scans.values():
        assert len({groups[p] for p in names}) == 1


def test_grouped_split_keeps_near_copies_on_one_side(tmp_path: Path) -> None:
    from medxfer.data.audit import near_duplicate_groups

    scans = _near_copies_tree(tmp_path)
    samples = discover(tmp_path)
    groups = near_duplicate_groups([s.path for s in samples], 0.99, workers=1, show=False)
    scan_of = {p: scan for scan, names in scans.items() for p in names}
    for seed in range(4):
        split = {s.path: s.split for s in assign_splits(samples, 0.25, 0.25, seed, groups)}
        for names in scans.values():
            assert len({split[p] for p in names}) == 1  # a scan never straddles a boundary
        assert {"train", "val", "test"} <= set(split.values())
    # the plain split does put copies of one scan on both sides of the boundary
    plain = assign_splits(samples, 0.25, 0.25, 0)
    sides: dict[str, set[str]] = {}
    for s in plain:
        sides.setdefault(scan_of[s.path], set()).add(s.split)
    assert any(len(v) > 1 for v in sides.values())
    # without groups the split is exactly the one it was before the option existed
    assert assign_splits(samples, 0.25, 0.25, 0, {}) == plain


def test_near_copies_across_patients_join_their_patients(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 24, "b": 24})
    # two images per patient; patient k's second image is a near copy of patient k+1's first
    samples = [
        replace(s, patient_id=f"P{s.label}{int(Path(s.path).stem) // 2}")
        for s in discover(tmp_path)
    ]
    by_name = {(s.label, int(Path(s.path).stem)): s.path for s in samples}
    groups: dict[str, str] = {}
    for label in ("a", "b"):
        for k in range(0, 10, 2):  # chains P0-P1 ... P5: image 2k+1 ~ image 2k+2
            groups[by_name[(label, k + 1)]] = groups[by_name[(label, k + 2)]] = f"{label}{k}"
    chain = {s.patient_id for s in samples if int(Path(s.path).stem) < 12}
    for seed in range(4):
        side: dict[str, set[str]] = {}
        for s in assign_splits(samples, 0.25, 0.0, seed, groups):
            side.setdefault(s.patient_id, set()).add(s.split)
        assert all(len(v) == 1 for v in side.values())  # patients stay whole
        for label in ("a", "b"):  # and each chain of linked patients lands on one side
            assert len(set().union(*(side[p] for p in chain if p.startswith(f"P{label}")))) == 1


def test_prepare_groups_near_copies_and_records_them(tmp_path: Path) -> None:
    from medxfer.config import DataConfig
    from medxfer.data.prepare import prepare

    scans = _near_copies_tree(tmp_path / "set")
    cfg = DataConfig(
        root=str(tmp_path / "set"), image_size=16, cache_dir=str(tmp_path / "c"),
        val_fraction=0.25, test_fraction=0.25, group_near_duplicates=True,
    )  # fmt: skip
    data = prepare(cfg, workers=1)
    assert data.info["near_duplicate_groups"] == {
        "images": 72, "groups": 24, "largest": 3, "threshold": 0.99
    }  # fmt: skip
    split = {Path(s.path).name: s.split for s in data.samples}
    for names in scans.values():
        assert len({split[Path(p).name] for p in names}) == 1
    plain = prepare(replace(cfg, group_near_duplicates=False), workers=1)
    assert "near_duplicate_groups" not in plain.info


def test_given_splits_are_not_grouped(tmp_path: Path) -> None:
    from medxfer.config import DataConfig
    from medxfer.data.prepare import prepare

    _tree(tmp_path / "set", {"train/a": 6, "train/b": 6, "val/a": 2, "val/b": 2, "test/a": 2})
    cfg = DataConfig(root=str(tmp_path / "set"), image_size=16, cache_dir=str(tmp_path / "c"),
                     group_near_duplicates=True)  # fmt: skip
    data = prepare(cfg, workers=1)  # val and test are given: there is nothing to carve
    assert "near_duplicate_groups" not in data.info
    assert {s.path for s in data.samples if s.split == "val"} == {
        s.path for s in discover(tmp_path / "set") if s.split == "val"
    }
