"""Outlier exposure without an outlier dataset: does training the model to be unsure on
patch-shuffled copies of its own training images give a better trust signal? Validation only.

    python studies/outlier_exposure.py train CONFIG RUN_DIR [--data DATA] [--weight 0.5]
        [--grid 4] [--share 0.5] [OVERRIDE ...]
    python studies/trust_recipes.py --held-out-class CLASS --name N
        --recipe as-configured RUN HELD_OUT_RUN --recipe outlier-exposure RUN_OE HELD_OUT_RUN_OE
    python studies/outlier_exposure.py verdict studies/results/trust-recipes/N.json

``train`` trains CONFIG exactly as ``medxfer train`` does (same loop, data, schedule, BatchNorm
recalibration, trust statistics and metrics.json), with one change: every training batch gains
``share`` x batch-size outliers, made on the training device from the batch's own augmented
images by cutting each into a ``grid`` x ``grid`` mosaic and shuffling its tiles. The outliers
keep the scanner's intensities and textures and lose the anatomy. The loss adds ``weight`` x the
cross-entropy of the outliers' softmax to the uniform distribution (Hendrycks et al. 2019,
"Deep anomaly detection with outlier exposure", their weight 0.5). No image from the shift
suite's families (intensity, inversion, blur, noise, resolution, JPEG, rotation, zoom, field of
view), from another dataset or from the synthetic set is used, so the suite's cases stay unseen.
Run it twice: on the dataset's configuration, and on the held-out-class manifest that
``bench/trust.py --train-held-out`` wrote for the as-configured run (``--data`` that manifest
and ``data.allow_outside_root=true``), so both recipes have a run that never saw the class.

``verdict`` applies the rule to ``studies/trust_recipes.py``'s result. The rule, written before
the first outlier-exposure run started: outlier exposure would become a training option only if,
on validation, against the as-configured run of the same seed,

- accuracy is at most 0.005 lower;
- the new class's AUROC, by ``layers`` or by ``msp`` (whichever is higher; a gain by ``msp``
  would also move the default detector), is at least 0.03 above the as-configured ``layers``;
- ``layers``' shift-proxy mean AUROC is at most 0.01 lower;
- ``layers``' failure AUGRC is at most 25% higher (a guard: the flag's `review` half).

One seed on one dataset can at most ask for a second seed and the other dataset; it cannot by
itself add the option. The test split is not read here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACC_LOSS, GAIN, SHIFT_LOSS, AUGRC_RATIO = 0.005, 0.03, 0.01, 1.25
BASE, OE = "as-configured", "outlier-exposure"


def shuffled_tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Each image cut into ``grid`` x ``grid`` tiles, put back in a random order (its own per
    image). Sides that ``grid`` does not divide keep their last rows/columns in place."""
    b, c, h, w = x.shape
    th, tw = h // grid, w // grid
    out = x.clone()
    core = x[:, :, : th * grid, : tw * grid]
    tiles = core.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, grid * grid, c, th, tw)
    order = torch.argsort(torch.rand(b, grid * grid, device=x.device), dim=1)
    tiles = tiles[torch.arange(b, device=x.device)[:, None], order]
    tiles = tiles.reshape(b, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    out[:, :, : th * grid, : tw * grid] = tiles.reshape(b, c, th * grid, tw * grid)
    return out


class OutlierBatches:
    """A training loader whose batches carry ``share`` x batch-size outliers, labelled -1."""

    def __init__(self, loader: Any, grid: int, share: float) -> None:
        self.loader, self.grid, self.share = loader, grid, share

    def __getattr__(self, name: str) -> Any:  # set_epoch, normalize, indices, ...
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            n = max(1, round(self.share * x.shape[0]))
            out = shuffled_tiles(x[:n], self.grid)
            labels = torch.full((n,), -1, dtype=y.dtype, device=y.device)
            yield torch.cat([x, out]), torch.cat([y, labels])  # cat keeps channels_last


class OutlierExposureLoss(nn.Module):
    """The run's own loss on labelled images plus ``weight`` x the cross-entropy to uniform on
    the outliers (label -1)."""

    def __init__(self, base: nn.Module, weight: float) -> None:
        super().__init__()
        self.base, self.weight = base, weight

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        known = y >= 0
        loss = self.base(logits[known], y[known])
        if (~known).any():
            loss = loss + self.weight * -F.log_softmax(logits[~known].float(), 1).mean()
        return loss


def train(args: argparse.Namespace, overrides: list[str]) -> None:
    from medxfer import cli
    from medxfer.train import loop

    build = loop.build

    def with_outliers(cfg: Any, c: Any) -> Any:
        s = build(cfg, c)
        s.train_loader = OutlierBatches(s.train_loader, args.grid, args.share)  # type: ignore[assignment]
        s.loss_fn = OutlierExposureLoss(s.loss_fn, args.weight)
        return s

    loop.build = with_outliers
    argv = ["train", "--config", str(args.config), "--run-dir", str(args.run_dir)]
    if args.data:
        argv += ["--data", str(args.data)]
    if (args.run_dir / "last.pt").is_file() and not (args.run_dir / "metrics.json").is_file():
        argv.append("--resume")
    note = {"weight": args.weight, "grid": args.grid, "share": args.share,
            "command": " ".join(sys.argv)}  # fmt: skip
    code = cli.main([*argv, *overrides])
    if code == 0:
        (args.run_dir / "outlier_exposure.json").write_text(json.dumps(note, indent=1) + "\n")
    raise SystemExit(code)


def verdict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing\nfix: run studies/trust_recipes.py first")
    table = json.loads(path.read_text())["table"]
    if BASE not in table or OE not in table:
        raise SystemExit(f"error: {path} lacks the recipes {BASE!r} and {OE!r}\n"
                         f"fix: name them so with trust_recipes.py --recipe")  # fmt: skip
    b, o = table[BASE], table[OE]
    new = max(o["layers"]["new_class_auroc"], o["msp"]["new_class_auroc"])
    checks = {
        "accuracy": o["accuracy"] >= b["accuracy"] - ACC_LOSS,
        "new_class": new >= b["layers"]["new_class_auroc"] + GAIN,
        "shift_proxies": o["layers"]["shift_proxy_mean_auroc"]
        >= b["layers"]["shift_proxy_mean_auroc"] - SHIFT_LOSS,
        "failure_augrc": o["layers"]["failure_augrc"] <= AUGRC_RATIO * b["layers"]["failure_augrc"],
    }
    return {"checks": checks, "passes": all(checks.values()), "new_class_best": new}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train CONFIG with outlier exposure")
    t.add_argument("config", type=Path)
    t.add_argument("run_dir", type=Path)
    t.add_argument("--data", type=Path, help="a data folder or manifest (as medxfer train)")
    t.add_argument("--weight", type=float, default=0.5)
    t.add_argument("--grid", type=int, default=4)
    t.add_argument("--share", type=float, default=0.5, help="outliers per labelled image")
    v = sub.add_parser("verdict", help="apply the rule to trust_recipes.py's JSON")
    v.add_argument("result", type=Path)
    args, rest = p.parse_known_args()
    if args.cmd == "train":
        train(args, rest)
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        print(json.dumps(verdict(args.result), indent=1))


if __name__ == "__main__":
    main()
