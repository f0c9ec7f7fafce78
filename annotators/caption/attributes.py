"""`attributes`: weight-free captions from measured pixels — colour, position, size, shape,
texture and neighbours. A fallback that makes the pipeline run anywhere; it describes what can
be measured, it does not recognise objects.

It is the embedded default, so it is kept cheap: no region's mask is drawn at full frame. Sums
(texture, brightness) come from one cumulative sum of the image read along each mask's runs;
colour samples and the shape's edge come from the mask cut to its box; colours of all regions are
named in one vectorised pass. The words are the ones a full-frame measurement gives.
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


_NAMES = list(PALETTE)
_NAME_RANK = np.argsort(np.argsort(_NAMES))            # alphabetical rank: the tie-break in counts
_CENTRES = np.array(list(PALETTE.values()), np.int64)
# colour_name's distance splits into one table per channel, so for 8-bit pixels it is three lookups
_CHANNEL_COST = [(weight * (np.arange(256)[:, None] - _CENTRES[None, :, c]) ** 2).astype(np.int32)
                 for c, weight in enumerate((2, 4, 3))]


def colour_indices(pixels: np.ndarray) -> np.ndarray:
    """``colour_name`` of many RGB rows at once, as indices into PALETTE's order (the same rule:
    weighted squared distance, the first palette entry wins a tie)."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    if pixels.dtype == np.uint8:
        red, green, blue = _CHANNEL_COST
        cost = red[pixels[:, 0]] + green[pixels[:, 1]] + blue[pixels[:, 2]]
    else:
        diff = pixels.astype(np.float64)[:, None, :] - _CENTRES[None, :, :]
        cost = 2 * diff[..., 0] ** 2 + 4 * diff[..., 1] ** 2 + 3 * diff[..., 2] ** 2
    return np.argmin(cost, axis=1)


