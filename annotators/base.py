"""The two annotator roles (segmenter, captioner), their data types and settings validation.

An annotator is one module: a settings dataclass validated on construction, ``setup()`` for
loading (called once per worker), a batch method for work, and one entry in
``annotators.registry``. Nothing here imports a heavy library.

Settings are of two kinds. Most change what the annotator writes (model, prompts, thresholds,
seed, ...) and go into the build's settings hash. *Run settings* only change how the work is done
(endpoints, timeouts, retries, batch sizes, server lifecycle); a settings class lists them in
``RUN_ONLY`` (collected over its base classes), or defines ``hash_view()`` when its hashed part is
more than a subset of its fields. A field not listed is hashed, so a new field is safe by default.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np


class ConfigError(ValueError):
    """A setting is wrong. The message names the field and says how to fix it."""


# --------------------------------------------------------------------------- settings


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def parse_settings(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown fields and wrong types raise ConfigError.

    ``where`` is the dotted config path of the section (e.g. ``segmenter``), used in messages.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(names)}"
            raise ConfigError(f"{where}.{name}: unknown setting; {hint}")
    for name, value in values.items():
        if not _type_ok(value, hints[name]):
            raise ConfigError(
                f"{where}.{name}: expected {_type_name(hints[name])}, got {value!r}; "
                f"set it to a value of that type"
            )
    try:
        obj = cls(**values)
    except TypeError as exc:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        raise ConfigError(f"{where}: missing required setting(s) {missing}; add them") from exc
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    return obj


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def require(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError('<field>: <message>') unless ``condition`` holds (for ``check()``)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def run_only_fields(cls: type) -> frozenset[str]:
    """The fields of dataclass ``cls`` declared run-only: ``RUN_ONLY`` of it and its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names |= set(vars(klass).get("RUN_ONLY", ()))
    unknown = names - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}.RUN_ONLY names no field: {sorted(unknown)}")
    return frozenset(names)


def hashed_fields(settings: Any) -> dict[str, Any]:
    """Every field of dataclass ``settings`` except its run-only ones, as plain data."""
    run_only = run_only_fields(type(settings))
    return {name: value for name, value in dataclasses.asdict(settings).items()
            if name not in run_only}


def hashed_view(settings: Any) -> dict[str, Any]:
    """What of ``settings`` goes into the settings hash: its ``hash_view()`` if it has one,
    else ``hashed_fields``."""
    own = getattr(settings, "hash_view", None)
    return own() if callable(own) else hashed_fields(settings)


def stable_hash(obj: Any) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------- data types


@dataclass
class AnnotatorFailure:
    """A unit of work (an image, or one region of it) an annotator could not handle."""

    reason: str
    detail: str = ""
    region_id: str | None = None


@dataclass
class Candidate:
    """One mask or box proposed by a segmenter, before region selection.

    ``rle`` is COCO RLE ({"size": [h, w], "counts": str}) of the stored image, or None for a
    box-only candidate. ``bbox`` is [x, y, w, h] in pixels of the stored image.
    """

    bbox: list[float]
    area: float
    rle: dict | None = None
    scores: dict[str, float] = field(default_factory=dict)
    source: str = ""            # e.g. "sam-auto", "given:boxes"


@dataclass
class SegmentInput:
    """What a segmenter sees of one image: its key, RGB pixels and any annotations given with it."""

    key: str
    rgb: np.ndarray             # (H, W, 3) uint8, the stored (normalized) image
    given: dict | None = None   # {"boxes": [[x,y,w,h],...], "masks": [rle,...], ...} from a manifest


@dataclass
class SegmentOutput:
    """A segmenter's answer for one image: candidates, counts of what it dropped and why."""

    candidates: list[Candidate]
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class RegionView:
    """A selected region as captioners see it."""

    id: str
    level: str                  # "region" (box) | "pixel" (mask)
    parent: str | None
    bbox: list[float]
    area: float
    rle: dict | None
    stats: dict[str, Any] = field(default_factory=dict)   # cheap measurements (mean colour, ...)


@dataclass
class CaptionInput:
    """One image and its regions, with the visual prompts rendered for the captioner."""

    key: str
    width: int
    height: int
    image: bytes                # encoded stored image (jpg/png)
    regions: list[RegionView]
    prompts: dict[str, dict[str, bytes]] = field(default_factory=dict)  # target id -> name -> PNG


@dataclass
class TextOut:
    """Text written for one target (the image or a region)."""

    caption: str
    long_caption: str
    tags: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionResult:
    """A captioner's answer for one image: image-level text, per-region text, per-region failures.

    A region missing from ``regions`` must have a failure in ``failures``. ``image_level`` None
    means the image as a whole failed; its failure has ``region_id`` None.
    """

    image_level: TextOut | None
    regions: dict[str, TextOut]
    failures: list[AnnotatorFailure] = field(default_factory=list)


# --------------------------------------------------------------------------- roles


class Annotator(ABC):
    """Common part of both roles: validated settings, provenance, once-per-worker setup."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Settings: ClassVar[type]

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        self.settings = parse_settings(self.Settings, settings, where or self.role)

    role: ClassVar[str] = "annotator"

    def setup(self) -> None:
        """Load models. Called once per worker before any batch."""

    def teardown(self) -> None:
        """Release resources (servers, GPU memory). Called once per worker at the end."""

    def hash_view(self) -> dict[str, Any]:
        """Name, version and the settings that change this annotator's output (the part of the
        build's settings hash that belongs to it; see the module docstring)."""
        return {"name": self.name, "version": self.version, "settings": hashed_view(self.settings)}

    def provenance(self) -> dict[str, Any]:
        """Name, version and every setting; goes into each record this annotator touches."""
        return {"name": self.name, "version": self.version,
                "settings": dataclasses.asdict(self.settings)}


class Segmenter(Annotator):
    """Turns images into candidate masks/boxes."""

    role = "segmenter"

    @abstractmethod
    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        """One answer per input, same order. A failure loses only that image."""

    @staticmethod
    def each_image(images: list[SegmentInput], one: Callable[[SegmentInput], SegmentOutput],
                   reason: str) -> list[SegmentOutput | AnnotatorFailure]:
        """``one`` on every image; an exception becomes that image's failure with ``reason``."""
        out: list[SegmentOutput | AnnotatorFailure] = []
        for item in images:
            try:
                out.append(one(item))
            except Exception as exc:  # one bad image must not sink the batch
                out.append(AnnotatorFailure(reason, f"{type(exc).__name__}: {exc}"))
        return out


class Captioner(Annotator):
    """Turns (image, regions, visual prompts) into captions, long captions and tags."""

    role = "captioner"

    def prompt_specs(self) -> dict[str, list[dict[str, Any]]]:
        """Visual prompts to render per target level ("image", "region", "pixel").

        Each spec is {"name": str, "kind": visual prompt kind, **params}; RenderPrompts renders
        them and passes them in ``CaptionInput.prompts[target][name]``.
        """
        return {}

    @abstractmethod
    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        """One result per input, same order."""
