"""Pack a dataset small enough to travel to a lent GPU machine (64 MiB per call).

    python bench/gpu/pack.py ../shared/data/brain-tumor-mri .gpu/brain --size 224 --parts 2

Each image is resized so its longer side is ``--size`` (grayscale, JPEG quality ``--quality``)
and written under ``<out>/p<k>/<split>/<class>/``; ``<out>/p<last>/manifest.csv`` lists all of
them (``path,label,split``, paths relative to the manifest), so the parts can travel in
separate calls and the last one carries the manifest. Resizing to the training size before
the run changes nothing the training sees beyond one extra JPEG round trip.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image

EXTS = {".jpg", ".jpeg", ".png"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--parts", type=int, default=2)
    args = p.parse_args()
    files = sorted(f for f in args.src.rglob("*") if f.suffix.lower() in EXTS)
    rows = []
    sizes = [0] * args.parts
    for i, f in enumerate(files):
        split, label = f.relative_to(args.src).parts[:2]
        part = i % args.parts
        rel = Path(f"p{part}") / split / label / (f.stem + ".jpg")
        dst = args.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(f).convert("L")
        im.thumbnail((args.size, args.size), Image.Resampling.BICUBIC)
        im.save(dst, "JPEG", quality=args.quality)
        sizes[part] += dst.stat().st_size
        rows.append({"path": f"../{rel}", "label": label, "split": split})
    last = args.out / f"p{args.parts - 1}"
    with (last / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} images; part sizes MB: {[round(s / 1e6, 1) for s in sizes]}")


if __name__ == "__main__":
    main()
