"""Pipeline settings: YAML file → validated dataclasses. Errors name the field and the fix.

The settings hash (in every record and shard) covers only what changes the output: the shards,
decode and regions sections, each annotator's name, version and output settings, the pipeline
version. Run settings (batch sizes, ``limits``, the dataset's display name, and what each
annotator's settings class lists in ``RUN_ONLY``: endpoints, timeouts, retries, server lifecycle,
...) are written to the manifest but can change between runs of one build.
"""
from __future__ import annotations

import dataclasses
import re
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml
from apache_beam.io.filesystems import FileSystems

from annotators.registry import build_captioner, build_segmenter
from schemas import SCHEMA_VERSION
from settings import ConfigError, hashed_fields, parse_settings, require, stable_hash
from settings.secrets import mask_secrets  # noqa: F401  (re-exported: pipelines.config.mask_secrets)

PIPELINE_VERSION = "0.1.0"


@dataclass
class ShardSettings:
    """How records are grouped into tar shards."""

    samples_per_shard: int = 64
    split: str = "train"

    def check(self) -> None:
        require(self.samples_per_shard >= 1, "samples_per_shard", "must be at least 1")
        require(self.split.replace("_", "").replace("-", "").isalnum(), "split",
                "use letters, digits, '-' or '_' (it becomes part of shard names)")


RESAMPLE = {"area": "BOX", "lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR"}


