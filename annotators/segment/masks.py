"""COCO RLE helpers on top of pycocotools (the record's mask format)."""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode(mask: np.ndarray) -> dict:
    """Boolean (H, W) mask -> COCO RLE {"size": [h, w], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> boolean (H, W) mask."""
    return mask_utils.decode(_coco(rle)).astype(bool)


def area(rle: dict) -> int:
    """Pixel count of an RLE mask."""
    return int(mask_utils.area(_coco(rle)))


def bbox(rle: dict) -> list[float]:
    """Tight [x, y, w, h] of an RLE mask (pycocotools convention: integer pixel edges)."""
    return [float(v) for v in mask_utils.toBbox(_coco(rle))]


def iou(a: list[dict], b: list[dict]) -> np.ndarray:
    """Pairwise mask IoU matrix (len(a), len(b))."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([_coco(r) for r in a], [_coco(r) for r in b], [0] * len(b)))


def intersection_area(a: dict, b: dict) -> int:
    """Pixels in both masks."""
    merged = mask_utils.merge([_coco(a), _coco(b)], intersect=True)
    return int(mask_utils.area(merged))


def from_polygons(polygons: list[list[float]], height: int, width: int) -> dict:
    """COCO polygon segmentation -> RLE."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    merged = mask_utils.merge(rles)
    return {"size": [height, width], "counts": merged["counts"].decode("ascii")}


def from_uncompressed(rle: dict) -> dict:
    """COCO uncompressed RLE (counts as a list of ints) -> compressed RLE."""
    h, w = rle["size"]
    return from_uncompressed_many([rle["counts"]], h, w)[0]


def from_uncompressed_many(counts: list[Any], height: int, width: int) -> list[dict]:
    """``from_uncompressed`` of many counts lists of one frame size, in one pycocotools call."""
    if not counts:
        return []
    out = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts],
                                 height, width)
    return [{"size": [height, width], "counts": o["counts"].decode("ascii")} for o in out]


def normalize(rle: dict) -> dict:
    """Any COCO RLE dict (counts bytes/str/list) -> {"size": [h, w], "counts": str}."""
    if isinstance(rle.get("counts"), list):
        return from_uncompressed(rle)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _coco(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, rle["size"][0], rle["size"][1])
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": list(rle["size"]), "counts": counts}


# --------------------------------------------------------------------------- run-level helpers
#
# pycocotools only turns an RLE into a full-frame mask. The embedded annotators need, per region,
# the pixels of a small crop or a sum over the region; drawing a full frame for each of ~100
# regions per image was most of their cost. These helpers read and write the runs themselves and
# leave the string compression (and every other operation) to pycocotools.


