"""`attributes`: weight-free captions from measured pixels — colour, position, size, shape,
texture and neighbours. A fallback that makes the pipeline run anywhere; it describes what can
be measured, it does not recognise objects.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from annotators.base import CaptionInput, CaptionResult, Captioner, RegionView, TextOut
from annotators.segment import masks as rle
from settings import require, stable_hash

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "dark grey": (70, 70, 70), "grey": (128, 128, 128),
    "light grey": (190, 190, 190), "white": (245, 245, 245), "red": (200, 30, 30),
    "dark red": (120, 20, 20), "orange": (240, 140, 30), "yellow": (235, 215, 40),
    "olive": (110, 120, 50), "green": (40, 170, 60), "dark green": (20, 90, 30),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "navy": (30, 40, 90), "purple": (140, 60, 180),
    "pink": (240, 130, 190), "brown": (130, 80, 40), "beige": (225, 210, 180), "tan": (190, 150, 100),
}
_POSITIONS = [["top left", "top", "top right"], ["left", "centre", "right"],
              ["bottom left", "bottom", "bottom right"]]
TEMPLATES_VERSION = "1"


def colour_name(rgb: Any) -> str:
    """Nearest palette name of an RGB triple (Euclidean in RGB, weighted for perception)."""
    r, g, b = (float(v) for v in rgb)
    best, best_d = "grey", float("inf")
    for name, (pr, pg, pb) in PALETTE.items():
        d = 2 * (r - pr) ** 2 + 4 * (g - pg) ** 2 + 3 * (b - pb) ** 2
        if d < best_d:
            best, best_d = name, d
    return best


def position_name(cx: float, cy: float, width: int, height: int) -> str:
    """3x3 grid name of a point."""
    col = min(2, int(3 * cx / max(width, 1)))
    row = min(2, int(3 * cy / max(height, 1)))
    return _POSITIONS[row][col]


def size_name(frac: float) -> str:
    """Relative size word for an area fraction of the image."""
    for limit, word in ((0.01, "tiny"), (0.05, "small"), (0.2, "medium"), (0.5, "large")):
        if frac < limit:
            return word
    return "very large"


def shape_name(mask: np.ndarray | None, bbox: list[float]) -> str:
    """Coarse shape word from fill ratio, circularity and aspect."""
    w, h = max(bbox[2], 1.0), max(bbox[3], 1.0)
    aspect = w / h
    if aspect > 2.5:
        return "wide"
    if aspect < 0.4:
        return "tall"
    if mask is None:
        return "boxed"
    area = float(mask.sum())
    fill = area / (w * h)
    edge = mask & ~_erode(mask)
    perimeter = max(float(edge.sum()), 1.0)
    circularity = 4 * math.pi * area / (perimeter ** 2)
    if fill > 0.9:
        return "rectangular"
    if 0.7 <= fill <= 0.82 and circularity > 0.6:
        return "round"
    if 0.4 <= fill <= 0.6:
        return "triangular"
    return "irregular"


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


@dataclass
class AttributesSettings:
    """Settings of the attributes captioner."""

    max_neighbours: int = 2
    max_parts_listed: int = 3
    texture_threshold: float = 28.0   # grey-level std above this reads as "textured"

    def check(self) -> None:
        require(self.max_neighbours >= 0, "max_neighbours", "must be >= 0")


@dataclass
class _Measure:
    colour: str
    second: str | None
    position: str
    size: str
    shape: str
    texture: str
    frac: float
    centre: tuple[float, float]


class AttributesCaptioner(Captioner):
    """Describes regions by measured attributes; no model, no visual prompt."""

    name = "attributes"
    version = "1"
    Settings = AttributesSettings

    def provenance(self) -> dict[str, Any]:
        base = super().provenance()
        base.update({"model": None, "visual_prompt": None, "prompt_id": "attributes-templates",
                     "prompt_hash": stable_hash(TEMPLATES_VERSION)})
        return base

    def caption_batch(self, items: list[CaptionInput]) -> list[CaptionResult]:
        return [self._one(item) for item in items]

    def _measure(self, rgb: np.ndarray, view: RegionView) -> _Measure:
        height, width = rgb.shape[:2]
        x, y, w, h = view.bbox
        mask = rle.decode(view.rle) if view.rle is not None else None
        if mask is not None:
            pixels = rgb[mask]
        else:
            pixels = rgb[int(y):int(y + h) or 1, int(x):int(x + w) or 1].reshape(-1, 3)
        if len(pixels) == 0:
            pixels = np.zeros((1, 3))
        names = [colour_name(p) for p in pixels[:: max(1, len(pixels) // 400)]]
        counts = sorted({n: names.count(n) for n in set(names)}.items(), key=lambda kv: (-kv[1], kv[0]))
        second = counts[1][0] if len(counts) > 1 and counts[1][1] > 0.2 * len(names) else None
        grey = pixels.mean(axis=1)
        texture = "textured" if float(grey.std()) > self.settings.texture_threshold else "smooth"
        cx, cy = x + w / 2, y + h / 2
        frac = view.area / float(width * height)
        return _Measure(counts[0][0], second, position_name(cx, cy, width, height), size_name(frac),
                        shape_name(mask, view.bbox), texture, frac, (cx, cy))

    @staticmethod
    def _short(m: _Measure) -> str:
        return f"a {m.size} {m.colour} {m.shape} region at the {m.position}"

    def _long(self, view: RegionView, m: _Measure, measures: dict[str, _Measure],
              views: list[RegionView]) -> str:
        colours = m.colour + (f" with some {m.second}" if m.second else "")
        parts = [f"A {m.size}, {m.shape} region, mostly {colours}, at the {m.position} of the image "
                 f"and covering {100 * m.frac:.1f}% of it. Its surface looks {m.texture}."]
        if view.parent is not None and view.parent in measures:
            parent = measures[view.parent]
            kind = "box" if next(v for v in views if v.id == view.parent).level == "region" else "region"
            parts.append(f"It lies within a {parent.size} {parent.colour} {kind}.")
        children = [v for v in views if v.parent == view.id and v.level == "pixel"]
        if children:
            listed = ", ".join(self._short(measures[c.id]) for c in children[: self.settings.max_parts_listed])
            parts.append(f"It contains {len(children)} smaller part{'s' if len(children) > 1 else ''}: {listed}.")
        siblings = [v for v in views if v.parent == view.parent and v.id != view.id and v.level == view.level]
        siblings.sort(key=lambda v: math.dist(measures[v.id].centre, m.centre))
        for sib in siblings[: self.settings.max_neighbours]:
            s = measures[sib.id]
            parts.append(f"Next to it, {_direction(m.centre, s.centre)}, is {self._short(s)}.")
        return " ".join(parts)

    def _image_text(self, rgb: np.ndarray, views: list[RegionView],
                    measures: dict[str, _Measure]) -> TextOut:
        height, width = rgb.shape[:2]
        sample = rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 2000)]
        names = [colour_name(p) for p in sample]
        top = [n for n, _ in sorted({n: names.count(n) for n in set(names)}.items(),
                                    key=lambda kv: (-kv[1], kv[0]))[:3]]
        brightness = float(rgb.mean())
        light = "dark" if brightness < 85 else ("bright" if brightness > 170 else "mid-toned")
        orientation = "landscape" if width > height * 1.1 else ("portrait" if height > width * 1.1 else "square")
        wholes = [v for v in views if v.parent is None or (v.level == "pixel" and
                  next((p for p in views if p.id == v.parent), None) is not None and
                  next(p for p in views if p.id == v.parent).level == "region" and
                  next(p for p in views if p.id == v.parent).parent is None)]
        pixel_wholes = [v for v in wholes if v.level == "pixel"] or [v for v in wholes]
        pixel_wholes = sorted(pixel_wholes, key=lambda v: -v.area)[:4]
        caption = f"a {light} {orientation} image in {' and '.join(top[:2])} tones"
        long = (f"A {light}, {orientation} image ({width}x{height} pixels) whose main colours are "
                f"{', '.join(top)}. It splits into {len(pixel_wholes)} main region"
                f"{'s' if len(pixel_wholes) != 1 else ''}")
        long += (": " + "; ".join(self._short(measures[v.id]) for v in pixel_wholes) + ".") if pixel_wholes else "."
        tags = sorted(set(top + [light, orientation]))
        return TextOut(caption, long, tags, {}, self.provenance())

    def _one(self, item: CaptionInput) -> CaptionResult:
        rgb = np.asarray(Image.open(io.BytesIO(item.image)).convert("RGB"))
        measures = {v.id: self._measure(rgb, v) for v in item.regions}
        regions = {}
        for view in item.regions:
            m = measures[view.id]
            tags = sorted({m.colour, m.shape, m.size, m.position, m.texture} | ({m.second} if m.second else set()))
            regions[view.id] = TextOut(self._short(m), self._long(view, m, measures, item.regions),
                                       tags, {}, self.provenance())
        return CaptionResult(self._image_text(rgb, item.regions, measures), regions, [])


def _direction(a: tuple[float, float], b: tuple[float, float]) -> str:
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) > abs(dy):
        return "to its right" if dx > 0 else "to its left"
    return "below it" if dy > 0 else "above it"