@dataclass
class DecodeSettings:
    """Decode hygiene: limits checked before and after decoding, and how images are stored."""

    max_side: int = 1024          # longest side of the stored image; larger inputs are resized
    min_side: int = 32            # shorter side below this → failure too_small
    max_aspect: float = 8.0       # long/short side above this → failure bad_aspect
    max_pixels: int = 178_956_970  # checked from the header before a full decode (bomb guard)
    max_bytes: int = 256 * 1024 * 1024
    jpeg_quality: int = 95
    # Downscaling filter: "area" averages the input pixels each output pixel covers (Pillow's
    # BOX, like OpenCV's INTER_AREA that img2dataset uses; ~3× faster than lanczos); "lanczos" is
    # a little sharper.
    resample: str = "area"
    dedup: bool = True            # exact duplicates (sha256) → one record, the rest failures

    def check(self) -> None:
        require(self.max_side >= 16, "max_side", "must be at least 16")
        require(1 <= self.min_side <= self.max_side, "min_side", "must be between 1 and max_side")
        require(self.max_aspect >= 1, "max_aspect", "must be at least 1")
        require(self.max_pixels >= self.max_side, "max_pixels", "must be a positive pixel count")
        require(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 1..100")
        require(self.resample in RESAMPLE, "resample", f"must be one of {', '.join(sorted(RESAMPLE))}")


@dataclass
class RegionSettings:
    """Turning a flat set of candidate masks/boxes into the record's region tree."""

    max_regions: int = 32         # most top-level regions kept per image (largest first)
    max_total: int = 96           # most regions of all levels per image
    max_depth: int = 3            # whole / part / subpart
    min_area_frac: float = 0.002  # drop candidates smaller than this fraction of the image
    max_area_frac: float = 0.98   # drop candidates that are (almost) the whole image
    min_predicted_iou: float = 0.0
    min_stability: float = 0.0
    dedup_iou: float = 0.9        # candidates overlapping more than this are merged (keep best)
    contain_frac: float = 0.9     # a candidate lies in another if this fraction of it is inside
    box_regions: bool = True      # add a box-level region for every top-level mask

    def check(self) -> None:
        require(self.max_regions >= 0, "max_regions", "must be >= 0")
        require(1 <= self.max_depth <= 3, "max_depth", "must be 1, 2 or 3")
        require(0 <= self.min_area_frac < self.max_area_frac <= 1, "min_area_frac",
                "need 0 <= min_area_frac < max_area_frac <= 1")
        require(0 < self.dedup_iou <= 1, "dedup_iou", "must be in (0, 1]")
        require(0.5 <= self.contain_frac <= 1, "contain_frac", "must be in [0.5, 1]")


@dataclass
class BatchSettings:
    """Images per call of the model stages (Beam BatchElements of this fixed size; fewer at the
    end of a bundle)."""

    segment: int = 4
    caption: int = 8

    def check(self) -> None:
        require(self.segment >= 1, "segment", "must be at least 1")
        require(self.caption >= 1, "caption", "must be at least 1")


@dataclass
class LimitSettings:
    """Failure budget: when transient failures (infrastructure: timeouts, 5xx, connection
    refused, server not ready, ...) stop a run early. Permanent failures never count."""

    max_transient_fraction: float = 0.05  # share of transient failures tolerated in the window
    min_samples: int = 20         # outcomes seen before the budget can trip
    window: int = 200             # the share is taken over this many most recent outcomes

    def check(self) -> None:
        require(0 < self.max_transient_fraction <= 1, "max_transient_fraction",
                "must be in (0, 1], e.g. 0.05 for 5%")
        require(self.min_samples >= 1, "min_samples", "must be at least 1")
        require(self.window >= self.min_samples, "window", "must be at least min_samples")


@dataclass
class PipelineConfig:
    """All settings of one build. ``segmenter``/``captioner`` are {name, **annotator settings}."""

    shards: ShardSettings = field(default_factory=ShardSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    regions: RegionSettings = field(default_factory=RegionSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    segmenter: dict[str, Any] = field(default_factory=lambda: {"name": "classical"})
    captioner: dict[str, Any] = field(default_factory=lambda: {"name": "attributes"})
    # optional filter: each region's text scored against its pixels by a CLIP-style model
    # (annotators.filter.consistency); None: no such stage
    consistency: dict[str, Any] | None = None
    dataset_name: str = "dataset"

    # Never written into a shard: batch sizes (which images share a batch already depends on the
    # runner), the failure budget, the name on the manifest and card. Every other section is
    # hashed, a new one too unless it is listed here.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"batch", "limits", "dataset_name"})

    def hashed_settings(self) -> dict[str, Any]:
        """Exactly what ``settings_hash`` hashes (plain data: shows why two hashes differ)."""
        view = hashed_fields(self)
        view["segmenter"] = build_segmenter(self.segmenter).hash_view()
        view["captioner"] = build_captioner(self.captioner).hash_view()
        view["consistency"] = None if self.consistency is None else \
            build_consistency(self.consistency).hash_view()
        view["pipeline_version"] = PIPELINE_VERSION
        view["schema_version"] = SCHEMA_VERSION
        return mask_secrets(view)   # a new API key is not a new dataset

    def run_settings(self) -> dict[str, Any]:
        """The sections left out of the hash. (The annotators' own run settings stay in their
        sections; their settings classes list them in ``RUN_ONLY``.)"""
        plain = self.to_dict()
        return {name: plain[name] for name in sorted(self.RUN_ONLY)}

    def settings_hash(self) -> str:
        """Hash of the settings that change the output bytes (see ``hashed_settings``).

        Remembered per settings value, so calling it per element costs one JSON dump; the value
        travels with the pickled config, so workers use the driver's hash.
        """
        key = json.dumps(self.to_dict(), sort_keys=True, default=str)
        memo = self.__dict__.get("_hash_memo")
        if memo is None or memo[0] != key:
            memo = (key, stable_hash(self.hashed_settings()))
            self.__dict__["_hash_memo"] = memo
        return memo[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting, run settings included (for the manifest)."""
        return dataclasses.asdict(self)


_SECTIONS = {"shards": ShardSettings, "decode": DecodeSettings, "regions": RegionSettings,
             "batch": BatchSettings, "limits": LimitSettings}
_KNOWN = list(_SECTIONS) + ["segmenter", "captioner", "consistency", "dataset_name"]


def build_consistency(settings: dict[str, Any]) -> Any:
    """The consistency scorer of these settings (checked; nothing loaded)."""
    from annotators.filter.consistency import ConsistencyScorer

    return ConsistencyScorer(settings, "consistency")


def config_from_dict(data: dict[str, Any] | None) -> PipelineConfig:
    """Validate a config mapping; annotators are built once to check their settings too."""
    data = dict(data or {})
    for name in data:
        if name not in _KNOWN:
            close = difflib.get_close_matches(name, _KNOWN, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known sections: {', '.join(_KNOWN)}"
            raise ConfigError(f"{name}: unknown config section; {hint}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping of settings, got {section!r}")
        kwargs[name] = parse_settings(cls, section, name)
    for role in ("segmenter", "captioner"):
        section = data.get(role)
        if section is None:
            continue
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, dict) or "name" not in section:
            raise ConfigError(f"{role}: expected a mapping with 'name' (e.g. {role}: {{name: ...}})")
        kwargs[role] = dict(section)
    if data.get("consistency") is not None:
        if not isinstance(data["consistency"], dict):
            raise ConfigError("consistency: expected a mapping (model, checkpoint, threshold, ...)")
        kwargs["consistency"] = dict(data["consistency"])
    if "dataset_name" in data:
        kwargs["dataset_name"] = str(data["dataset_name"])
    config = PipelineConfig(**kwargs)
    build_segmenter(config.segmenter)   # validates settings; loads nothing
    build_captioner(config.captioner)
    if config.consistency is not None:
        build_consistency(config.consistency)
    return config


def load_config(path: str | None) -> PipelineConfig:
    """Read a YAML config (any Beam filesystem path); None gives the embedded defaults."""
    if not path:
        return config_from_dict({})
    if not FileSystems.exists(path):
        raise ConfigError(f"--config: file '{path}' does not exist; pass an existing YAML file")
    with FileSystems.open(path) as handle:
        text = handle.read().decode("utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: '{path}' is not valid YAML ({exc}); fix the syntax") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of sections at the top level")
    return config_from_dict(data)
