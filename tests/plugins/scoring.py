"""Annotators with known faults for scoring tests (``name: tests.plugins.scoring:Class``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from annotators.base import (AnnotatorFailure, Candidate, CaptionInput, CaptionResult, Captioner,
                             SegmentInput, SegmentOutput, Segmenter, TextOut)
from annotators.segment import masks as rle
from annotators.segment.given import GivenSegmenter, GivenSettings


@dataclass
class ShiftedSettings(GivenSettings):
    """The given segmenter's settings plus how far every mask is moved."""

    shift: int = 40


class ShiftedTruthSegmenter(GivenSegmenter):
    """The ground truth masks moved right and down by ``shift`` pixels: right shapes, wrong places."""

    name = "shifted-truth"
    Settings = ShiftedSettings

    def _one(self, item: SegmentInput) -> SegmentOutput:
        out = super()._one(item)
        shift = self.settings.shift
        moved = []
        for cand in out.candidates:
            mask = np.zeros_like(rle.decode(cand.rle))
            mask[shift:, shift:] = rle.decode(cand.rle)[:-shift or None, :-shift or None]
            if mask.any():
                encoded = rle.encode(mask)
                moved.append(Candidate(rle.bbox(encoded), float(rle.area(encoded)), encoded, {}, "shifted"))
        return SegmentOutput(moved)


@dataclass
class NoSettings:
    """No settings."""


class WholeImageSegmenter(Segmenter):
    """One mask covering the whole image (SelectRegions drops it: nothing is predicted)."""

    name = "whole-image"
    Settings = NoSettings
    needs_pixels = False

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        out: list[SegmentOutput | AnnotatorFailure] = []
        for item in images:
            height, width = item.hw()
            encoded = rle.encode(np.ones((height, width), bool))
            out.append(SegmentOutput([Candidate([0.0, 0.0, float(width), float(height)],
                                                float(height * width), encoded)]))
        return out


class PurpleCaptioner(Captioner):
    """Says "purple" about everything, whatever its colour."""

    name = "purple"
    Settings = NoSettings

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        def text() -> TextOut:
            return TextOut("a purple region", "A purple region.", ["purple"])

        return [CaptionResult(text(), {r.id: text() for r in item.regions}) for item in items]


class RingsSegmenter(GivenSegmenter):
    """The ground truth masks with every smaller mask lying inside one cut out of it: wholes
    without their parts (as a colour segmenter sees a shape with a differently coloured part), so
    no part lies inside its whole."""

    name = "rings"

    def _one(self, item: SegmentInput) -> SegmentOutput:
        out = super()._one(item)
        masks = [rle.decode(c.rle) for c in out.candidates]
        rings = []
        for mask in masks:
            ring = mask.copy()
            for other in masks:
                if other.sum() < mask.sum() and (other & ~mask).sum() == 0:
                    ring &= ~other
            if ring.any():
                encoded = rle.encode(ring)
                rings.append(Candidate(rle.bbox(encoded), float(rle.area(encoded)), encoded, {}, "rings"))
        return SegmentOutput(rings)


class HalfTruthSegmenter(GivenSegmenter):
    """Every other ground truth mask, exactly: what it finds is right, half is missed."""

    name = "half-truth"

    def _one(self, item: SegmentInput) -> SegmentOutput:
        return SegmentOutput(super()._one(item).candidates[::2])


class RaisingSegmenter(WholeImageSegmenter):
    """Raises on every batch (a crashed model)."""

    name = "raising"

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        raise RuntimeError("no masks today")


class PromptedPurpleCaptioner(PurpleCaptioner):
    """``PurpleCaptioner`` that asks for visual prompts and fails a region whose prompt is missing."""

    name = "prompted-purple"

    def prompt_specs(self) -> dict[str, list[dict[str, Any]]]:
        return {"region": [{"name": "box", "kind": "box"}], "pixel": [{"name": "outline", "kind": "contour"}]}

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        results = super().caption_batch(items)
        for item, result in zip(items, results):
            for region in item.regions:
                wanted = "box" if region.level == "region" else "outline"
                if not item.prompts.get(region.id, {}).get(wanted, b"").startswith(b"\x89PNG"):
                    del result.regions[region.id]
                    result.failures.append(AnnotatorFailure("no_prompt", wanted, region.id))
        return results