def label_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal values of a label image in RLE (column-major) order: starts, ends
    and values; together they cover the frame."""
    flat = np.ascontiguousarray(labels.T).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [flat.size]))
    return starts, ends, flat[starts]


def encode_labels(labels: np.ndarray) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """RLEs of every value of an integer label image, in one scan of the image.

    Returns (values ascending, RLEs, pixel counts); ``RLEs[i]`` is exactly ``encode(labels ==
    values[i])``.
    """
    return encode_runs(*label_runs(labels), *labels.shape)


def encode_runs(starts: np.ndarray, ends: np.ndarray, run_values: np.ndarray, height: int,
                width: int) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """``encode_labels`` of the label image whose ``label_runs`` these are (maximal runs:
    neighbouring runs differ in value)."""
    if run_values.size == 0:
        return run_values, [], np.zeros(0, np.int64)
    key = run_values
    if key.min() >= 0 and key.max() < 1 << 16:
        key = key.astype(np.uint16)   # numpy's stable sort of 16-bit keys is a radix sort
    order = np.argsort(key, kind="stable")   # runs grouped by value, in image order
    starts, ends, run_values = starts[order], ends[order], run_values[order]
    first = np.flatnonzero(np.concatenate(([True], run_values[1:] != run_values[:-1])))
    values = run_values[first]
    previous_end = np.concatenate(([0], ends[:-1]))
    previous_end[first] = 0                            # a value's first run follows only zeros
    counts = np.stack([starts - previous_end, ends - starts], axis=1).ravel()
    last = np.append(first[1:], len(starts)) - 1
    tails = height * width - ends[last]
    per_value = [counts[lo:hi] if tails[i] == 0 else np.append(counts[lo:hi], tails[i])
                 for i, (lo, hi) in enumerate(zip(2 * first, 2 * (last + 1)))]
    rles = from_uncompressed_many(per_value, int(height), int(width))
    return values, rles, np.add.reduceat(ends - starts, first)


def _parse_counts(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run lengths of many COCO counts strings at once: (lengths, string of each, index of
    each within its string).

    COCO's string form: each count in 5-bit groups (char - 48), 0x20 = more groups follow, 0x10
    in the last group = negative; counts after the third are deltas to the count two before.
    """
    chars = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    last = (chars & 0x20) == 0
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(starts.size), ends - starts + 1)
    values = np.add.reduceat((chars & 0x1F) << (5 * (np.arange(chars.size) - starts[group])), starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (ends - starts + 1)[negative])
    # which string each value belongs to, and its index there (a value never spans strings)
    char_offsets = np.cumsum([0] + [len(t) for t in strings])
    owner = np.searchsorted(char_offsets, ends, side="right") - 1
    first = np.searchsorted(owner, np.arange(len(strings)))
    index = np.arange(values.size) - first[owner]
    # undo the deltas: from index 3 on, a value adds the one two before it. Values two apart
    # have the same parity of position in the joined array, so one running sum per parity serves
    # every string; each value takes away that sum just before its chain's head (index 1 for odd
    # indices, 2 for even ones; index 0 stands alone)
    running = np.empty_like(values)
    running[0::2], running[1::2] = np.cumsum(values[0::2]), np.cumsum(values[1::2])
    head = first[owner] + np.where(index & 1, 1, np.minimum(index, 2))
    out = running - np.where(head >= 2, running[np.maximum(head - 2, 0)], 0)
    return out, owner, index


def _counts_bytes(rle: dict) -> bytes:
    raw = rle["counts"]
    if isinstance(raw, list):
        raw = normalize(rle)["counts"]
    return raw.encode("ascii") if isinstance(raw, str) else raw


def counts(rle: dict) -> np.ndarray:
    """The run lengths of an RLE (zeros first, then ones, alternating), without drawing it."""
    return _parse_counts([_counts_bytes(rle)])[0]


