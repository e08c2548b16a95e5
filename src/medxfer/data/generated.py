"""Generated (GAN) images: the manifest ``medxfer gan sample`` writes, read back for training.

The manifest is a CSV ``path,label,split,synthetic,checkpoint,seed`` (paths relative to it).
Its rows enter the *training* split only: ``prepare`` appends them after val and test have been
carved from real images, so a generated image can never be scored as if it were a real one.
"""

from __future__ import annotations

import csv
from pathlib import Path

from medxfer.data.sources import Sample
from medxfer.errors import MedxferError

MANIFEST_FIELDS = ("path", "label", "split", "synthetic", "checkpoint", "seed")
# A class is a minority class when it has fewer than this fraction of the largest class's
# training images (used by per-class GANs and by the benchmark's minority recall).
MINORITY_BELOW = 0.8


def minority_classes(counts: dict[str, int]) -> list[str]:
    top = max(counts.values())
    return [c for c, n in counts.items() if n < MINORITY_BELOW * top]


def read_generated(manifest: str | Path) -> tuple[list[Sample], dict[str, str]]:
    """Samples of a generated-image manifest (all in ``train``) and facts about its source."""
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise MedxferError(
            f"synthetic manifest {path} does not exist",
            "write one with `medxfer gan sample CHECKPOINT --out DIR` or set data.synthetic=''",
        )
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"path", "label", "synthetic"} <= set(rows[0]):
        raise MedxferError(
            f"{path} is not a synthetic-image manifest (needs path,label,synthetic columns)",
            "use the manifest.csv that `medxfer gan sample` writes",
        )
    out: list[Sample] = []
    for i, row in enumerate(rows, start=2):
        if str(row["synthetic"]).strip().lower() not in ("1", "true", "yes"):
            raise MedxferError(
                f"{path}:{i} is not marked synthetic; real images belong in data.root",
                "use the manifest.csv that `medxfer gan sample` writes",
            )
        if (row.get("split") or "train").strip().lower() != "train":
            raise MedxferError(
                f"{path}:{i}: synthetic images may only be used for training, not {row['split']!r}",
                "set the split column to train",
            )
        p = Path(row["path"])
        out.append(
            Sample(
                str(p if p.is_absolute() else path.parent / p),
                row["label"].strip(),
                "train",
                synthetic=True,
            )
        )
    source = {"manifest": str(path)}
    if rows:
        source["checkpoint"] = rows[0].get("checkpoint", "")
    return out, source


def select_generated(
    samples: list[Sample], real_counts: dict[str, int], ratio: float
) -> list[Sample]:
    """The generated samples to use: all (``ratio <= 0``), or per class only as many as bring
    the class up to ``ratio`` x the largest real class (in manifest order)."""
    unknown = sorted({s.label for s in samples} - set(real_counts))
    if unknown:
        raise MedxferError(
            f"synthetic manifest has class(es) {unknown} that the dataset does not",
            f"the dataset's classes are {sorted(real_counts)}; sample from a GAN trained on it",
        )
    if ratio <= 0:
        return samples
    target = round(ratio * max(real_counts.values()))
    left = {c: max(0, target - n) for c, n in real_counts.items()}
    out = []
    for s in samples:
        if left[s.label] > 0:
            out.append(s)
            left[s.label] -= 1
    return out
