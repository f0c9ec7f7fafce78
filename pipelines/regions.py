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


def _dedup(cands: list[Candidate], settings: RegionSettings, dropped: Counter) -> list[Candidate]:
    """Near-duplicates merge into the best-scored one (ties: larger, then earlier)."""
    order = sorted(range(len(cands)), key=lambda i: (-_score(cands[i]), -cands[i].area, i))
    masked = [i for i in order if cands[i].rle is not None]
    ious = rle.iou([cands[i].rle for i in masked], [cands[i].rle for i in masked]) if masked else None
    pos = {i: n for n, i in enumerate(masked)}
    kept: list[int] = []
    for i in order:
        dup = False
        for j in kept:
            if cands[i].rle is not None and cands[j].rle is not None:
                overlap = float(ious[pos[i], pos[j]])
            elif cands[i].rle is None and cands[j].rle is None:
                overlap = _box_iou(cands[i].bbox, cands[j].bbox)
            else:
                continue
            if overlap > settings.dedup_iou:
                dup = True
                break
        if dup:
            dropped["duplicate"] += 1
        else:
            kept.append(i)
    return [cands[i] for i in sorted(kept)]


def _containment(child: Candidate, parent: Candidate) -> float:
    if child.rle is not None and parent.rle is not None:
        return rle.intersection_area(child.rle, parent.rle) / max(child.area, 1.0)
    return _box_inside(child.bbox, parent.bbox)


def _build_tree(cands: list[Candidate], settings: RegionSettings, dropped: Counter) -> list[_Node]:
    """Largest first; each candidate's parent is the smallest earlier one containing it."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].area, cands[i].bbox, i))
    nodes: list[_Node] = []
    for i in order:
        c = cands[i]
        parent = None
        for n in reversed(range(len(nodes))):   # later nodes are smaller: first hit is smallest
            p = nodes[n].cand
            if p.area > c.area and (p.rle is None) == (c.rle is None) and \
                    _containment(c, p) >= settings.contain_frac:
                parent = n
                break
        parent_node = nodes[parent] if parent is not None else None
        depth = parent_node.depth + 1 if parent_node is not None else 0
        if depth >= settings.max_depth:
            dropped["too_deep"] += 1
            continue
        nodes.append(_Node(i, c, parent_node, depth))
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


def _mean_rgb(rgb: np.ndarray, cand: Candidate) -> list[float]:
    if cand.rle is not None:
        pixels = rgb[rle.decode(cand.rle)]
    else:
        x, y, w, h = (int(round(v)) for v in cand.bbox)
        pixels = rgb[y:y + max(h, 1), x:x + max(w, 1)].reshape(-1, 3)
    return [round(float(v), 2) for v in pixels.mean(axis=0)] if len(pixels) else [0.0, 0.0, 0.0]


def select_regions(cands: list[Candidate], rgb: np.ndarray,
                   settings: RegionSettings) -> tuple[list[RegionView], dict[str, int]]:
    """The region tree (parents before children) and counts of dropped candidates by reason."""
    height, width = rgb.shape[:2]
    dropped: Counter = Counter()
    cands = _filter(cands, settings, float(width * height), dropped)
    cands = _dedup(cands, settings, dropped)
    nodes = _apply_limits(_build_tree(cands, settings, dropped), settings, dropped)
    views: list[RegionView] = []
    ids: dict[int, str] = {}
    n_box = n_pix = 0
    for node in nodes:
        c = node.cand
        stats = {"mean_rgb": _mean_rgb(rgb, c), "depth": node.depth, "source": c.source}
        parent_id = ids[id(node.parent)] if node.parent is not None else None
        if c.rle is None:
            n_box += 1
            rid = f"r{n_box}"
            views.append(RegionView(rid, "region", parent_id, list(c.bbox), float(c.area), None, stats))
        else:
            if node.parent is None and settings.box_regions:
                n_box += 1
                box_id = f"r{n_box}"
                x, y, w, h = c.bbox
                views.append(RegionView(box_id, "region", None, list(c.bbox), float(w * h), None,
                                        dict(stats)))
                parent_id = box_id
            n_pix += 1
            rid = f"p{n_pix}"
            views.append(RegionView(rid, "pixel", parent_id, list(c.bbox), float(c.area), c.rle, stats))
        views[-1].stats["scores"] = dict(c.scores)
        ids[id(node)] = rid
    return views, dict(dropped)
