"""Typed, validated configuration.

params.yaml is parsed once, at the entry point, into frozen dataclasses; the rest of
the code reads attributes, never dicts. Every problem is reported as one
``ConfigError`` line naming the key, the bad value and what is allowed.

Float fields also accept fractions written as strings (``eps: 8/255``), because
attack budgets are conventionally given that way and YAML has no fraction type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from amoc.errors import ConfigError

VARIANTS = ("CCC", "CAC", "CAA", "ACC", "ACA", "ACA+", "AAC", "AAA")
# Accepted spellings that are normalised to the canonical name.
VARIANT_ALIASES = {"ACA_PLUS": "ACA+", "ACAPLUS": "ACA+", "ACA-PLUS": "ACA+"}
MAX_PARAMS_BYTES = 1 << 20  # a params file larger than 1 MiB is not a params file


def spec(
    default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False, doc: str = ""
) -> Any:
    """A dataclass field with an allowed range, checked at load time."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class AttackConfig:
    """L-inf PGD; the step size is ``step_ratio * eps`` (the paper's 0.25 * eps)."""

    eps: float = spec(8 / 255, lo=0.0, hi=1.0)
    step_ratio: float = spec(0.25, lo=0.0, hi=1.0, lo_open=True)
    steps: int = spec(5, lo=0)
    random_start: bool = True

    @property
    def step_size(self) -> float:
        return self.step_ratio * self.eps


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR-style views (docs/pretrain.md); every probability is per sample."""

    crop_scale: list[float] = spec([0.2, 1.0], lo=0.0, hi=1.0)
    crop_ratio: list[float] = spec([3 / 4, 4 / 3], lo=0.0, lo_open=True)
    flip_p: float = spec(0.5, lo=0.0, hi=1.0)
    jitter: list[float] = spec([0.4, 0.4, 0.4, 0.1], lo=0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = spec(0.8, lo=0.0, hi=1.0)
    gray_p: float = spec(0.2, lo=0.0, hi=1.0)
    blur_p: float = spec(0.5, lo=0.0, hi=1.0)
    blur_sigma: list[float] = spec([0.1, 2.0], lo=0.0, lo_open=True)
    blur_kernel: int = spec(
        0,
        lo=0,
        doc="0 = PIL's GaussianBlur(radius=sigma), full support (the authors'); "
        "odd k = torchvision's truncated GaussianBlur(k)",
    )
    # the crop's resize filter: torchvision's antialiased bilinear, or bicubic (ACL's PIL BICUBIC)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # crop_first: crop, flip, jitter, grayscale, blur (SimCLR, AMOC, ACL); color_first:
    # jitter, grayscale, then flip and crop (RoCL's order)
    order: Literal["crop_first", "color_first"] = "crop_first"


@dataclass(frozen=True)
class DataConfig:
    name: Literal["cifar10", "cifar100", "folder", "digits"] = "cifar10"
    # "" = the official URL of `name`; otherwise an http(s):// or file:// URL or a
    # local path (archive, or for `folder` also a directory).
    source: str = ""
    # "" with the official source = the official md5. A custom archive needs one of them.
    md5: str = ""
    sha256: str = ""
    max_member_mb: int = spec(512, lo=1)
    train_limit: int = spec(0, lo=0, doc="keep the first N training images (0 = all)")
    test_limit: int = spec(0, lo=0, doc="keep the first N test images (0 = all)")


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["resnet18"] = "resnet18"
    width: float = spec(1.0, lo=0.0, hi=8.0, lo_open=True, doc="channel multiplier (1 = paper)")
    hidden_dim: int = spec(512, lo=1)
    feature_dim: int = spec(128, lo=1)
    temperature: float = spec(0.2, lo=0.0, lo_open=True)
    key_momentum: float = spec(0.999, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and AMX/AVX512-BF16 CPUs (amoc.runtime)
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA and for bf16 on such a CPU
    # training-time attacks (contrastive PGD, PGD-10 / TRADES): the training precision, or fp32 / bf16
    attack_precision: Literal["same", "fp32", "bf16"] = "same"
    compile: bool = False
    threads: int = spec(0, lo=0, doc="CPU threads (0 = torch default)")
    progress: bool = True


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (torchrun); batch sizes are always global batches."""

    bn: Literal["sync", "shuffle", "local"] = "sync"  # BN statistics across ranks (only when WORLD_SIZE > 1)
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr x batch_size / reference_batch (Goyal et al.)
    reference_batch: int = spec(256, lo=1, doc="the batch size at which lr is the configured value")


