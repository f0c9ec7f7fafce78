"""Trainer settings: one YAML file → typed, validated dataclasses.

Every field has a default, so a config file only names what it changes. Unknown or mistyped
fields stop the run before any work, naming the field and the closest valid name; the resolved
config (defaults filled in) is written next to every checkpoint so a run can be reproduced and
resumed from its output folder alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class TextConfig:
    """The text tower: open_clip's CLIP text transformer (default) or a small decoder LLM."""

    encoder: str = "clip"            # clip | llm
    context_length: int = 248        # clip: positions after the Long-CLIP stretch (77 = no stretch)
    keep_positions: int = 20         # clip: leading positions copied unchanged by the stretch
    llm_path: str | None = None      # llm: local folder with a transformers model + tokenizer
    pooling: str = "last"            # llm: last (final non-pad token) | mean (over real tokens)
    max_length: int = 512            # llm: tokens per text
    freeze: bool = False             # llm: train only the projection

    def __post_init__(self) -> None:
        _require(self.encoder in ("clip", "llm"), "model.text.encoder", "use clip or llm")
        _require(self.pooling in ("last", "mean"), "model.text.pooling", "use last or mean")
        _require(self.context_length >= 8, "model.text.context_length", "must be >= 8")
        _require(self.keep_positions >= 0, "model.text.keep_positions", "must be >= 0")
        _require(self.encoder != "llm" or bool(self.llm_path), "model.text.llm_path",
                 "the llm encoder needs a local model folder")


@dataclass
class ModelConfig:
    """An open_clip model by name, with optional local weights."""

    name: str = "ViT-B-16"           # open_clip name: built-in, trainer/model_configs, or config_file
    config_file: str | None = None   # an extra open_clip model-config JSON (or folder of them)
    pretrained: str | None = None    # local weights file, or local-dir:/folder (never a hub tag)
    init_from: str | None = None     # a trainer checkpoint (model.safetensors) to start from
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class BranchConfig:
    """One contrastive branch: on/off and its weight in the total loss."""

    enabled: bool = True
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight >= 0, "loss.*.weight", "must be >= 0")


@dataclass
class ImageBranchConfig(BranchConfig):
    """Image ↔ long caption (+ tags), plus the local–global consistency term."""

    consistency_weight: float = 1.0  # pull the mask-prompted embedding toward its crop's
    tags: bool = True                # append the image tags to its long caption


@dataclass
class LossConfig:
    """The three branches and the temperature settings they share."""

    mask: BranchConfig = field(default_factory=BranchConfig)
    crop: BranchConfig = field(default_factory=BranchConfig)
    image: ImageBranchConfig = field(default_factory=ImageBranchConfig)
    init_temperature: float = 0.07   # from scratch; a pretrained CLIP starts at its own
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        _require(self.mask.enabled or self.crop.enabled or self.image.enabled, "loss",
                 "enable at least one of mask, crop, image")
        _require(0 < self.init_temperature < 1, "loss.init_temperature", "must be in (0, 1)")


@dataclass
class DataConfig:
    """Where the shards are and how samples are drawn from them."""

    train: list[str] = field(default_factory=list)  # paths, globs, brace lists, fsspec URLs, dirs
    eval: list[str] = field(default_factory=list)   # held-out shards; empty: holdout_shards
    holdout_shards: int = 1          # without `eval`: the last N training shards (sorted) held out
    batch_size: int = 32             # images per optimizer step, over all processes
    regions_per_image: int = 4       # cap on regions sampled per image and step
    levels: list[str] = field(default_factory=lambda: ["pixel", "region"])
    min_region_frac: float = 0.005   # skip regions smaller than this fraction of the image
    crop_context: float = 0.1        # crop = region box grown by this fraction on each side
    shuffle_buffer: int = 512        # samples; 0 or 1 = stream order
    workers: int = 2                 # DataLoader worker processes per training process
    prefetch: int = 2                # batches prefetched per worker
    max_consecutive_errors: int = 1000  # a worker stops only after this many bad samples in a row

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _require(self.regions_per_image >= 1, "data.regions_per_image", "must be >= 1")
        _require(set(self.levels) <= {"pixel", "region"} and bool(self.levels), "data.levels",
                 "a non-empty subset of [pixel, region]")
        _require(0 <= self.min_region_frac < 1, "data.min_region_frac", "must be in [0, 1)")
        _require(self.workers >= 0, "data.workers", "must be >= 0")
        _require(self.holdout_shards >= 0, "data.holdout_shards", "must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a cosine (or constant) schedule."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"         # cosine | constant
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of lr
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    mask_conv_lr_mult: float = 1.0   # lr multiplier for the mask patch conv (Alpha-CLIP uses >1)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.schedule in ("cosine", "constant"), "optim.schedule", "use cosine or constant")
        _require(len(self.betas) == 2, "optim.betas", "two numbers")


@dataclass
class RunConfig:
    """Length of the run, precision, logging and checkpoint cadence."""

    steps: int = 1000
    seed: int = 0
    precision: str = "auto"          # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 10              # terminal progress line every N steps (metrics.jsonl: every step)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0              # 0 = evaluate at the end only

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", "must be >= 1")
        _require(self.precision in ("auto", "bf16", "fp32"), "train.precision", "use auto, bf16 or fp32")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass
class EvalConfig:
    """Held-out retrieval evaluation."""

    regions_per_image: int = 8       # regions per held-out image (fixed choice, seeded)
    max_images: int = 0              # 0 = every held-out image
    batch_size: int = 32


@dataclass
class TrainerConfig:
    """Everything a training run needs besides the output folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML and comparison)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (the few forms used above)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item is str:
            value = [str(value)]
        _require(isinstance(value, list), name, f"expected a list, got {value!r}")
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        return from_dict(typing.cast(type, tp), value, name)
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                 f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name,
                 f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _require(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(names)}"
            raise ConfigError(f"{path}: unknown setting{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML config (or the defaults) and apply ``a.b=value`` overrides (values are YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected key=value")
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return from_dict(TrainerConfig, data)


def save_config(config: TrainerConfig, path: Path) -> None:
    """Write the resolved config as YAML (readable by load_config)."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