def _ranked(indices: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Names present among ``indices``, most frequent first (ties: alphabetical), and counts."""
    counts = np.bincount(indices, minlength=len(_NAMES))
    order = np.lexsort((_NAME_RANK, -counts))
    present = [int(i) for i in order if counts[i] > 0]
    return [_NAMES[i] for i in present], counts[present]


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

    def _measure_all(self, rgb: np.ndarray, views: list[RegionView],
                     sums: rle.RunSums) -> dict[str, _Measure]:
        """Every region's measurements; colours are named for all regions in one pass."""
        height, width = rgb.shape[:2]
        sampled, partial = [], []
        masked = [v for v in views if v.rle is not None]
        runs = {id(v): r for v, r in zip(masked, rle.runs_many([v.rle for v in masked]))}
        for view in views:
            x, y, w, h = view.bbox
            region = _Region.of(rgb, view, sums, runs.get(id(view)))
            sampled.append(region.sample())
            texture = "textured" if region.textured(self.settings.texture_threshold) else "smooth"
            cx, cy = x + w / 2, y + h / 2
            frac = view.area / float(width * height)
            partial.append((position_name(cx, cy, width, height), size_name(frac),
                            shape_name(region.mask, view.bbox), texture, frac, (cx, cy)))
        names = colour_indices(np.concatenate(sampled)) if sampled else np.zeros(0, np.int64)
        splits = np.cumsum([len(p) for p in sampled])[:-1]
        measures = {}
        for view, indices, (position, size, shape, texture, frac, centre) in zip(
                views, np.split(names, splits), partial):
            ranked, counts = _ranked(indices)
            second = ranked[1] if len(ranked) > 1 and counts[1] > 0.2 * len(indices) else None
            measures[view.id] = _Measure(ranked[0], second, position, size, shape, texture, frac, centre)
        return measures

    @staticmethod
    def _short(m: _Measure) -> str:
        return f"a {m.size} {m.colour} {m.shape} region at the {m.position}"

    def _long(self, view: RegionView, m: _Measure, measures: dict[str, _Measure], tree: "_Tree") -> str:
        colours = m.colour + (f" with some {m.second}" if m.second else "")
        parts = [f"A {m.size}, {m.shape} region, mostly {colours}, at the {m.position} of the image "
                 f"and covering {100 * m.frac:.1f}% of it. Its surface looks {m.texture}."]
        if view.parent is not None and view.parent in measures:
            parent = measures[view.parent]
            kind = "box" if tree.by_id[view.parent].level == "region" else "region"
            parts.append(f"It lies within a {parent.size} {parent.colour} {kind}.")
        children = tree.parts.get(view.id, [])
        if children:
            listed = ", ".join(self._short(measures[c.id]) for c in children[: self.settings.max_parts_listed])
            parts.append(f"It contains {len(children)} smaller part{'s' if len(children) > 1 else ''}: {listed}.")
        siblings = [v for v in tree.groups[(view.parent, view.level)] if v.id != view.id]
        siblings.sort(key=lambda v: math.dist(measures[v.id].centre, m.centre))
        for sib in siblings[: self.settings.max_neighbours]:
            s = measures[sib.id]
            parts.append(f"Next to it, {_direction(m.centre, s.centre)}, is {self._short(s)}.")
        return " ".join(parts)

    def _image_text(self, rgb: np.ndarray, tree: "_Tree", measures: dict[str, _Measure],
                    provenance: dict[str, Any], sums: rle.RunSums) -> TextOut:
        height, width = rgb.shape[:2]
        sample = rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 2000)]
        top = _ranked(colour_indices(sample))[0][:3]
        brightness = float(sums.total()[0]) / rgb.size   # = rgb.mean(): the integer sum is exact
        light = "dark" if brightness < 85 else ("bright" if brightness > 170 else "mid-toned")
        orientation = "landscape" if width > height * 1.1 else ("portrait" if height > width * 1.1 else "square")
        wholes = [v for v in tree.views if v.parent is None or (v.level == "pixel" and _is_top_box(
                  tree.by_id.get(v.parent)))]
        pixel_wholes = [v for v in wholes if v.level == "pixel"] or [v for v in wholes]
        pixel_wholes = sorted(pixel_wholes, key=lambda v: -v.area)[:4]
        caption = f"a {light} {orientation} image in {' and '.join(top[:2])} tones"
        long = (f"A {light}, {orientation} image ({width}x{height} pixels) whose main colours are "
                f"{', '.join(top)}. It splits into {len(pixel_wholes)} main region"
                f"{'s' if len(pixel_wholes) != 1 else ''}")
        long += (": " + "; ".join(self._short(measures[v.id]) for v in pixel_wholes) + ".") if pixel_wholes else "."
        tags = sorted(set(top + [light, orientation]))
        return TextOut(caption, long, tags, {}, provenance)

    def _one(self, item: CaptionInput) -> CaptionResult:
        rgb = np.asarray(Image.open(io.BytesIO(item.image)).convert("RGB"))
        sums = _grey_sums(rgb)
        measures = self._measure_all(rgb, item.regions, sums)
        tree = _Tree(item.regions)
        provenance = self.provenance()   # one dict for the image's texts, as the model captioners do
        regions = {}
        for view in item.regions:
            m = measures[view.id]
            tags = sorted({m.colour, m.shape, m.size, m.position, m.texture} | ({m.second} if m.second else set()))
            regions[view.id] = TextOut(self._short(m), self._long(view, m, measures, tree),
                                       tags, {}, provenance)
        return CaptionResult(self._image_text(rgb, tree, measures, provenance, sums), regions, [])


class _Tree:
    """Look-ups over one image's regions (by id, parts of a region, regions sharing a parent), so
    describing a region does not scan all the others."""

    def __init__(self, views: list[RegionView]) -> None:
        self.views = views
        self.by_id: dict[str, RegionView] = {}
        self.parts: dict[str | None, list[RegionView]] = {}
        self.groups: dict[tuple[str | None, str], list[RegionView]] = {}
        for v in views:
            self.by_id.setdefault(v.id, v)   # the first of a repeated id, as a scan would find
            if v.level == "pixel":
                self.parts.setdefault(v.parent, []).append(v)
            self.groups.setdefault((v.parent, v.level), []).append(v)


def _is_top_box(parent: RegionView | None) -> bool:
    return parent is not None and parent.level == "region" and parent.parent is None