METHOD_NAMES = {
    "amoc": "AMOC",
    "acl": "ACL",
    "rocl": "RoCL",
    "dynacl": "DynACL",
}  # pretrain.method -> as papers and tables write it


@dataclass(frozen=True)
class InBatchConfig:
    """What the in-batch methods (ACL, RoCL, DynACL) share: LARS and the NT-Xent temperature.
    A method that redefines a field keeps its place, so every section's keys stay in this order."""

    lr: float = spec(5.0, lo=0.0, lo_open=True, doc="LARS learning rate (peak of the warm-up + cosine schedule)")
    momentum: float = spec(0.9, lo=0.0, hi=1.0)
    weight_decay: float = spec(1e-6, lo=0.0)
    trust: float = spec(1e-3, lo=0.0, lo_open=True, doc="LARS trust coefficient")
    temperature: float = spec(0.5, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class ACLConfig(InBatchConfig):
    """ACL (Jiang et al. 2020), its released DS variant (docs/methods.md): LARS, in-batch
    NT-Xent, a dual-BN projector, PGD-5 on both views."""

    projector: list[int] = spec([512, 512, 512], lo=1, doc="output sizes of the projector's layers")
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=[0.1, 1.0], blur_p=0.0, interpolation="bicubic")
    )


@dataclass(frozen=True)
class RoCLConfig(InBatchConfig):
    """RoCL (Kim et al. 2020, docs/methods.md): one BN, the instance-wise attack on one
    view, NT-Xent over (t1, t2, adversarial t1) plus a regulariser, LARS."""

    lr: float = spec(1.5, lo=0.0, lo_open=True, doc="LARS learning rate (peak: their 0.1 x 15)")
    regularizer: float = spec(1 / 256, lo=0.0, doc="weight of NT-Xent(adversarial, t2) (their 1/lamda, lamda 256)")
    projector: list[int] = spec([2048, 128], lo=1, doc="output sizes of the projector's layers")
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(step_ratio=0.223125, steps=7))  # step 0.007
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=[0.08, 1.0], blur_p=0.0, order="color_first")
    )


@dataclass(frozen=True)
class DynACLConfig(InBatchConfig):
    """DynACL (Luo, Wang & Wang 2023, docs/methods.md): ACL's DS with an EMA key encoder for
    the second view, and two schedules stepped every `period` epochs: the augmentation's
    strength s falls from 1 and the adversarial loss's weight w rises from 1 (their
    reload_frequency, swap_param)."""

    projector: list[int] = spec([512, 512, 512], lo=1, doc="output sizes of the projector's layers")
    key_momentum: float = spec(0.99, lo=0.0, hi=1.0, doc="EMA of the key encoder's parameters")
    period: int = spec(50, lo=1, doc="epochs between updates of the strength and the weight")
    horizon: int = spec(
        0, lo=0, doc="epochs over which the strength would fall from 1 to 0 (0 = pretrain.epochs, their code's)"
    )
    swap: float = spec(
        2 / 3,
        lo=0.0,
        doc="the weight's rise over the horizon (their swap_param): "
        "w = min(1 + swap * period * floor((epoch + 1) / period) / horizon, 2), epoch 0-based",
    )
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    # at strength 1; strength s: crop scale (1 - (1 - lo) s, hi), jitter, jitter_p and gray_p times s
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=[0.1, 1.0], blur_p=0.0))


@dataclass(frozen=True)
class FromEncoderConfig:
    """A released encoder instead of pre-training (docs/import.md): `amoc pretrain` converts
    the file (`amoc import-encoder`'s conversion) and writes the stage's outputs. The
    sha256 pins the file, so DVC re-runs the stage when it changes."""

    path: str = ""  # "" = pre-train as configured
    layout: Literal["authors", "acl", "dynacl"] = "authors"
    sha256: str = ""  # required with a path
    bn_branch: Literal["adv", "clean"] = "adv"  # the branch downstream stages use


