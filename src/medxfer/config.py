"""Typed experiment configuration: dataclasses per concern, YAML load/save, dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "model.arch=resnet18"])

Unknown keys are rejected with the list of valid names, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from medxfer.errors import MedxferError


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # folder or CSV manifest; "" = the embedded SYNTHETIC demo set
    image_size: int = 224  # side in px every image is resized to (square)
    # gray | rgb: what the cache stores; gray is copied to 3 channels
    color: Literal["gray", "rgb"] = "gray"
    resize: Literal["pad", "squash"] = "pad"  # pad (keep aspect ratio) | squash
    val_fraction: float = 0.15  # share of train carved off as validation (stratified)
    test_fraction: float = 0.15  # only used when the dataset has no test split of its own
    split_seed: int = 0  # seed of the validation (and carved test) split
    drop_leaks: bool = False  # drop train images that duplicate (exactly or nearly) a test image
    leak_threshold: float = 0.99  # correlation above which two images count as duplicates
    # true: carve validation (and a carved test split) by groups of near-duplicate training
    # images (data.leak_threshold, as the audit finds them), so that no validation image has
    # a near copy in training: for slices of one scan or re-saved copies without patient IDs
    group_near_duplicates: bool = False
    skip_unreadable: bool = False  # skip unreadable images instead of stopping
    cache_dir: str = ""  # decode cache; "" = $MEDXFER_CACHE or ~/.cache/medxfer
    train_subset: float = 1.0  # fraction of the training split to use (quick searches)
    class_fraction: str = ""  # e.g. "viral:0.25": keep that fraction of a class's train images
    synthetic: str = ""  # manifest CSV of `medxfer gan sample`: generated images, train split only
    synthetic_ratio: float = 0.0  # > 0: per class, add only up to ratio x largest class; 0 = all
    # regular expression giving the patient ID from a file name (first group, else the match):
    # val is then carved by patient, e.g. '^(person\d+|NORMAL2-IM-\d+|IM-\d+)' for chest X-ray
    patient_regex: str = ""
    # an image a CSV manifest lists with two labels or in two splits stops training with the
    # rows named; true: leave every such image out (they are recorded in data.json)
    drop_conflicts: bool = False
    # manifest paths that leave the manifest's folder ("../", absolute elsewhere) stop training;
    # true: accept them
    allow_outside_root: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True  # false = no training augmentation at all
    hflip: bool = True  # random horizontal flips (off where laterality matters)
    vflip: bool = False  # random vertical flips
    rotate_deg: float = 10.0  # random rotation in [-rotate_deg, +rotate_deg] degrees
    scale: float = 0.10  # zoom in [1 - scale, 1 + scale]
    translate: float = 0.05  # fraction of the image size
    brightness: float = 0.15  # random shift in [-brightness, +brightness] (pixels in [0, 1])
    contrast: float = 0.15  # random contrast factor in [1 - contrast, 1 + contrast]
    # standard | robust (adds appearance ops: docs/augmentation.md)
    policy: Literal["standard", "robust"] = "standard"


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "efficientnet_lite0"  # backbone name (`medxfer models` lists them)
    weights: str = "imagenet"  # imagenet | none | path/to/state_dict.pt
    # none (full fine-tune) | head (train the head only) | unfreeze_after
    freeze: Literal["none", "head", "unfreeze_after"] = "none"
    unfreeze_epoch: int = 1  # with freeze=unfreeze_after: epochs of head-only training first
    dropout: float = -1.0  # < 0: keep the architecture's default


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 32  # images per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate (after warm-up; cosine decay to the end)
    weight_decay: float = 0.05  # weight decay (not on biases and norm layers)
    momentum: float = 0.9  # SGD momentum (optimizer=sgd only)
    warmup_epochs: float = 1.0  # linear learning-rate warm-up, in epochs
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy loss
    class_weight: bool = False  # inverse-frequency weighted loss
    weighted_sampling: bool = False  # sample each class equally often
    early_stopping: int = 0  # patience in epochs on val balanced accuracy; 0 = off
    seed: int = 0  # seed of initialization, order, augmentation and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: Literal["auto", "true", "false"] = "auto"  # auto | true | false
    # auto | fp32 | bf16 | fp16 (auto: AMP on CUDA, measured on CPU)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch default
    eval_batch_size: int = 64  # images per batch at evaluation
    steps_per_epoch: int = 0  # cap on optimizer steps per epoch; 0 = one pass over train
    # after training: BatchNorm statistics re-estimated on the un-augmented training images,
    # kept when validation balanced accuracy does not drop (medxfer.train.batchnorm)
    bn_recalibrate: bool = True
    # > 0: keep an exponential moving average of the weights (decay per optimizer step, warmed
    # up from 0 as in timm's ModelEmaV3) and validate, checkpoint and ship it; 0 = off
    ema: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    n_bootstrap: int = 1000  # bootstrap resamples of the 95% intervals
    tta: bool = False  # average predictions over the image and the flips used in training


@dataclass(frozen=True)
class TrustConfig:
    """Per-image trust after training (medxfer.evaluate.trust); it never changes the model."""

    enabled: bool = True  # fit OOD/failure detectors and conformal sets at the end of training
    acceptance: float = 0.95  # fraction of validation images that end `ok` (sets thresholds)
    coverage: float = 0.90  # nominal coverage of the conformal prediction sets
    class_conditional: bool = False  # conformal calibration per class (Mondrian)
    # conformal nonconformity score: lac (1 - p: the smallest sets) or aps (the mass of the
    # classes ranked above plus its own: sets grow when a shift flattens the softmax, and keep
    # their coverage under strong shifts better; docs/trust.md)
    conformal_score: Literal["lac", "aps"] = "lac"
    train_images: int = 5000  # training images the detectors are fitted on (seeded; fewer = faster)
    # the `unfamiliar` detector: auto = the distance that best tells validation images from
    # shifted copies of them; or fixed: mahalanobis, knn, vim (penultimate features: what the
    # image shows, e.g. a finding the model never saw) or layers (several depths: also how it
    # looks, e.g. another scanner); docs/trust.md compares them
    detector: Literal["auto", "mahalanobis", "knn", "vim", "layers"] = "auto"


def default_space() -> dict[str, dict[str, Any]]:
    """The default search space of ``medxfer tune``: learning rate, batch size, weight decay."""
    return {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
        "train.weight_decay": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    }


@dataclass(frozen=True)
class TuneConfig:
    """``medxfer tune``: an Optuna study over ``space`` (dotted config key -> distribution)."""

    n_trials: int = 20  # finished (complete + pruned) trials the study ends with
    # the validation value the study optimises (val_loss is minimised, the others maximised)
    metric: Literal["val_balanced_accuracy", "val_accuracy", "val_loss"] = "val_balanced_accuracy"
    seed: int = 0  # TPE sampler seed
    # median | halving | hyperband | none
    pruner: Literal["median", "halving", "hyperband", "none"] = "median"
    startup_trials: int = 5  # median pruner: trials that are never pruned
    warmup_epochs: int = 1  # median pruner: epochs before a trial can be pruned
    epochs: int = 0  # per-trial epoch budget; 0 = train.epochs
    train_subset: float = 1.0  # per-trial fraction of the training split (the best config: 1)
    image_size: int = 0  # per-trial image size (a cheaper, low-resolution search); 0 = data's
    max_failures: int = 3  # a worker stops after this many failed trials in a row
    # dotted config key -> distribution ({type: float | int | categorical, low, high, log,
    # choices}); the default searches train.lr, train.batch_size and train.weight_decay
    space: dict[str, dict[str, Any]] = field(default_factory=default_space)


@dataclass(frozen=True)
class PruneConfig:
    """Lottery-ticket pruning (``medxfer prune``); plain ``train`` ignores it."""

    levels: int = 5  # pruning rounds after the dense level 0
    fraction: float = 0.2  # of the surviving weights removed per round (global magnitude)
    target_sparsity: float = 0.0  # > 0: per-round fraction chosen to end exactly there
    rewind: str = "init"  # init | epoch:K | lr (keep the weights, replay the LR schedule)
    controls: bool = True  # per level: same mask randomly re-initialized, random mask
    include_head: bool = False  # prune the classification head too
    finetune: bool = False  # baseline per level: prune the trained weights and fine-tune
    finetune_lr_scale: float = 0.1  # fine-tuning learning rate = train.lr * this
    # > 0: one more baseline per level, the pruned trained weights fine-tuned like `finetune`
    # while the dense level-0 model teaches them (knowledge distillation, this weight on the
    # soft term, 1 - it on the labels); 0 = none
    distill: float = 0.0
    distill_temperature: float = 4.0  # softmax temperature of that distillation term
    # > 0: the ticket and both controls retrain with the dense level-0 model as their teacher
    # (this weight on the soft term, 1 - it on the labels, temperature `distill_temperature`):
    # a distilled lottery, whose pruned runs keep closer to the dense model's answers; 0 = labels
    ticket_distill: float = 0.0
    # which weights of a finished run are pruned (their magnitudes choose the mask), rewound to
    # by `lr`, fine-tuned by `finetune` / `distill` and teach `distill`: last = the final epoch
    # (open_lth's and Frankle & Carbin's choice); best = best.pt, the epoch validation chose,
    # which is the model the results table reports as dense
    weights: Literal["last", "best"] = "last"
    image_size: int = 0  # every lottery run at this size; 0 = data.image_size
    epochs: int = 0  # epochs of every lottery run; 0 = train.epochs


@dataclass(frozen=True)
class StructuredConfig:
    """L1-norm channel pruning of a trained run, then fine-tuning (``medxfer prune-structured``).

    Plain ``train`` ignores it. These keys were ``prune.structured_*`` before (still read)."""

    ratio: float = 0.0  # in (0, 1): channels removed per layer; 0 = by the speed-up
    speedup: float = 2.0  # MACs cut the ratio is chosen for (CPU time falls less)
    epochs: int = 0  # fine-tuning epochs; 0 = train.epochs of the dense run
    # fine-tuning learning rate = train.lr * this; 1.0 beat 0.3 on validation at equal epochs
    # (studies/results/structured-lr/result.json: brain +5.6 points balanced accuracy, chest -0.6)
    lr_scale: float = 1.0
    # > 0: the dense model teaches its pruned copy while it is fine-tuned (knowledge
    # distillation, this weight on the soft term, 1 - it on the labels); 0 = labels only
    distill: float = 0.0
    temperature: float = 4.0  # softmax temperature of the distillation term
    # experimental: docs/studies/structured.md, 4 steps tested worse than 1 cut (0.867 vs 0.918)
    # > 1: prune iteratively, the cut reached in this many equal steps (a `ratio * i / steps`
    # share of every group's channels gone after step i), each step fine-tuned for its share
    # of `epochs` before the next one scores channels by L1 norm
    steps: int = 1
    # > 0: this many epochs of soft filter pruning on the whole network before the cut (He et
    # al. 2018, SFP): at the start of each, the channels the cut would remove (L1 norm, a share
    # ramped up to the ratio) are zeroed but keep training and may grow back; the cut then
    # removes the channels that are smallest after them. Extra to `epochs`.
    soft: int = 0
    # learning-rate warm-up epochs of each structured fine-tune (the lottery's fine-tuning
    # baseline has none; a dense run usually has train.warmup_epochs)
    warmup: float = 0.0


@dataclass(frozen=True)
class GanConfig:
    """WGAN-GP synthesis of minority-class images (``medxfer gan``); plain ``train`` ignores it."""

    image_size: int = 64  # 64 | 128
    conditional: bool = True  # one class-conditional GAN; false = one GAN per minority class
    steps: int = 5000  # generator steps
    max_minutes: float = 0.0  # > 0: also stop (and finish) after this much training time
    batch_size: int = 64  # images per GAN step
    z_dim: int = 128  # length of the generator's noise vector
    width: int = 64  # channels of the widest generator / critic block = 8 x width
    lr: float = 1e-4  # Adam learning rate of generator and critic
    beta1: float = 0.0  # Adam beta1
    beta2: float = 0.9  # Adam beta2
    n_critic: int = 5  # critic steps per generator step
    gp_weight: float = 10.0  # weight of the WGAN-GP gradient penalty
    ema: float = 0.0  # > 0: sample from an exponential moving average of the generator
    min_images: int = 50  # a class with fewer training images is refused
    balance: float = 1.0  # `gan sample --balance`: fill minority classes up to ratio x largest
    sample_every: int = 500  # generator steps between sample grids
    checkpoint_every: int = 100  # generator steps between resumable checkpoints
    seed: int = 0  # seed of the GAN's training and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    quality_size: int = 224  # px the quality check's Lite0 sees (FID/KID, TSTR); less = quicker
    # DiffAugment (Zhao et al. 2020): translation, cutout and brightness/contrast, differentiable,
    # applied to the real and the fake batch before the critic (and its gradient penalty)
    diffaugment: bool = True
    # the critic: plain = the paper's WGAN-GP critic, learnt from the images (gradient penalty);
    # projected = small heads on frozen ImageNet EfficientNet-Lite0 features (Projected GAN,
    # Sauer et al. 2021), hinge loss, no gradient penalty (gp_weight is ignored)
    critic: Literal["plain", "projected"] = "plain"
    # > 0: the mode-seeking term (Mao et al. 2019, MSGAN) with this weight in the generator's
    # loss: each step pairs two noise vectors per label and penalises 1 / (image distance / z
    # distance), so a generator that makes one image per class pays for it
    diversity: float = 0.0
    # a named schedule filling every key above still at its default (a key you set wins):
    #   cpu-64   64 px, width 16, batch 32, n_critic 5, ema 0.995, 60 minutes (about 2,000
    #            generator steps on 2 CPU cores)
    #   gpu-128  128 px, width 64, batch 64, n_critic 5, ema 0.999, 20,000 steps or 60 minutes
    #   cpu-64-projected   64 px, critic projected, width 32, batch 32, n_critic 1, lr 2e-4,
    #            beta2 0.99, ema 0.995, diversity 1, 60 minutes
    recipe: Literal["", "cpu-64", "cpu-64-projected", "gpu-128"] = ""
    # The quality gate (medxfer.gan.gate), on the training split only: a class whose synthetic
    # images fail it gets none in training, and the run uses this strategy instead:
    #   oversample (train.weighted_sampling) | class_weight (train.class_weight) | none
    gate_fallback: Literal["oversample", "class_weight", "none"] = "oversample"
    gate_images: int = 150  # images per class the gate's FID/KID/two-sample/TSTR look at
    gate_size: int = 96  # px the gate's Lite0 features see (the GAN images are 64 or 128 px)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "run"  # run name: the prefix of run folders, the experiment folder
    out_dir: str = "runs"  # where run and experiment folders are written
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (not the output location, not ``tune``)."""
        d = self.to_dict()
        d.pop("out_dir")
        d.pop("name")
        d.pop("tune")
        d["train"].pop("device")
        d.pop("prune")  # a trained run does not depend on it; keeps older run folders' hashes
        d.pop("structured")  # likewise (these keys were prune.structured_* before)
        d.pop("trust")  # fitted after training from the trained model; never changes it
        d.pop("gan")  # the generator is trained separately; its images count via data.synthetic
        drop_later_defaults(d)
        if self.data.synthetic and Path(self.data.synthetic).is_file():
            # the same manifest path re-sampled is another training set
            d["data"]["synthetic_sha256"] = hashlib.sha256(
                Path(self.data.synthetic).read_bytes()
            ).hexdigest()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Keys added after results had been recorded with this version's hashes. A fingerprint leaves
