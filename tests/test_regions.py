"""SelectRegions on synthetic scenes whose masks and hierarchy are known."""
from __future__ import annotations

import numpy as np

from annotators.base import Candidate
from annotators.segment import masks
from pipelines.config import RegionSettings
from pipelines.regions import select_regions
from pipelines.synthetic import scene


def _candidates(objects):
    return [Candidate(o["bbox"], float(o["area"]), o["mask"], {}, "given") for o in objects]


def _scene_with_part(start: int = 0):
    for index in range(start, start + 200):
        image, objects = scene(11, index, 128)
        if any(o["parent"] for o in objects):
            return np.asarray(image), objects
    raise AssertionError("no scene with a part")


def test_parents_follow_known_containment() -> None:
    rgb, objects = _scene_with_part()
    views, dropped = select_regions(_candidates(objects), rgb, RegionSettings(min_area_frac=0.0))
    by_mask = {v.rle["counts"]: v for v in views if v.level == "pixel"}
    ids = {v.id: v for v in views}
    for obj in objects:
        view = by_mask[obj["mask"]["counts"]]
        if obj["parent"] is None:   # a whole: its parent is its own box region
            box = ids[view.parent]
            assert box.level == "region" and box.parent is None and box.bbox == view.bbox
        else:
            parent_obj = next(o for o in objects if o["id"] == obj["parent"])
            assert ids[view.parent].rle["counts"] == parent_obj["mask"]["counts"]
    assert dropped == {}
    order = [v.id for v in views]
    assert all(order.index(v.parent) < order.index(v.id) for v in views if v.parent)


def test_duplicates_merge_and_filters_count() -> None:
    rgb, objects = _scene_with_part()
    cands = _candidates(objects)
    near = masks.decode(objects[0]["mask"]).copy()
    ys, xs = np.nonzero(near)
    near[ys[0], xs[0]] = False   # one pixel less: a near-duplicate
    enc = masks.encode(near)
    cands.append(Candidate(masks.bbox(enc), float(masks.area(enc)), enc, {"predicted_iou": 0.1}, "x"))
    tiny = np.zeros(rgb.shape[:2], bool)
    tiny[0, 0] = True
    enc = masks.encode(tiny)
    cands.append(Candidate(masks.bbox(enc), 1.0, enc, {}, "x"))
    views, dropped = select_regions(cands, rgb, RegionSettings(min_area_frac=0.001))
    assert dropped == {"duplicate": 1, "too_small": 1}
    assert sum(v.level == "pixel" for v in views) == len(objects)


def test_limits_and_depth() -> None:
    rgb, objects = _scene_with_part()
    wholes = [o for o in objects if o["parent"] is None]
    parts = [o for o in objects if o["parent"] is not None]
    views, dropped = select_regions(_candidates(objects), rgb,
                                    RegionSettings(min_area_frac=0.0, max_depth=1, box_regions=False))
    assert {v.parent for v in views} == {None}
    assert len(views) == len(wholes) and dropped["too_deep"] == len(parts)
    views, dropped = select_regions(_candidates(objects), rgb, RegionSettings(min_area_frac=0.0, max_regions=1))
    assert sum(v.parent is None for v in views) == 1
    assert dropped["over_limit"] >= len(wholes) - 1


def test_box_only_candidates_nest_by_box() -> None:
    rgb = np.zeros((100, 100, 3), np.uint8)
    cands = [Candidate([10, 10, 60, 60], 3600.0), Candidate([20, 20, 10, 10], 100.0),
             Candidate([80, 80, 10, 10], 100.0)]
    views, _ = select_regions(cands, rgb, RegionSettings(min_area_frac=0.0))
    assert [(v.id, v.level, v.parent, v.bbox[0]) for v in views] == [
        ("r1", "region", None, 10), ("r2", "region", "r1", 20), ("r3", "region", None, 80)]
    assert all(v.rle is None for v in views)