@dataclass(frozen=True)
class PretrainConfig:
    # amoc | acl | rocl | dynacl. epochs, batch_size, warmup_epochs and the k-NN monitor are
    # shared; lr, momentum, weight_decay, enqueue_order, attack and augment below are AMOC's,
    # and the other methods' own settings are in pretrain.acl, pretrain.rocl, pretrain.dynacl.
    method: Literal["amoc", "acl", "rocl", "dynacl"] = "amoc"
    epochs: int = spec(200, lo=1)
    batch_size: int = spec(256, lo=2)
    lr: float = spec(0.1, lo=0.0, lo_open=True)
    momentum: float = spec(0.9, lo=0.0, hi=1.0)
    weight_decay: float = spec(5e-4, lo=0.0)
    warmup_epochs: int = spec(10, lo=0)
    queue_size_adv: int = spec(0, lo=0, doc="size of queue_adv (0 = queue_size)")
    enqueue_order: Literal["moco", "authors"] = "authors"  # docs/pretrain.md, "Enqueue order"
    attack: AttackConfig = field(default_factory=AttackConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = spec(10, lo=1, doc="epochs between checkpoints")
    knn_k: int = spec(200, lo=1)
    knn_every: int = spec(0, lo=0, doc="epochs between k-NN probes (0 = only at the end)")
    acl: ACLConfig = field(default_factory=ACLConfig)
    rocl: RoCLConfig = field(default_factory=RoCLConfig)
    dynacl: DynACLConfig = field(default_factory=DynACLConfig)
    from_encoder: FromEncoderConfig = field(default_factory=FromEncoderConfig)


@dataclass(frozen=True)
class DownstreamConfig:
    """What the classifier stages share: SGD with multi-step decay, the loss, TRADES' beta
    and the training-time attack (PGD-10)."""

    epochs: int = spec(25, lo=1)
    milestones: list[int] = spec([15, 20], lo=0)
    lr_gamma: float = spec(0.1, lo=0.0, hi=1.0, lo_open=True)
    batch_size: int = spec(128, lo=1)
    lr: float = spec(0.1, lo=0.0, lo_open=True)
    momentum: float = spec(0.9, lo=0.0, hi=1.0)
    weight_decay: float = spec(5e-4, lo=0.0)
    loss: Literal["trades", "pgd_at"] = "trades"  # probe: ALF's loss (SLF is always cross-entropy)
    beta: float = spec(6.0, lo=0.0)
    # TRADES' inner maximisation starts uniformly in the eps-ball (the authors' foolbox
    # LinfPGDKLDiv) or at x + 0.001 * N(0, 1) (the TRADES code)
    trades_start: Literal["uniform", "normal"] = "uniform"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=10))
    val_images: int = spec(
        1000,
        lo=0,
        doc="training images held out for per-epoch validation and the "
        "best-epoch classifier (class-balanced, fixed by seed; 0 = off)",
    )


@dataclass(frozen=True)
class ProbeConfig(DownstreamConfig):
    """SLF / ALF: 25 epochs, milestones 15 and 20; SLF has its own weight decay."""

    weight_decay_slf: float = spec(2e-4, lo=0.0)


@dataclass(frozen=True)
class FinetuneConfig(DownstreamConfig):
    """AFF and the from-scratch baseline: 100 epochs, milestones 40 and 60."""

    epochs: int = spec(100, lo=1)
    milestones: list[int] = spec([40, 60], lo=0)


@dataclass(frozen=True)
class EvaluateConfig:
    n_images: int = spec(0, lo=0, doc="test images to evaluate (0 = all)")
    batch_size: int = spec(500, lo=1)
    pgd: AttackConfig = field(default_factory=lambda: AttackConfig(steps=20))
    autoattack: bool = True
    # original: Croce & Hein's code (pyautoattack), resumable; torchattacks: its port (docs/downstream.md)
    autoattack_impl: Literal["original", "torchattacks"] = "original"
    autoattack_images: int = spec(0, lo=0, doc="images for AutoAttack (0 = n_images)")
    curve_eps: list[float] = spec(
        [0, 1, 2, 4, 6, 8, 12, 16], lo=0.0, hi=255.0, doc="robustness-curve budgets in units of 1/255"
    )


CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)


@dataclass(frozen=True)
class CorruptionsConfig:
    """CIFAR-10-C / CIFAR-100-C. `generate` builds an offline approximation from the
    prepared test split (labelled as such, never reported as the official set)."""

    source: str = "generate"  # generate | official | an http(s)/file URL or path to a *-C .tar
    md5: str = ""
    sha256: str = ""
    names: list[str] = spec(list(CORRUPTIONS))
    severities: list[int] = spec([1, 2, 3, 4, 5], lo=1, hi=5)
    n_images: int = spec(1000, lo=0, doc="test images per corruption and severity (0 = all)")