# each out while it is at its default, so run folders and studies made before it existed keep
# their names; set away from the default, it changes the result and is hashed.
LATER_KEYS: dict[str, tuple[str, ...]] = {
    "data": (
        "class_fraction",
        "synthetic",
        "synthetic_ratio",
        "patient_regex",
        "drop_conflicts",
        "allow_outside_root",
        "group_near_duplicates",
    ),
    "augment": ("policy",),
    "train": ("ema",),
    "tune": ("image_size",),
    "prune": (
        "distill",
        "distill_temperature",
        "weights",
        "ticket_distill",
    ),
    "gan": ("quality_size", "critic", "diversity"),
}


def drop_later_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (an ``ExperimentConfig.to_dict()``, or part of one) without the ``LATER_KEYS`` that
    are at their defaults; changes ``d`` in place and returns it."""
    defaults = ExperimentConfig().to_dict()
    for section, keys in LATER_KEYS.items():
        for key in keys:
            if section in d and key in d[section] and d[section][key] == defaults[section][key]:
                d[section].pop(key)
    return d


# The `structured` keys a lottery folder or stage hash holds at their defaults: they were
# ``prune.structured_*`` when those hashes were made (no lottery depends on them); the ones
# added later were left out at their defaults, like ``LATER_KEYS``.
LOTTERY_STRUCTURED_KEYS = ("ratio", "speedup", "epochs", "lr_scale")


def lottery_key(p: PruneConfig) -> dict[str, Any]:
    """The prune settings as lottery folder and stage hashes see them: ``prune-structured``'s
    own keys (``LOTTERY_STRUCTURED_KEYS``, as ``structured_*``) at their defaults, and the
    ``LATER_KEYS`` at their defaults left out, so folders made before a key existed keep their
    names."""
    d = asdict(p)
    defaults = asdict(StructuredConfig())
    d |= {f"structured_{k}": defaults[k] for k in LOTTERY_STRUCTURED_KEYS}
    return drop_later_defaults({"prune": d})["prune"]


# Top-level keys of an experiment file (`medxfer run`, medxfer.experiment) that a plain
# train / tune / prune of the same file ignores: which stages run, the matrix of cells, report.
EXPERIMENT_KEYS = ("stages", "matrix", "report")


def _valid_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert YAML / command-line values to the declared field type."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise MedxferError(f"config key {key!r} must be a mapping", f"see {key}.* names")
        return _from_dict(typ, value, key + ".")  # type: ignore[arg-type]
    if isinstance(typ, types.UnionType):
        typ = typing.get_args(typ)[0]
    if (allowed := _literal_args(typ)) is not None:
        typ = type(allowed[0])  # parsed as such; ``validate`` checks it is one of them
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return low in {"true", "1", "yes", "on"}
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            number = float(value)
            if not math.isfinite(number):
                raise MedxferError(
                    f"config key {key!r}: {value!r} is not a finite number",
                    f"give {key} a finite value",
                )
            return number
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise MedxferError(
            f"config key {key!r}: {value!r} is not a valid {typ.__name__}",
            f"give {key} a {typ.__name__} value",
        ) from None
    return value


# The channel-pruning keys were ``prune.structured_<name>`` before they got the `structured`
# section. Config files, overrides and stored configs (run folders' config.yaml,
# structured_settings.json, model files) that use the old names are read as
# ``structured.<name>``, silently, so older run folders load and resume as before; what
# medxfer writes uses the new section. This is the one place that maps them.
LEGACY_PREFIX = "prune.structured_"


def renamed_key(key: str) -> str:
    """A dotted key as it is named now: ``prune.structured_ratio`` -> ``structured.ratio``."""
    name = key.removeprefix(LEGACY_PREFIX)
    if key.startswith(LEGACY_PREFIX) and name in _valid_names(StructuredConfig):
        return "structured." + name
    return key


def legacy_override(assignment: str) -> str:
    """A ``key=value`` override as spelled before: ``structured.ratio=0.5`` ->
    ``prune.structured_ratio=0.5`` (what names were hashed with then); others unchanged."""
    key, eq, value = assignment.partition("=")
    name = key.strip().removeprefix("structured.")
    if key.strip().startswith("structured.") and name in _valid_names(StructuredConfig):
        return f"{LEGACY_PREFIX}{name}{eq}{value}"
    return assignment


def renamed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping (``ExperimentConfig`` level) with the old ``prune.structured_*`` keys
    moved to ``structured`` (a key given under both names: the ``structured`` one wins)."""
    prune = data.get("prune")
    if not isinstance(prune, dict):
        return data
    old = {k: k.removeprefix("structured_") for k in prune
           if renamed_key("prune." + k) != "prune." + k}  # fmt: skip
    if not old:
        return data
    structured = data.get("structured") or {}
    if not isinstance(structured, dict):
        return data  # refused as "must be a mapping" below
    moved = {new: prune[k] for k, new in old.items()}
    return {**data, "prune": {k: v for k, v in prune.items() if k not in old},
            "structured": moved | structured}  # fmt: skip


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if cls is ExperimentConfig:
        data = renamed_keys(data)
    valid = _valid_names(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise MedxferError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}",
            f"valid names under {prefix or 'the top level'}: {', '.join(valid)}",
        )
    kwargs = {k: _coerce(v, _field_type(cls, k), prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _replaced(obj: Any, parts: list[str], value: Any) -> Any:
    """``obj`` (a frozen dataclass) with the field at the dotted path ``parts`` set to ``value``."""
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    inner = _replaced(getattr(obj, parts[0]), parts[1:], value)
    return dataclasses.replace(obj, **{parts[0]: inner})


def with_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted keys set, e.g. ``with_values(cfg, {"train.threads": 1})``:
    the config is frozen, so this (``dataclasses.replace`` on the nested sections) is how code
    changes it. Values are taken as given (typed); ``apply_override`` parses text."""
    out = cfg
    for key, value in values.items():
        out = _replaced(out, key.split("."), value)
    return out


def apply_override(cfg: ExperimentConfig, assignment: str) -> ExperimentConfig:
    """``cfg`` with one ``section.key=value`` override applied (YAML-parsed value)."""
    if "=" not in assignment:
        raise MedxferError(
            f"override {assignment!r} is not of the form key=value", "e.g. train.lr=3e-4"
        )
    key, raw = assignment.split("=", 1)
    parts = renamed_key(key.strip()).split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        valid = _valid_names(type(target))
        if part not in valid:
            where = ".".join(parts[:i]) or "the top level"
            raise MedxferError(
                f"unknown config key {key!r}", f"valid names under {where}: {', '.join(valid)}"
            )
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise MedxferError(f"config key {'.'.join(parts[: i + 1])!r} has no sub-keys")
    value = yaml.safe_load(raw) if raw.strip() else ""
    coerced = _coerce(value, _field_type(type(target), parts[-1]), key)
    return with_values(cfg, {".".join(parts): coerced})


def apply_overrides(cfg: ExperimentConfig, assignments: Iterable[str]) -> ExperimentConfig:
    """``cfg`` with each ``section.key=value`` override applied in turn (not validated)."""
    for assignment in assignments:
        cfg = apply_override(cfg, assignment)
    return cfg


def _literal_args(typ: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` type hint (None for any other type)."""
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def choices(cls: type | None = None) -> dict[str, tuple[str, ...]]:
    """Dotted key -> allowed values of every field typed ``Literal[...]`` (all sections of
    ``cls``, default ``ExperimentConfig``): what ``validate`` checks and the reference lists."""
    out: dict[str, tuple[str, ...]] = {}
    for name, typ in typing.get_type_hints(cls or ExperimentConfig).items():
        if dataclasses.is_dataclass(typ):
            assert isinstance(typ, type)
            out |= {f"{name}.{k}": v for k, v in choices(typ).items()}
        elif (allowed := _literal_args(typ)) is not None:
            out[name] = allowed
    return out


def validate(cfg: ExperimentConfig) -> None:
    for key, allowed in choices().items():  # the Literal[...] fields, from their type hints
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise MedxferError(f"{key}={value!r} is not allowed", f"use one of {sorted(allowed)}")
    if cfg.data.image_size < 32:
        raise MedxferError("data.image_size must be at least 32", "e.g. data.image_size=224")
    for key, size in (("tune.image_size", cfg.tune.image_size),
                      ("prune.image_size", cfg.prune.image_size)):  # fmt: skip
        if size != 0 and size < 32:
            raise MedxferError(f"{key} must be 0 (= data.image_size) or at least 32")
    if cfg.prune.epochs < 0:
        raise MedxferError("prune.epochs must be >= 0 (0 = train.epochs)")
    if not 1 <= cfg.structured.steps <= 64:  # a model file replays each step on load
        raise MedxferError("structured.steps must be in 1..64 (1 = prune once)")
    if cfg.structured.warmup < 0:
        raise MedxferError("structured.warmup must be >= 0 (epochs of LR warm-up)")
    if cfg.structured.soft < 0:
        raise MedxferError("structured.soft must be >= 0 (0 = no soft pruning)")
    if not 0 <= cfg.data.val_fraction < 1 or not 0 <= cfg.data.test_fraction < 1:
        raise MedxferError("data.val_fraction and data.test_fraction must be in [0, 1)")
    if not 0 < cfg.data.train_subset <= 1:
        raise MedxferError("data.train_subset must be in (0, 1]")
    if not 0 < cfg.trust.acceptance < 1 or not 0 < cfg.trust.coverage < 1:
        raise MedxferError("trust.acceptance and trust.coverage must be in (0, 1)")
    if cfg.trust.train_images < 100:
        raise MedxferError("trust.train_images must be at least 100", "e.g. 5000 (the default)")
    if cfg.data.synthetic_ratio < 0:
        raise MedxferError("data.synthetic_ratio must be >= 0", "e.g. data.synthetic_ratio=1.0")
    parse_class_fraction(cfg.data.class_fraction)
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1:
        raise MedxferError("train.epochs and train.batch_size must be positive")
    if not (math.isfinite(cfg.train.lr) and cfg.train.lr > 0):
        raise MedxferError("train.lr must be a positive finite number", "e.g. train.lr=1e-3")
    if not 0 <= cfg.train.ema < 1:
        raise MedxferError("train.ema must be in [0, 1) (0 = off)", "e.g. train.ema=0.995")


def parse_class_fraction(spec: str) -> dict[str, float]:
    """``"viral:0.25,normal:0.5"`` -> ``{"viral": 0.25, "normal": 0.5}`` (fractions in (0, 1])."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, frac = part.rpartition(":")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not name or not 0 < value <= 1:
            raise MedxferError(
                f"data.class_fraction entry {part!r} is not class:fraction with fraction in (0, 1]",
                'e.g. data.class_fraction="viral:0.25"',
            )
        out[name] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Defaults, then the YAML file (if any), then the dotted overrides; validated."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise MedxferError(f"config file {p} does not exist", "check the --config path")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise MedxferError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise MedxferError(f"config file {p} must hold a mapping at the top level")
    for key in EXPERIMENT_KEYS:  # an experiment file is a superset of a plain config
        data.pop(key, None)
    cfg: ExperimentConfig = _from_dict(ExperimentConfig, data)
    cfg = apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """A config from ``to_dict()`` output (keys a newer version added take their defaults)."""
    cfg: ExperimentConfig = _from_dict(ExperimentConfig, data)
    return cfg


def config_text(cfg: ExperimentConfig) -> str:
    """The YAML that ``save_config`` writes."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(config_text(cfg))
