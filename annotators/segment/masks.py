"""COCO RLE helpers on top of pycocotools (the record's mask format)."""
from __future__ import annotations

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
    out = mask_utils.frPyObjects(rle, h, w)
    return {"size": [h, w], "counts": out["counts"].decode("ascii")}


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