@dataclass(frozen=True)
class TransferConfig:
    """Black-box transfer: PGD examples crafted on a source model, scored on every target."""

    sources: list[str] = spec(["scratch"])
    n_images: int = spec(1000, lo=0, doc="test images (0 = all)")
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=20))


@dataclass(frozen=True)
class Config:
    # The knobs people sweep are top-level, so `dvc exp run -S queue_size=4096` works.
    variant: str = "ACA+"
    queue_size: int = spec(32768, lo=1)
    leverage: float = spec(0.5, lo=0.0, hi=1.0)
    seed: int = spec(1, lo=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    corruptions: CorruptionsConfig = field(default_factory=CorruptionsConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @property
    def queue_size_adv(self) -> int:
        return self.pretrain.queue_size_adv or self.queue_size


# --------------------------------------------------------------------------- parsing
def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {_fmt(value)} is not a number; expected a float such as 0.5 or 8/255")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key}: {_fmt(value)} is not a number; expected a float such as 0.5 or 8/255") from None
    else:
        raise ConfigError(f"{key}: {_fmt(value)} is not a number; expected a float such as 0.5 or 8/255")
    if not math.isfinite(out):
        raise ConfigError(f"{key}: {_fmt(value)} is not finite; expected a finite number")
    return out


def _check_range(key: str, value: float, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        lo_txt = "-inf" if lo is None else f"{lo:g}"
        hi_txt = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{key}: {_fmt(value)} is out of range; allowed {left}{lo_txt}, {hi_txt}]")


@dataclass(frozen=True)
class _Override:
    """A `--set` value: YAML-parsed, but text fields keep what was typed (an md5 of
    digits must not turn into a number)."""

    text: str
    parsed: Any


def _convert(key: str, tp: Any, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    if isinstance(value, _Override):
        value = value.text if tp is str else value.parsed
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}: {_fmt(value)} is not allowed; choose one of {', '.join(map(str, allowed))}{hint}"
            )
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {_fmt(value)} is not a list; expected a list of {item_tp.__name__}")
        return [_convert(f"{key}[{i}]", item_tp, v, meta) for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(key, args[0], value, meta)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {_fmt(value)} is not a boolean; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{key}: {_fmt(value)} is not an integer; expected a whole number")
        _check_range(key, value, meta)
        return value
    if tp is float:
        out = _as_float(key, value)
        _check_range(key, out, meta)
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {_fmt(value)} is not a string; expected text")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "params"
    if isinstance(raw, _Override):
        raw = raw.parsed
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {_fmt(raw)} is not a mapping; expected 'key: value' entries")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{full}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(full, hints[name], raw[name], f.metadata)
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> Config:
    variant = (
        VARIANT_ALIASES.get(cfg.variant.upper(), cfg.variant.upper()) if isinstance(cfg.variant, str) else cfg.variant
    )
    if variant not in VARIANTS:
        close = difflib.get_close_matches(str(cfg.variant).upper(), VARIANTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"variant: {_fmt(cfg.variant)} is not a variant; choose one of {', '.join(VARIANTS)} (ACA_PLUS = "
            f"ACA+){hint}"
        )
    cfg = dataclasses.replace(cfg, variant=variant)
    p = cfg.pretrain
    for name, size in (("queue_size", cfg.queue_size), ("pretrain.queue_size_adv", cfg.queue_size_adv)):
        if size < p.batch_size and p.method == "amoc":  # the other methods have no queue
            raise ConfigError(
                f"{name}: {size} is smaller than pretrain.batch_size={p.batch_size}; a queue must hold at least "
                "one batch of keys (raise it or lower pretrain.batch_size)"
            )
    if p.warmup_epochs > p.epochs:
        raise ConfigError(
            f"pretrain.warmup_epochs: {p.warmup_epochs} exceeds pretrain.epochs={p.epochs}; use at most the "
            "number of epochs"
        )
    for key, augment in (("", p), ("acl.", p.acl), ("rocl.", p.rocl), ("dynacl.", p.dynacl)):
        _check_augment(f"pretrain.{key}augment", augment.augment)
    for key, dims in (
        ("pretrain.acl.projector", p.acl.projector),
        ("pretrain.rocl.projector", p.rocl.projector),
        ("pretrain.dynacl.projector", p.dynacl.projector),
    ):
        if not dims:
            raise ConfigError(f"{key}: [] has no layer; give the output size of each layer, e.g. [512, 512, 512]")
    for section, stage in (("probe", cfg.probe), ("finetune", cfg.finetune)):
        ms = stage.milestones
        if list(ms) != sorted(ms) or any(m > stage.epochs for m in ms):
            raise ConfigError(
                f"{section}.milestones: {_fmt(ms)} must be increasing epochs within 0..{section}.epochs={stage.epochs}"
            )
    for section in ("data", "corruptions"):  # both take a checksum of a downloaded archive
        for digest, size, article in (("md5", 32, "an"), ("sha256", 64, "a")):
            value = getattr(getattr(cfg, section), digest)
            if value and (len(value) != size or any(c not in "0123456789abcdefABCDEF" for c in value)):
                raise ConfigError(
                    f"{section}.{digest}: {_fmt(value)} is not {article} {digest} digest; expected {size} hex "
                    "characters"
                )
    fe = p.from_encoder
    if fe.path and (len(fe.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in fe.sha256)):
        raise ConfigError(
            f"pretrain.from_encoder.sha256: {_fmt(fe.sha256)} is not a sha256 digest; a path needs the file's "
            "64-hex-character sha256 (sha256sum FILE, or what `amoc import-encoder` prints), which pins it for DVC"
        )
    for name in cfg.corruptions.names:
        if name not in CORRUPTIONS:
            close = difflib.get_close_matches(name, CORRUPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"corruptions.names: {_fmt(name)} is not a standard corruption; choose from "
                f"{', '.join(CORRUPTIONS)}{hint}"
            )
    dev = cfg.runtime.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"runtime.device: {_fmt(dev)} is not a device; use auto, cpu, cuda or cuda:N")
    return cfg


