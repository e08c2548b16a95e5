"""Test accuracy of `medxfer train` on a real dataset's official test split.

    python bench/accuracy.py brain-tumor-mri [--variants imagenet scratch imagenet_no_leaks]
    python bench/accuracy.py chest-xray-pneumonia
    python bench/accuracy.py brain-tumor-mri --variants imagenet --tag cpu224 \
        --extra data.image_size=224 train.epochs=10 eval.tta=true

Each variant is one `medxfer train` call under the same CPU protocol (resolution, epochs,
seed, recipe given below and saved in the JSON): `imagenet` fine-tunes efficientnet_lite0 from
the offline ImageNet weights, `scratch` is the same with model.weights=none, and
`imagenet_no_leaks` adds data.drop_leaks=true (train images that duplicate a test image,
exactly or nearly, are dropped before training).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from _common import REPO, RESULTS, SHARED_DATA, abspath, medxfer_cmd, run, save

from medxfer.evaluate.metrics import run_summary

PROTOCOLS: dict[str, list[str]] = {
    "brain-tumor-mri": [
        "data.image_size=160",
        "train.epochs=8",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.weight_decay=0.05",
        "train.label_smoothing=0.1",
        "augment.hflip=true",
        "augment.vflip=true",
        "train.seed=0",
    ],
    "chest-xray-pneumonia": [
        "data.image_size=192",
        "train.epochs=8",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.weight_decay=0.05",
        "train.label_smoothing=0.1",
        "augment.hflip=false",
        "train.seed=0",
    ],
}
VARIANTS = {
    "imagenet": ["model.weights=imagenet"],
    "scratch": ["model.weights=none"],
    "imagenet_no_leaks": ["model.weights=imagenet", "data.drop_leaks=true"],
}


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    return run_summary(metrics) | {"dropped_leaks": metrics["data"]["dropped_leaks"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=sorted(PROTOCOLS))
    p.add_argument("--data-root", type=abspath, default=SHARED_DATA)
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--out-dir", type=abspath, default=REPO / "runs" / "bench")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every variant")
    p.add_argument(
        "--tag", default="", help="a protocol variant: accuracy/<dataset>-<tag>.json, own runs"
    )
    args = p.parse_args()
    data = args.data_root / args.dataset
    variants = args.variants or (
        ["imagenet", "scratch", "imagenet_no_leaks"]
        if args.dataset == "brain-tumor-mri"
        else ["imagenet", "scratch"]
    )
    stem = f"{args.dataset}-{args.tag}" if args.tag else args.dataset
    out_name = f"accuracy/{stem}"
    out_path = RESULTS / f"{out_name}.json"
    results: dict[str, Any] = {}
    if out_path.exists():  # keep variants measured by an earlier call
        results = {k: v for k, v in json.loads(out_path.read_text()).items() if k in VARIANTS}
    protocol = [*PROTOCOLS[args.dataset], *args.extra]
    for v in variants:
        run_dir = args.out_dir / f"{stem}-{v}"
        cmd = [
            *medxfer_cmd(),
            "train",
            "--data",
            str(data),
            "--run-dir",
            str(run_dir),
            "--resume",
            "model.arch=efficientnet_lite0",
            *protocol,
            *VARIANTS[v],
        ]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        _, seconds = run(cmd, args.out_dir / f"{stem}-{v}.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[v] = summarize(metrics) | {
            "command": " ".join(cmd),
            "wall_seconds": round(seconds, 1),
            "run_dir": str(run_dir),
        }
        print(
            json.dumps(
                {v: {k: results[v][k] for k in ("test_accuracy", "test_balanced_accuracy")}}
            ),
            flush=True,
        )
        save(
            out_name,
            {
                **results,
                "data": str(data),
                "arch": "efficientnet_lite0",
                "protocol": protocol,
                "split": "official test split, never used for "
                "training or model selection; val = 15% of train, stratified, seed 0",
                "targets": {"brain-tumor-mri": 0.96, "chest-xray-pneumonia": 0.815}[args.dataset],
            },
        )


if __name__ == "__main__":
    main()