def _grey_sums(rgb: np.ndarray) -> rle.RunSums:
    """Per-image sums behind every region's texture: r+g+b and its square, per pixel."""
    columns = rgb.transpose(1, 0, 2)   # built column by column, the order RunSums reads
    grey3 = columns[..., 0].astype(np.int32)
    grey3 += columns[..., 1]
    grey3 += columns[..., 2]
    return rle.RunSums([grey3.T, (grey3 * grey3).T])


@dataclass
class _Region:
    """Where a region's pixels are: its runs (and cut-out mask) or its box, with pixel count and
    grey sums. Statistics come from sums over runs and a cut-out of the mask's box, never from a
    full-frame mask."""

    rgb: np.ndarray
    count: int
    grey: tuple[int, int]                 # sums of 3*grey and (3*grey)**2
    mask: np.ndarray | None = None        # the mask cut to its box plus a 1-pixel margin
    origin: tuple[int, int] = (0, 0)      # (x0, y0) of ``mask``, or of the box
    box_width: int = 0

    @classmethod
    def of(cls, rgb: np.ndarray, view: RegionView, sums: rle.RunSums,
           runs: tuple[np.ndarray, np.ndarray] | None = None) -> "_Region":
        """A mask region (its pixels are the mask's; ``runs`` = ``rle.runs(view.rle)`` if known)
        or a box region (the box's pixels, cut as ``rgb[int(y):int(y + h) or 1, int(x):int(x + w)
        or 1]``)."""
        height, width = rgb.shape[:2]
        if view.rle is not None:
            if list(view.rle["size"]) != [height, width]:
                raise ValueError(f"mask size {view.rle['size']} is not the image's {[height, width]}")
            starts, ends = rle.runs(view.rle) if runs is None else runs
            # a 1-pixel margin holds every in-image neighbour of a mask pixel, so the shape's
            # edge and fill measures match the full frame's
            mask, origin = rle.crop(view.rle, margin=1, runs_=(starts, ends))
            count = int((ends - starts).sum())
            grey = sums.over_runs(starts, ends) if count else (0, 0)
            return cls(rgb, count, (int(grey[0]), int(grey[1])), mask, origin)
        x, y, w, h = view.bbox
        y0, y1, _ = slice(int(y), int(y + h) or 1).indices(height)
        x0, x1, _ = slice(int(x), int(x + w) or 1).indices(width)
        count = max(0, y1 - y0) * max(0, x1 - x0)
        grey = sums.over_box(x0, y0, x1, y1) if count else (0, 0)
        return cls(rgb, count, (int(grey[0]), int(grey[1])), None, (x0, y0), max(0, x1 - x0))

    def _at(self, ranks: np.ndarray) -> np.ndarray:
        """Pixels (uint8 RGB rows) at the given positions of the region in row-major order."""
        x0, y0 = self.origin
        if self.mask is not None:
            rows, cols = np.divmod(np.flatnonzero(self.mask)[ranks], self.mask.shape[1])
        else:
            rows, cols = np.divmod(ranks, self.box_width)
        return self.rgb[y0 + rows, x0 + cols]

    def sample(self) -> np.ndarray:
        """Every (count // 400)-th pixel, as named for the region's colours."""
        if self.count == 0:
            return np.zeros((1, 3), np.uint8)
        return self._at(np.arange(0, self.count, max(1, self.count // 400)))

    def pixels(self) -> np.ndarray:
        """All of the region's pixels in row-major order."""
        return self._at(np.arange(self.count)) if self.count else np.zeros((1, 3))

    def textured(self, threshold: float) -> bool:
        """Whether the std of grey (the mean of r, g, b) exceeds ``threshold``. Decided from the
        exact variance; within float noise of the threshold, numpy's std of the pixels decides,
        as it always did."""
        if self.count == 0 or threshold < 0:
            return 0.0 > threshold
        n, (s1, s2) = self.count, self.grey
        variance = (n * s2 - s1 * s1) / (9.0 * n * n)
        limit = threshold * threshold
        if abs(variance - limit) > 1e-9 * limit + 1e-12:
            return variance > limit
        return float(self.pixels().mean(axis=1).std()) > threshold


def _direction(a: tuple[float, float], b: tuple[float, float]) -> str:
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) > abs(dy):
        return "to its right" if dx > 0 else "to its left"
    return "below it" if dy > 0 else "above it"