def _check_augment(key: str, augment: AugmentConfig) -> None:
    for name in ("crop_scale", "crop_ratio", "blur_sigma"):
        pair = getattr(augment, name)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"{key}.{name}: {_fmt(pair)} is not a range; expected [low, high] with low <= high")
    if len(augment.jitter) != 4:
        raise ConfigError(f"{key}.jitter: {_fmt(augment.jitter)} needs 4 values: brightness, contrast, saturation, hue")
    if augment.jitter[3] > 0.5:
        raise ConfigError(f"{key}.jitter[3]: {augment.jitter[3]:g} is out of range; hue jitter allowed [0, 0.5]")
    if augment.blur_kernel > 0 and augment.blur_kernel % 2 == 0:
        raise ConfigError(
            f"{key}.blur_kernel: {augment.blur_kernel} is even; use 0 (PIL's full-support blur, "
            "the default) or an odd kernel size such as 3"
        )


def from_dict(raw: Any) -> Config:
    """Validate a parsed params document (a dict) into a Config."""
    return _cross_checks(_build(Config, raw, ""))


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML, as `dvc exp run -S` does."""
    if "=" not in item:
        raise ConfigError(f"--set {_fmt(item)}: expected key=value, e.g. --set queue_size=4096")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {_fmt(item)}: {_fmt(key)} is not a dotted key such as pretrain.epochs")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if not isinstance(value, (dict, list)):
        value = _Override(text.strip(), value)
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def read_params_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found; pass --params PATH or run from the project folder")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; --params needs a YAML file")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size} bytes is too large for a params file (limit {MAX_PARAMS_BYTES}); is "
            "it the right file?"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a params file is YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level is {type(raw).__name__}, expected a mapping of 'key: value' entries")
    return raw


def merge(base: dict, extra: dict) -> dict:
    """`extra`'s entries on top of `base`, section by section (a preset on a params file)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(
    path: str | os.PathLike | None = "params.yaml", overrides: list[str] | None = None, preset: dict | None = None
) -> Config:
    """The params file (None: the package's defaults, which params.yaml restates), then
    `preset` (a partial params document) on top, then the --set `overrides` on top of
    both, validated once."""
    try:
        base = {} if path is None else read_params_file(path)
        raw = apply_overrides(merge(base, preset or {}), overrides or [])
        return from_dict(raw)
    except RecursionError:  # `a: &x [*x]` or thousands of nested brackets
        raise ConfigError(f"{path}: nested too deeply or refers to itself (YAML anchors); write plain values") from None


def to_dict(cfg: Any) -> Any:
    """Plain data (for writing next to results)."""
    return dataclasses.asdict(cfg)
