"""Does a trained model lean on a class's intensity profile instead of the finding? Validation
images only.

    python studies/shortcut_reliance.py RUN [RUN ...] --name N [--threads T]

`medxfer data audit` reports how well the label can be told from global image statistics alone
(``medxfer.data.shortcuts``); on the brain tumour set, intensity statistics alone tell the four
classes apart at a balanced accuracy of about 0.91. This study asks whether a model trained on
the set uses that cue. Every validation image is given the intensity profile of each class in
turn and scored again:

- the donor profile: the pooled histogram of the foreground pixels (those above 5% of the
  image's range, as the audit counts them) of the run's training images of that class (the
  seeded subsample the trust step uses);
- the remap: the image's foreground is histogram-matched to the donor profile (a monotone
  quantile mapping, so every edge and shape stays where it was); the background stays black.

The same is done for framing, the audit's second strongest group of cues: each validation
image's foreground box is scaled (aspect kept) to take the median share of the image that the
donor class's training images' boxes take, centred on black.

Matching an image to its own class's profile (or framing) is the control: what the change costs
by itself.
Reported per run: accuracy as the images are, after the control remap, and after each other
class's profile; the share of images that the remap moves *to the donor class* (the cue
working), per true class and donor, against the share moved to any other wrong class; and the
largest such cell. The JSON also holds the audit's own check on the run's dataset (its test
split scored too, as the audit scores it), and, to explain the policies' difference on the
test split and not to choose anything, each run's saved test predictions apart for the test
images whose statistics alone name their class and the rest (``test_split_by_cue``). Nothing
else here reads a test image. Writes
studies/results/shortcut-reliance/<name>.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # trust_tta

from _common import STUDY_RESULTS, abspath, save
from trust_tta import study_args

from medxfer.config import load_config
from medxfer.data.shortcuts import foreground, foreground_box
from medxfer.evaluate.predict import folded_for_inference, probs_of_arrays
from medxfer.evaluate.trust_run import run_split_arrays


def class_profiles(images: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, 256): each class's cumulative distribution of foreground intensities (uint8)."""
    hist = np.zeros((n_classes, 256))
    for img, y in zip(images, labels, strict=True):
        hist[y] += np.bincount(img[foreground(img)], minlength=256)
    return np.cumsum(hist, 1) / np.maximum(hist.sum(1, keepdims=True), 1)