def runs_flat(rles: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of ones of many RLEs, parsed in one vectorised pass: (starts, ends, mask index of
    each run), ordered by mask, then position (for one mask, numpy's per-call overhead is most of
    the cost)."""
    if not rles:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    lengths, owner, index = _parse_counts([_counts_bytes(r) for r in rles])
    if lengths.size and lengths.min() < 0:
        raise ValueError("an RLE's counts include a negative run length")
    firsts = np.searchsorted(owner, np.arange(len(rles)))
    offsets = np.cumsum(lengths)
    offsets -= np.concatenate(([0], offsets))[firsts][owner]   # running sums within each mask
    ones = ((index & 1) == 1) & (lengths > 0)
    ends, who = offsets[ones], owner[ones]
    return ends - lengths[ones], ends, who


def runs_many(rles: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``runs`` of many RLEs (``runs_flat`` cut per mask)."""
    if not rles:
        return []
    starts, ends, who = runs_flat(rles)
    cuts = np.searchsorted(who, np.arange(1, len(rles)))
    return list(zip(np.split(starts, cuts), np.split(ends, cuts)))


def runs(rle: dict) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each run of ones, as indices into the column-major flattened frame."""
    return runs_many([rle])[0]


def crop(rle: dict, margin: int = 0,
         runs_: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The mask cut to its tight box grown by ``margin`` pixels (clipped to the frame).

    Returns (boolean crop, (x0, y0) of the crop in the frame); pixels are the same as
    ``decode(rle)[y0:y0 + h, x0:x0 + w]``. An empty mask gives a (0, 0) crop at (0, 0).
    ``runs_`` passes ``runs(rle)`` when the caller already has them.
    """
    height, width = (int(v) for v in rle["size"])
    starts, ends = runs(rle) if runs_ is None else runs_
    if starts.size == 0:
        return np.zeros((0, 0), bool), (0, 0)
    first_col, last_col = starts // height, (ends - 1) // height
    x0, x1 = max(int(first_col[0]) - margin, 0), min(int(last_col[-1]) + margin, width - 1)
    if np.any(first_col != last_col):   # a run wraps into the next column: every row is covered
        y0, y1 = 0, height - 1
        begin = starts - x0 * height
    else:
        rows = starts - first_col * height
        y0 = max(int(rows.min()) - margin, 0)
        y1 = min(int((rows + (ends - starts)).max()) - 1 + margin, height - 1)
        begin = (first_col - x0) * (y1 - y0 + 1) + rows - y0
    crop_w, crop_h = x1 - x0 + 1, y1 - y0 + 1
    # the crop's own RLE (column-major, zeros first) drawn by np.repeat, then turned row-major
    bounds = np.empty(2 * begin.size + 2, np.int64)
    bounds[0], bounds[-1] = 0, crop_w * crop_h
    bounds[1:-1:2], bounds[2:-1:2] = begin, begin + (ends - starts)
    values = np.zeros(bounds.size - 1, bool)
    values[1::2] = True
    band = np.repeat(values, np.diff(bounds)).reshape(crop_w, crop_h)
    return np.ascontiguousarray(band.T), (x0, y0)


class RunSums:
    """Sums of per-pixel values over masks, one look-up per run.

    One cumulative sum per plane of (H, W) values, in RLE (column-major) order, per image; a
    mask's sums are then exact integers at the cost of its run count, whatever its area.
    """

    def __init__(self, planes: list[np.ndarray]) -> None:
        height, width = planes[0].shape
        self.height = height
        # one block for all planes (fresh large blocks cost page faults), cast then summed in
        # place (numpy's casting cumsum is many times slower)
        self.prefix = np.empty((len(planes), height * width + 1), np.int64)
        self.prefix[:, 0] = 0
        for row, plane in zip(self.prefix, planes):
            row[1:].reshape(width, height)[...] = plane.T
        np.cumsum(self.prefix, axis=1, out=self.prefix)

    def over_runs(self, starts: np.ndarray, ends: np.ndarray) -> list[int]:
        """Per-plane sums over the runs [starts, ends)."""
        return [int(p[ends].sum() - p[starts].sum()) for p in self.prefix]

    def over_box(self, x0: int, y0: int, x1: int, y1: int) -> list[int]:
        """Per-plane sums over the pixels [y0, y1) x [x0, x1)."""
        columns = np.arange(x0, x1) * self.height
        return self.over_runs(columns + y0, columns + y1)

    def total(self) -> list[int]:
        """Per-plane sums over the whole image."""
        return [int(p[-1]) for p in self.prefix]


def bboxes(rles: list[dict]) -> list[list[float]]:
    """``bbox`` of many RLEs in one pycocotools call."""
    if not rles:
        return []
    return [[float(v) for v in box] for box in mask_utils.toBbox([_coco(r) for r in rles])]


def areas(rles: list[dict]) -> list[int]:
    """``area`` of many RLEs, in pycocotools calls of at most 255 (its list area() counts them
    in a uint8 and overflows at 256)."""
    coco = [_coco(r) for r in rles]
    return [int(a) for lo in range(0, len(coco), 255) for a in mask_utils.area(coco[lo:lo + 255])]
