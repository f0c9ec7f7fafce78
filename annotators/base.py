"""The two annotator roles (segmenter, captioner) and the data they take and give.

An annotator is one module: a settings dataclass validated on construction (``settings``:
``parse_settings``, ``RUN_ONLY`` for the fields left out of the settings hash), ``setup()`` for
loading (called once per worker), a batch method for work, and one entry in
``annotators.registry``. Nothing here imports a heavy library.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from settings import hashed_view, parse_settings, stable_hash


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
    label: str | None = None    # a label or phrase given with the input (GRIT, COCO category)
    # the candidate this one belongs under, whatever the containment says (sam-boxes: SAM's mask
    # under the given box it was prompted with)
    within: "Candidate | None" = None


@dataclass
class SegmentInput:
    """What a segmenter sees of one image: its key, RGB pixels and any annotations given with it."""

    key: str
    rgb: np.ndarray | None      # (H, W, 3) uint8, the stored image; None for a segmenter whose
                                # ``needs_pixels`` is false (it reads ``size``)
    given: dict | None = None   # {"boxes": [[x,y,w,h],...], "masks": [rle,...], ...} from a manifest
    size: tuple[int, int] | None = None   # (height, width) of the stored image

    def hw(self) -> tuple[int, int]:
        """(height, width) of the stored image."""
        if self.size is not None:
            return self.size
        assert self.rgb is not None
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


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
    stats: dict[str, Any] = field(default_factory=dict)   # depth in the tree, source, scores
    given: dict[str, Any] = field(default_factory=dict)   # what came with the input: {"label": ...}


@dataclass
class CaptionInput:
    """One image and its regions, with the visual prompts rendered for the captioner."""

    key: str
    width: int
    height: int
    image: bytes                # encoded stored image (jpg/png)
    regions: list[RegionView]
    prompts: dict[str, dict[str, bytes]] = field(default_factory=dict)  # target id -> name -> PNG
    given: dict[str, Any] = field(default_factory=dict)   # what came with the input: {"caption": ...}
    # target id ("image" or a region id) -> step name -> an earlier output to reuse instead of
    # asking the model again (``make recaption``; a captioner without steps may ignore it)
    reuse: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TextOut:
    """Text written for one target (the image or a region)."""

    caption: str
    long_caption: str
    tags: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] | None = None      # a judge step's verdict: {"keep": bool, "reason": str}
    steps: dict[str, Any] = field(default_factory=dict)   # intermediate step outputs, by step name


@dataclass
class CaptionResult:
    """A captioner's answer for one image: image-level text, per-region text, per-region failures.

    A region missing from ``regions`` must have a failure in ``failures``. ``image_level`` None
    means the image as a whole failed; its failure has ``region_id`` None. ``cost`` is what the
    image cost the captioner's model (calls, tokens, bytes: ``backends.base.CallCost`` fields);
    empty for a captioner that calls none.
    """

    image_level: TextOut | None
    regions: dict[str, TextOut]
    failures: list[AnnotatorFailure] = field(default_factory=list)
    cost: dict[str, int] = field(default_factory=dict)


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
    needs_pixels: ClassVar[bool] = True   # False: SegmentInput.rgb is None (the image is not decoded)

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
    # whether a target's text may depend on the image's other regions (neighbours, parts, counts),
    # not only on the target itself: then new masks elsewhere in an image change it too
    reads_other_regions: ClassVar[bool] = True

    def prompt_specs(self) -> dict[str, list[dict[str, Any]]]:
        """Visual prompts to render per target level ("image", "region", "pixel").

        Each spec is {"name": str, "kind": visual prompt kind, **params}; RenderPrompts renders
        them and passes them in ``CaptionInput.prompts[target][name]``.
        """
        return {}

    @abstractmethod
    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        """One result per input, same order."""

    def step_hashes(self) -> dict[str, dict[str, str]]:
        """Per level ("image", "region", "pixel"), each step that writes a target's text → a hash
        of everything that decides its output. Equal hashes mean an earlier output can be reused
        (``make recaption``). A captioner without steps has one, ``text``: its name, version and
        output-changing settings. Part of ``provenance()`` (``steps``)."""
        digest = stable_hash(self.hash_view())[:12]
        return {level: {"text": digest} for level in ("image", "region", "pixel")}

    def provenance(self) -> dict[str, Any]:
        """Name, version, every setting and the step hashes."""
        return {**super().provenance(), "steps": self.step_hashes()}
