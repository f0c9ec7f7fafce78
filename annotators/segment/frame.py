"""Annotations given with an input (boxes, masks) mapped onto the stored image: one function each.

An input is decoded, turned upright by its EXIF orientation and resized to the stored image.
Annotations refer either to the input as displayed (``displayed``: after the EXIF orientation,
what viewers and most labelling tools show — the default) or to its raw pixel rows (``raw``:
what a loader that ignores EXIF reads, e.g. COCO's own tools). ``InputFrame`` holds what the
mapping needs and maps boxes and masks to the stored image's pixels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from annotators.segment import masks as rle

FRAMES = ("displayed", "raw")
# EXIF orientation → the transpose that turns the raw pixels upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class InputFrame:
    """The stored image's size, the input's size as displayed, and its EXIF orientation."""

    width: int
    height: int
    original_width: int
    original_height: int
    orientation: int = 1

    @classmethod
    def of(cls, given: dict[str, Any] | None, height: int, width: int) -> "InputFrame":
        """From what the pipeline passes a segmenter in ``given`` (``original_size`` (h, w) and
        ``orientation``); an input with neither is taken as the stored image itself."""
        given = given or {}
        orig_h, orig_w = given.get("original_size", (height, width))
        return cls(width, height, int(orig_w), int(orig_h), int(given.get("orientation", 1) or 1))

    def _upright_box(self, box: list[float], frame: str) -> list[float]:
        x, y, w, h = box
        if frame == "displayed" or self.orientation not in _UPRIGHT:
            return [x, y, w, h]
        swapped = self.orientation in (5, 6, 7, 8)
        raw_w, raw_h = (self.original_height, self.original_width) if swapped else \
            (self.original_width, self.original_height)
        o = self.orientation
        if o == 2:
            return [raw_w - x - w, y, w, h]
        if o == 3:
            return [raw_w - x - w, raw_h - y - h, w, h]
        if o == 4:
            return [x, raw_h - y - h, w, h]
        if o == 5:
            return [y, x, h, w]
        if o == 6:
            return [raw_h - y - h, x, h, w]
        if o == 7:
            return [raw_h - y - h, raw_w - x - w, h, w]
        return [y, raw_w - x - w, h, w]                     # 8

    def box(self, box: Any, frame: str = "displayed") -> list[float] | None:
        """[x, y, w, h] of the input → the stored image, clipped to it; None when malformed or
        empty after clipping."""
        try:
            x, y, w, h = (float(v) for v in box)
        except (TypeError, ValueError):
            return None
        if not all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
            return None
        x, y, w, h = self._upright_box([x, y, w, h], frame)
        sx, sy = self.width / self.original_width, self.height / self.original_height
        x0, y0 = min(max(x * sx, 0.0), self.width), min(max(y * sy, 0.0), self.height)
        x1, y1 = min(max((x + w) * sx, 0.0), self.width), min(max((y + h) * sy, 0.0), self.height)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            return None
        return [x0, y0, x1 - x0, y1 - y0]

    def mask(self, encoded: dict, frame: str = "displayed") -> dict:
        """A COCO RLE of the input → an RLE of the stored image (nearest-neighbour resize)."""
        return self.masks([encoded], frame)[0]

    def masks(self, encoded: list[dict], frame: str = "displayed") -> list[dict]:
        """``mask`` of many, resized together (``rescale_masks``)."""
        upright = [rle.normalize(e) for e in encoded]
        if frame == "raw" and self.orientation in _UPRIGHT:
            upright = [rle.encode(np.asarray(Image.fromarray(rle.decode(e).astype(np.uint8))
                                             .transpose(_UPRIGHT[self.orientation])) > 0)
                       for e in upright]
        return rescale_masks(upright, self.height, self.width)


@functools.lru_cache(maxsize=64)
def _nearest_index(source: int, target: int) -> np.ndarray:
    """The source index each of ``target`` pixels takes under Pillow's NEAREST resize (which is
    separable: rows and columns are mapped independently)."""
    line = Image.fromarray(np.arange(source, dtype=np.int32).reshape(1, source), mode="I")
    return np.asarray(line.resize((target, 1), Image.Resampling.NEAREST)).reshape(target).astype(np.int64)


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n in ``lengths``, concatenated."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def rescale_mask(encoded: dict, height: int, width: int) -> dict:
    """The mask resized to ``height`` × ``width`` exactly as Pillow's NEAREST resize of the drawn
    mask would (``rescale_masks`` of one)."""
    return rescale_masks([encoded], height, width)[0]


def rescale_masks(encoded: list[dict], height: int, width: int) -> list[dict]:
    """Each mask resized to ``height`` × ``width`` exactly as Pillow's NEAREST resize of the drawn
    mask would, computed on the runs of all of them at once (no full-frame mask is drawn, and
    numpy's per-call cost is paid once per image, not once per mask)."""
    masks = [rle.normalize(e) for e in encoded]
    out: list[dict | None] = [m if tuple(int(v) for v in m["size"]) == (height, width) else None
                              for m in masks]
    todo: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(masks):
        if out[i] is None:
            todo.setdefault((int(m["size"][0]), int(m["size"][1])), []).append(i)
    for (src_h, src_w), members in todo.items():
        counts = _rescale_runs([masks[i] for i in members], src_h, src_w, height, width)
        for i, encoded in zip(members, rle.from_uncompressed_many(counts, height, width),
                              strict=True):
            out[i] = encoded
    return [m for m in out if m is not None]


@functools.lru_cache(maxsize=64)
def _taken_by(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``source`` pixels, the range [first, end) of the ``target`` pixels that take
    it under ``_nearest_index`` (empty when none does: a downscale skips some)."""
    index, pixels = _nearest_index(source, target), np.arange(source)
    return np.searchsorted(index, pixels, "left"), np.searchsorted(index, pixels, "right")


def _rescale_runs(masks: list[dict], src_h: int, src_w: int, height: int,
                  width: int) -> list[np.ndarray]:
    """Uncompressed counts of each of ``masks`` (all ``src_h`` × ``src_w``) after the resize.

    The masks' runs are laid end to end, mask ``m``'s columns numbered from ``m * src_w``; the
    output frame of mask ``m`` starts at ``m * (height * width + 1)``, each frame followed by
    one unused pixel so that runs of two masks never touch. Only the columns a run touches are
    visited (~200 of a mask's 1,280 for a photo's object), not every column of every frame."""
    starts, ends, owner = rle.runs_flat(masks)
    if ends.size and ends.max() > src_h * src_w:   # its pixels would spill into the next mask
        raise ValueError(f"a mask's counts run past its size {src_h}x{src_w}")
    base = owner * (src_h * src_w)
    starts, ends = starts + base, ends + base
    first_col, last_col = starts // src_h, (ends - 1) // src_h
    pieces = last_col - first_col + 1                      # a run may continue in the next column
    run = np.repeat(np.arange(starts.size), pieces)
    col = first_col[run] + _ranges(pieces)
    row0 = np.maximum(starts[run] - col * src_h, 0)
    row1 = np.minimum(ends[run] - col * src_h, src_h)
    rows = _nearest_index(src_h, height)                   # nondecreasing
    top, bottom = np.searchsorted(rows, row0), np.searchsorted(rows, row1)
    keep = bottom > top
    col, top, bottom = col[keep], top[keep], bottom[keep]
    # each piece goes to every output column that takes its source column (0, 1 or more)
    mask_of = col // src_w
    first_target, end_target = _taken_by(src_w, width)
    source_col = col - mask_of * src_w
    lo, taken = first_target[source_col], end_target[source_col] - first_target[source_col]
    piece = np.repeat(np.arange(col.size), taken)
    run_mask = mask_of[piece]
    stride = height * width + 1
    offset = run_mask * stride + (lo[piece] + _ranges(taken)) * height
    run_starts, run_ends = offset + top[piece], offset + bottom[piece]
    if taken.size and taken.max() > 1:   # an upscale: a column's pieces repeat, column by column
        order = np.argsort(run_starts, kind="stable")
        run_starts, run_ends, run_mask = run_starts[order], run_ends[order], run_mask[order]
    if run_starts.size:
        joined = run_starts[1:] == run_ends[:-1]           # touching runs become one
        run_starts, run_mask = run_starts[np.concatenate(([True], ~joined))], \
            run_mask[np.concatenate(([True], ~joined))]
        run_ends = run_ends[np.concatenate((~joined, [True]))]
    # each mask's counts: zeros before its first run, then run, gap, run, …, and the zeros after
    # its last run; computed for all masks at once, then cut per mask
    local = run_mask * stride
    edges = np.empty(2 * run_starts.size, np.int64)
    edges[0::2], edges[1::2] = run_starts - local, run_ends - local
    steps = np.diff(edges, prepend=0)
    first = np.searchsorted(run_mask, np.arange(len(masks) + 1))   # each mask's runs: first[m]:first[m+1]
    starts_at = 2 * first[:-1][first[:-1] < first[1:]]
    steps[starts_at] = edges[starts_at]                     # a mask's first run counts from 0
    frame = height * width
    empty = np.array([frame], np.int64)
    return [np.append(steps[a:b], frame - edges[b - 1]) if b > a else empty
            for a, b in zip((2 * first[:-1]).tolist(), (2 * first[1:]).tolist())]
