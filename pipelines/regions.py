"""SelectRegions: a flat set of candidate masks/boxes → the record's region tree.

Filters (area, predicted IoU, stability), near-duplicate merging, containment → ``parent``
links (whole / part / subpart), box-level regions derived from top-level masks, and limits.
Every dropped candidate is counted by reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from annotators.segment import masks as rle
from annotators.base import Candidate, RegionView
from pipelines.config import RegionSettings


@dataclass
class _Node:
    index: int
    cand: Candidate
    parent: "_Node | None" = None
    depth: int = 0


def _box_iou(a: list[float], b: list[float]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _box_inside(child: list[float], parent: list[float]) -> float:
    cx1, cy1, px1, py1 = child[0] + child[2], child[1] + child[3], parent[0] + parent[2], parent[1] + parent[3]
    iw = max(0.0, min(cx1, px1) - max(child[0], parent[0]))
    ih = max(0.0, min(cy1, py1) - max(child[1], parent[1]))
    area = child[2] * child[3]
    return iw * ih / area if area > 0 else 0.0


def _filter(cands: list[Candidate], settings: RegionSettings, image_area: float,
            dropped: Counter) -> list[Candidate]:
    kept = []
    for c in cands:
        frac = c.area / image_area
        if frac < settings.min_area_frac:
            dropped["too_small"] += 1
        elif frac > settings.max_area_frac:
            dropped["whole_image"] += 1
        elif c.scores.get("predicted_iou", 1.0) < settings.min_predicted_iou:
            dropped["low_predicted_iou"] += 1
        elif c.scores.get("stability", 1.0) < settings.min_stability:
            dropped["low_stability"] += 1
        else:
            kept.append(c)
    return kept


def _score(c: Candidate) -> float:
    return c.scores.get("predicted_iou", 0.0) + c.scores.get("stability", 0.0)


def _dedup(cands: list[Candidate], settings: RegionSettings, dropped: Counter,
           tight: dict[int, list[float]]) -> list[Candidate]:
    """Near-duplicates merge into the best-scored one (ties: larger, then earlier)."""
    order = sorted(range(len(cands)), key=lambda i: (-_score(cands[i]), -cands[i].area, i))
    near = _near_duplicate_masks(cands, settings.dedup_iou, tight)
    kept: list[int] = []
    kept_masks: set[int] = set()
    kept_boxes: list[int] = []
    for i in order:   # masks are compared with masks, boxes with boxes
        if cands[i].rle is not None:
            dup = not near.get(i, set()).isdisjoint(kept_masks)
        else:
            dup = any(_box_iou(cands[i].bbox, cands[j].bbox) > settings.dedup_iou for j in kept_boxes)
        if dup:
            dropped["duplicate"] += 1
            continue
        kept.append(i)
        if cands[i].rle is not None:
            kept_masks.add(i)
        else:
            kept_boxes.append(i)
    return [cands[i] for i in sorted(kept)]


_BLOCK = 512   # rows of a pairwise matrix held at once: memory stays O(n), not O(n^2), per block


def _pair_overlaps(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pixels shared by each [x, y, w, h] box of ``rows`` with each of ``cols``."""
    x0, y0, x1, y1 = rows[:, 0, None], rows[:, 1, None], (rows[:, 0] + rows[:, 2])[:, None], \
        (rows[:, 1] + rows[:, 3])[:, None]
    iw = np.minimum(x1, cols[:, 0] + cols[:, 2]) - np.maximum(x0, cols[:, 0])
    ih = np.minimum(y1, cols[:, 1] + cols[:, 3]) - np.maximum(y0, cols[:, 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def _tight_box_map(cands: list[Candidate]) -> dict[int, list[float]]:
    """The masks' own [x, y, w, h] by ``id`` of the candidate (a candidate's ``bbox`` need not be
    tight), measured once per image."""
    masked = [c for c in cands if c.rle is not None]
    return dict(zip(map(id, masked), rle.bboxes([c.rle for c in masked]), strict=True))


def _tight_boxes(cands: list[Candidate], indices: list[int], tight: dict[int, list[float]]) -> np.ndarray:
    return np.array([tight[id(cands[i])] for i in indices], np.float64).reshape(-1, 4)


def _near_duplicate_masks(cands: list[Candidate], dedup_iou: float,
                          tight: dict[int, list[float]]) -> dict[int, set[int]]:
    """Pairs of masks whose IoU passes ``dedup_iou``, as a map from each to the others.

    IoU is at most min(shared box pixels, either area) / the larger area, so only pairs whose
    bound passes are measured (by pycocotools, as before); the rest cannot be duplicates.
    """
    masked = [i for i, c in enumerate(cands) if c.rle is not None]
    if len(masked) < 2:
        return {}
    rles = [cands[i].rle for i in masked]
    boxes = _tight_boxes(cands, masked, tight)
    areas = np.array(rle.areas(rles), np.float64)
    near: dict[int, set[int]] = {}
    for lo in range(0, len(masked), _BLOCK):
        block = slice(lo, lo + _BLOCK)
        shared = np.minimum(_pair_overlaps(boxes[block], boxes),
                            np.minimum(areas[block, None], areas[None, :]))
        larger = np.maximum(areas[block, None], areas[None, :])
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.where(larger > 0, shared / larger, np.inf)
        for a, b in np.argwhere(bound > dedup_iou):
            a += lo
            if b > a and float(rle.iou([rles[a]], [rles[b]])[0, 0]) > dedup_iou:
                near.setdefault(masked[a], set()).add(masked[b])
                near.setdefault(masked[b], set()).add(masked[a])
    return near


def _maybe_inside(cands: list[Candidate], contain_frac: float,
                  tight: dict[int, list[float]]) -> np.ndarray:
    """(n, n) booleans: whether candidate j may be the parent of candidate i — larger, of the
    same kind (mask or box) and, for masks, with enough shared pixels of the tight boxes to hold
    ``contain_frac`` of i (they bound the masks' shared pixels)."""
    area = np.array([c.area for c in cands], np.float64)
    is_mask = np.array([c.rle is not None for c in cands], bool)
    masked = np.flatnonzero(is_mask)
    boxes = np.zeros((len(cands), 4))
    if masked.size:
        boxes[masked] = _tight_boxes(cands, list(masked), tight)
    maybe = np.empty((len(cands), len(cands)), bool)
    for lo in range(0, len(cands), _BLOCK):
        block = slice(lo, lo + _BLOCK)
        rows = (area[None, :] > area[block, None]) & (is_mask[None, :] == is_mask[block, None])
        enough = _pair_overlaps(boxes[block], boxes) / np.maximum(area[block], 1.0)[:, None] >= contain_frac
        maybe[block] = rows & (enough | ~is_mask[block, None])   # boxes: no bound, checked exactly
    return maybe


def _containment(child: Candidate, parent: Candidate) -> float:
    if child.rle is not None and parent.rle is not None:
        return rle.intersection_area(child.rle, parent.rle) / max(child.area, 1.0)
    return _box_inside(child.bbox, parent.bbox)


def _build_tree(cands: list[Candidate], settings: RegionSettings, dropped: Counter,
                tight: dict[int, list[float]]) -> list[_Node]:
    """Largest first; each candidate's parent is the smallest earlier one containing it.

    A candidate ``within`` another (sam-boxes: the mask of a given box) goes under that one's
    node when it was kept, after every other node; otherwise it is placed like the others."""
    present = {id(c) for c in cands}
    linked = [i for i, c in enumerate(cands) if c.within is not None and id(c.within) in present]
    is_linked = set(linked)
    order = sorted((i for i in range(len(cands)) if i not in is_linked),
                   key=lambda i: (-cands[i].area, cands[i].bbox, i))
    maybe = _maybe_inside(cands, settings.contain_frac, tight)
    nodes: list[_Node] = []
    node_of: dict[int, _Node] = {}
    node_cands = np.zeros(len(cands), np.int64)   # candidate index of each node so far
    for i in order:
        c = cands[i]
        parent = None
        # later nodes are smaller: the first hit from the end is the smallest container
        for n in np.flatnonzero(maybe[i, node_cands[:len(nodes)]])[::-1]:
            if _containment(c, nodes[n].cand) >= settings.contain_frac:
                parent = int(n)
                break
        parent_node = nodes[parent] if parent is not None else None
        depth = parent_node.depth + 1 if parent_node is not None else 0
        if depth >= settings.max_depth:
            dropped["too_deep"] += 1
            continue
        node_cands[len(nodes)] = i
        nodes.append(_Node(i, c, parent_node, depth))
        node_of[id(c)] = nodes[-1]
    for i in sorted(linked, key=lambda i: (-cands[i].area, cands[i].bbox, i)):
        parent_node = node_of.get(id(cands[i].within))
        depth = parent_node.depth + 1 if parent_node is not None else 0
        if depth >= settings.max_depth:
            dropped["too_deep"] += 1
            continue
        nodes.append(_Node(i, cands[i], parent_node, depth))
    return nodes


def _apply_limits(nodes: list[_Node], settings: RegionSettings, dropped: Counter) -> list[_Node]:
    kept: list[_Node] = []
    kept_ids: set[int] = set()
    top = 0
    for node in nodes:
        if node.parent is None:
            if top >= settings.max_regions:
                dropped["over_limit"] += 1
                continue
            top += 1
        elif id(node.parent) not in kept_ids:
            dropped["over_limit"] += 1
            continue
        if len(kept) >= settings.max_total:
            dropped["over_limit"] += 1
            continue
        kept.append(node)
        kept_ids.add(id(node))
    return kept


def select_regions(cands: list[Candidate], image: np.ndarray | tuple[int, int],
                   settings: RegionSettings) -> tuple[list[RegionView], dict[str, int]]:
    """The region tree (parents before children) and counts of dropped candidates by reason.

    ``image`` is the image's pixels or only its (height, width): no pixel is read here."""
    height, width = image if isinstance(image, tuple) else image.shape[:2]
    for c in cands:
        if c.rle is not None and list(c.rle["size"]) != [height, width]:
            raise ValueError(f"mask size {c.rle['size']} is not the image's {[height, width]}")
    dropped: Counter = Counter()
    cands = _filter(cands, settings, float(width * height), dropped)
    tight = _tight_box_map(cands)
    cands = _dedup(cands, settings, dropped, tight)
    nodes = _apply_limits(_build_tree(cands, settings, dropped, tight), settings, dropped)
    views: list[RegionView] = []
    ids: dict[int, str] = {}
    n_box = n_pix = 0
    for node in nodes:
        c = node.cand
        stats = {"depth": node.depth, "source": c.source}
        given = {"label": c.label} if c.label else {}
        parent_id = ids[id(node.parent)] if node.parent is not None else None
        if c.rle is None:
            n_box += 1
            rid = f"r{n_box}"
            views.append(RegionView(rid, "region", parent_id, list(c.bbox), float(c.area), None, stats,
                                    dict(given)))
        else:
            if node.parent is None and settings.box_regions:
                n_box += 1
                box_id = f"r{n_box}"
                x, y, w, h = c.bbox
                views.append(RegionView(box_id, "region", None, list(c.bbox), float(w * h), None,
                                        dict(stats), dict(given)))
                parent_id = box_id
            n_pix += 1
            rid = f"p{n_pix}"
            views.append(RegionView(rid, "pixel", parent_id, list(c.bbox), float(c.area), c.rle, stats,
                                    dict(given)))
        views[-1].stats["scores"] = dict(c.scores)
        ids[id(node)] = rid
    return views, dict(dropped)