def matched(img: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """``img`` with its foreground histogram-matched to ``profile`` (a CDF over 0..255)."""
    fg = foreground(img)
    out = img.copy()
    if fg.sum() == 0:
        return out
    own = np.cumsum(np.bincount(img[fg], minlength=256)) / fg.sum()
    lut = np.clip(np.searchsorted(profile, own), 0, 255).astype(np.uint8)
    out[fg] = lut[img[fg]]
    return out


def box(img: np.ndarray) -> tuple[int, int, int, int]:
    """The foreground's bounding box (the whole image if it has no foreground)."""
    return foreground_box(foreground(img)) or (0, img.shape[0], 0, img.shape[1])


def box_share(img: np.ndarray) -> float:
    r0, r1, c0, c1 = box(img)
    return (r1 - r0) * (c1 - c0) / img.size


def class_framing(images: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,): each class's median share of the image its foreground box takes."""
    shares = np.array([box_share(im) for im in images])
    return np.array([float(np.median(shares[labels == c])) for c in range(n_classes)])


def reframed(img: np.ndarray, share: float) -> np.ndarray:
    """``img``'s foreground box scaled (aspect kept, bilinear) to take ``share`` of the image,
    centred on black: the framing of another collection, the anatomy unchanged."""
    from PIL import Image

    r0, r1, c0, c1 = box(img)
    h, w = r1 - r0, c1 - c0
    scale = min(np.sqrt(share * img.size / (h * w)), img.shape[0] / h, img.shape[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    crop = Image.fromarray(np.ascontiguousarray(img[r0:r1, c0:c1]))
    out = np.zeros_like(img)
    top, left = (img.shape[0] - nh) // 2, (img.shape[1] - nw) // 2
    scaled = crop.resize((nw, nh), Image.Resampling.BILINEAR)
    out[top : top + nh, left : left + nw] = np.asarray(scaled)
    return out


def measure(folder: Path) -> dict[str, Any]:
    model, meta, arrays = run_split_arrays(folder, ("train", "val"))
    model, _ = folded_for_inference(model.eval(), meta)
    classes = list(meta["classes"])
    images, labels = arrays["val"]
    if images.ndim != 3:
        raise SystemExit(f"{folder}: grayscale runs only (this one is {meta['color']})")
    profiles = class_profiles(*arrays["train"], len(classes))
    framing = class_framing(*arrays["train"], len(classes))
    with torch.inference_mode():
        plain = probs_of_arrays(model, meta, images).argmax(1)
        out: dict[str, Any] = {
            "run": str(folder),
            "policy": load_config(folder / "config.yaml").augment.policy,
            "images": len(labels),
            "accuracy_as_they_are": round(float((plain == labels).mean()), 4),
            "class_box_share": {
                c: round(float(x), 4) for c, x in zip(classes, framing, strict=True)
            },
        }
        changes = {
            "intensity": lambda im, k: matched(im, profiles[k]),
            "framing": lambda im, k: reframed(im, float(framing[k])),
        }
        for cue, change in changes.items():
            donor_pred = np.stack([
                probs_of_arrays(model, meta, np.stack([change(im, k) for im in images]))
                .argmax(1) for k in range(len(classes))
            ])  # fmt: skip  # (donor, image)
            out[cue] = moves(donor_pred, plain, labels, classes)
    return out


def moves(
    donor_pred: np.ndarray, plain: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """What giving each image each class's cue did to its prediction (``donor_pred``: (donor,
    image) predicted classes)."""
    n = len(classes)
    rows = np.arange(len(labels))
    own = donor_pred[labels, rows]
    # true class -> donor -> share predicted as the donor; ... as a third, wrong class
    to_donor: dict[str, dict[str, float]] = {c: {} for c in classes}
    to_other: dict[str, dict[str, float]] = {c: {} for c in classes}
    for c in range(n):
        ok = (labels == c) & (own == c)  # right after the control remap
        for k in range(n):
            if k == c or not ok.any():
                continue
            p = donor_pred[k, ok]
            to_donor[classes[c]][classes[k]] = round(float((p == k).mean()), 4)
            to_other[classes[c]][classes[k]] = round(float(((p != k) & (p != c)).mean()), 4)
    worst = max(((c, k, v) for c, d in to_donor.items() for k, v in d.items()),
                key=lambda t: t[2])  # fmt: skip
    others = np.array([k != y for k in range(n) for y in labels]).reshape(n, -1)
    other_acc = (donor_pred[others] == np.tile(labels, (n, 1))[others]).mean()
    mean_to_donor = np.mean([v for d in to_donor.values() for v in d.values()])
    return {
        "accuracy": {
            "as_they_are": round(float((plain == labels).mean()), 4),
            "own_class_profile": round(float((own == labels).mean()), 4),
            "another_class_profile": round(float(other_acc), 4),
        },
        "moved_to_donor": to_donor,
        "moved_to_another_wrong_class": to_other,
        "largest_move": {"true": worst[0], "donor": worst[1], "share": worst[2]},
        "mean_moved_to_donor": round(float(mean_to_donor), 4),
    }


def audit_check(folder: Path) -> dict[str, Any]:
    """The audit's shortcut check on the dataset the run was trained on (its splits as the
    dataset gives them, patients as the run's config reads them)."""
    from medxfer.data.audit import shortcut_report
    from medxfer.data.prepare import resolve_root
    from medxfer.data.sources import discover, with_patient_ids

    cfg = load_config(folder / "config.yaml")
    root, _ = resolve_root(cfg.data)
    samples = with_patient_ids(discover(str(root)), cfg.data.patient_regex)
    return {"data": str(root), **shortcut_report(samples)}


def test_split_by_cue(folders: list[Path]) -> dict[str, Any]:
    """Read once, to explain, never to choose: the runs' saved test predictions, apart for the
    test images whose statistics alone name their class (the audit's classifier, fitted on the
    dataset's training images) and the rest. All runs must share one split."""
    import csv
    import gzip

    from medxfer.data.audit import inspect_file
    from medxfer.data.prepare import resolve_root
    from medxfer.data.shortcuts import cue_classifier

    root, _ = resolve_root(load_config(folders[0] / "config.yaml").data)
    with gzip.open(folders[0] / "samples.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    train = [r for r in rows if r["given_split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]

    def vectors(rs: list[dict[str, str]]) -> np.ndarray:
        return np.stack([inspect_file(str(root / r["path"]), with_cues=True)[6] for r in rs])

    y_test = np.array([classes.index(r["label"]) for r in test])
    y_train = [classes.index(r["label"]) for r in train]
    model = cue_classifier(len(train)).fit(vectors(train), y_train)
    cue_right = np.asarray(model.predict(vectors(test))) == y_test
    out: dict[str, Any] = {"test_images": len(test), "named_by_statistics": int(cue_right.sum()),
                           "runs": []}  # fmt: skip
    for folder in folders:
        saved = np.load(folder / "test_predictions.npz")
        if not np.array_equal(saved["labels"], y_test):
            raise SystemExit(f"{folder}: its test predictions are not in samples.csv.gz's order")
        right = saved["probs"].argmax(1) == y_test
        out["runs"].append({
            "run": str(folder),
            "policy": load_config(folder / "config.yaml").augment.policy,
            "accuracy": round(float(right.mean()), 4),
            "accuracy_named_by_statistics": round(float(right[cue_right].mean()), 4),
            "accuracy_not_named": round(float(right[~cue_right].mean()), 4),
        })  # fmt: skip
    return out


def main() -> None:
    args = study_args(__doc__)
    t0 = time.perf_counter()
    audit = audit_check(abspath(args.runs[0]))
    print(f"audit: balanced accuracy {audit.get('balanced_accuracy')} (chance "
          f"{audit.get('chance')}), by group {audit.get('by_group')}")  # fmt: skip
    rows = [measure(abspath(r)) for r in args.runs]
    for r in rows:
        for cue in ("intensity", "framing"):
            m = r[cue]
            print(f"{r['run']}, {cue}: accuracy {m['accuracy']}; to donor, mean "
                  f"{m['mean_moved_to_donor']}, largest {m['largest_move']}")  # fmt: skip
    by_cue = test_split_by_cue([abspath(r) for r in args.runs])
    for r in by_cue["runs"]:
        print(f"test split, {r['run']}: {r['accuracy']}; named by statistics "
              f"{r['accuracy_named_by_statistics']}, not {r['accuracy_not_named']}")  # fmt: skip
    payload = {"audit": audit, "runs": rows, "test_split_by_cue": by_cue,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    save(f"shortcut-reliance/{args.name}", payload, STUDY_RESULTS)


if __name__ == "__main__":
    main()
