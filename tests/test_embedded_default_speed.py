"""The embedded default (segmenter `classical`, SelectRegions, captioner `attributes`) after its
speed-up: the same outputs as before, and the run-level helpers it is built on.

The golden file holds what commit 7c31e11 (before the speed-up) produced; it is made by
tests/data/make_embedded_default_golden.py. No timings are asserted here: bench/embedded_default.py
measures them.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotators.base import Candidate, CaptionInput, RegionView
from annotators.caption import attributes
from annotators.segment import masks
from pipelines.config import RegionSettings
from pipelines.regions import select_regions

DATA = Path(__file__).parent / "data"


def _golden_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_embedded_default_golden",
                                                  DATA / "make_embedded_default_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOLDEN = _golden_module()
EXPECTED = json.loads((DATA / "embedded_default_golden.json").read_text())


def _compare(name: str, got: dict, want: dict) -> None:
    for key in sorted(set(got) | set(want)):
        if key == "regions":
            assert len(got["regions"]) == len(want["regions"]), name
            for ours, theirs in zip(got["regions"], want["regions"]):
                assert ours == theirs, (name, ours["id"])
        else:
            assert got.get(key) == want.get(key), (name, key)


@pytest.mark.parametrize("photo", GOLDEN.SAMPLE_PHOTOS)
def test_bundled_photo_gives_the_recorded_masks_and_texts(photo: str) -> None:
    if not os.path.exists(GOLDEN.sample_path(photo)):
        pytest.skip(f"scikit-image has no {photo}")
    _compare(photo, GOLDEN.sample_case(photo), EXPECTED[photo])


def test_given_masks_and_boxes_give_the_recorded_texts() -> None:
    _compare("synthetic", GOLDEN.synthetic_case(), EXPECTED["synthetic"])


# --------------------------------------------------------------------------- run-level helpers


def _random_labels(rng: np.random.Generator, height: int, width: int, k: int) -> np.ndarray:
    if rng.random() < 0.3:
        return rng.integers(0, k, (height, width)).astype(np.int32)
    blocks = rng.integers(0, k, (height // 4 + 1, width // 4 + 1))
    return np.kron(blocks, np.ones((4, 4), int))[:height, :width].astype(np.int32)


def test_encode_labels_is_encode_of_each_value() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        labels = _random_labels(rng, height, width, int(rng.integers(1, 7)))
        values, rles, areas = masks.encode_labels(labels)
        assert list(values) == list(np.unique(labels))
        for value, encoded, area in zip(values, rles, areas):
            assert encoded == masks.encode(labels == value) and area == (labels == value).sum()


def test_runs_crop_and_sums_agree_with_the_drawn_mask() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        drawn = [rng.random((height, width)) < rng.random() for _ in range(3)]
        drawn.append(np.zeros((height, width), bool))
        box = np.zeros((height, width), bool)
        box[height // 3: height // 2 + 1, : width // 2 + 1] = True   # runs that wrap columns
        drawn.append(box)
        rles = [masks.encode(m) for m in drawn]
        sums = masks.RunSums([image[..., 0], image[..., 1], image[..., 2]])
        for mask, encoded, (starts, ends) in zip(drawn, rles, masks.runs_many(rles)):
            assert masks.counts(encoded).sum() == height * width
            flat = mask.T.ravel()
            assert flat.sum() == (ends - starts).sum()
            assert all(flat[s:e].all() for s, e in zip(starts, ends))
            assert sums.over_runs(starts, ends) == list(image[mask].astype(np.int64).sum(axis=0))
            for margin in (0, 1):
                cut, (x0, y0) = masks.crop(encoded, margin)
                assert cut.sum() == mask.sum()
                assert (cut == mask[y0:y0 + cut.shape[0], x0:x0 + cut.shape[1]]).all()
        assert sums.total() == list(image.reshape(-1, 3).astype(np.int64).sum(axis=0))
        assert sums.over_box(1, 2, width // 2, height) == \
            list(image[2:height, 1:width // 2].reshape(-1, 3).astype(np.int64).sum(axis=0))


def test_uncompressed_counts_and_many_digit_counts() -> None:
    mask = np.zeros((700, 900), bool)
    mask[5:650, 17:800] = True
    mask[0, :] = True
    encoded = masks.encode(mask)
    plain = {"size": [700, 900], "counts": masks.counts(encoded).tolist()}
    assert masks.normalize(plain) == encoded
    (starts, ends), = masks.runs_many([plain])
    assert (ends - starts).sum() == mask.sum()


def test_colour_indices_are_colour_name() -> None:
    rng = np.random.default_rng(2)
    pixels = np.concatenate([rng.integers(0, 256, (3000, 3)), np.array(list(attributes.PALETTE.values())),
                             [[0, 0, 0], [255, 255, 255], [75, 75, 75]]]).astype(np.uint8)
    names = list(attributes.PALETTE)
    for rows in (pixels, pixels[:50].astype(np.float64) + 0.25):
        assert [names[i] for i in attributes.colour_indices(rows)] == [attributes.colour_name(p) for p in rows]


# --------------------------------------------------------------------------- edge cases


def _old_texture(pixels: np.ndarray, threshold: float) -> bool:
    """What the captioner computed before: numpy's std of the grey values of the pixels."""
    if len(pixels) == 0:
        pixels = np.zeros((1, 3))
    return float(pixels.mean(axis=1).std()) > threshold


def test_texture_matches_numpy_at_and_around_the_threshold() -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    image[:, 6:] = 56                       # grey 0 and 56 in equal parts: std exactly 28
    mask = np.ones((10, 12), bool)
    view = RegionView("p1", "pixel", None, [0.0, 0.0, 12.0, 10.0], 120.0, masks.encode(mask))
    sums = attributes._grey_sums(image)
    region = attributes._Region.of(image, view, sums)
    for threshold in (-1.0, 0.0, 27.0, 28.0, 28.0 + 1e-12, 29.0):
        assert region.textured(threshold) == _old_texture(image[mask], threshold), threshold
    empty = RegionView("p2", "pixel", None, [0.0, 0.0, 1.0, 1.0], 0.0, masks.encode(~mask))
    assert attributes._Region.of(image, empty, sums).textured(0.0) is False
    assert attributes._Region.of(image, empty, sums).sample().tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("bbox", [[2.0, 3.0, 5.0, 4.0], [0.0, 0.0, 0.4, 0.4], [7.5, 8.9, 100.0, 100.0],
                                  [-3.0, 2.0, 6.0, 3.0], [11.0, 9.0, 0.0, 0.0], [30.0, 30.0, 5.0, 5.0]])
def test_box_regions_use_the_same_pixels_as_before(bbox: list[float]) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (10, 12, 3)).astype(np.uint8)
    view = RegionView("r1", "region", None, bbox, bbox[2] * bbox[3], None)
    x, y, w, h = bbox
    before = image[int(y):int(y + h) or 1, int(x):int(x + w) or 1].reshape(-1, 3)
    region = attributes._Region.of(image, view, attributes._grey_sums(image))
    expected = before if len(before) else np.zeros((1, 3))
    assert region.pixels().tolist() == expected.tolist()
    assert region.sample().tolist() == expected[:: max(1, len(before) // 400)].tolist()
    assert region.textured(5.0) == _old_texture(before, 5.0)


def _reference_tree(cands: list[Candidate], settings: RegionSettings) -> list[tuple[int, int | None]]:
    """Dedup and parents the plain way (all pairwise IoUs and intersections), as (candidate,
    parent candidate) pairs; what lies deeper than ``max_depth`` is dropped."""
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].area, i))
    kept: list[int] = []
    for i in order:
        if not any(float(masks.iou([cands[i].rle], [cands[j].rle])[0, 0]) > settings.dedup_iou for j in kept):
            kept.append(i)
    nodes: list[tuple[int, int | None, int]] = []
    for i in sorted(sorted(kept), key=lambda i: (-cands[i].area, cands[i].bbox, i)):
        parent, depth = None, 0
        for j, _, parent_depth in reversed(nodes):
            if cands[j].area > cands[i].area and masks.intersection_area(cands[i].rle, cands[j].rle) / \
                    max(cands[i].area, 1.0) >= settings.contain_frac:
                parent, depth = j, parent_depth + 1
                break
        if depth < settings.max_depth:
            nodes.append((i, parent, depth))
    return [(i, parent) for i, parent, _ in nodes]


@pytest.mark.parametrize("block", [512, 7])
def test_region_selection_matches_plain_pairwise_checks(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import regions

    monkeypatch.setattr(regions, "_BLOCK", block)   # pairwise bounds are built in row blocks
    rng = np.random.default_rng(4)
    height, width = 60, 80
    yy, xx = np.mgrid[0:height, 0:width]
    settings = RegionSettings(min_area_frac=0.0, max_area_frac=1.0, max_total=1000, max_regions=1000,
                              box_regions=False, contain_frac=0.8, dedup_iou=0.85)
    for trial in range(8):
        cands: list[Candidate] = []
        for _ in range(25):
            cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(3, 30)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            if rng.random() < 0.3 and cands:                      # near-duplicates and parts
                mask = masks.decode(cands[-1].rle) & (rng.random((height, width)) < 0.97)
            encoded = masks.encode(mask)
            if mask.any() and all(c.rle != encoded for c in cands):
                loose = [max(0.0, cx - 40.0), 0.0, 80.0, 60.0]    # a given box need not be tight
                cands.append(Candidate(masks.bbox(encoded) if trial % 2 else loose,
                                       float(mask.sum()), encoded, {}, "test"))
        views, _ = select_regions(cands, np.zeros((height, width, 3), np.uint8), settings)
        by_rle = {json.dumps(c.rle): i for i, c in enumerate(cands)}
        ids = {v.id: by_rle[json.dumps(v.rle)] for v in views}
        ours = sorted((ids[v.id], ids[v.parent] if v.parent else None) for v in views)
        assert ours == sorted(_reference_tree(cands, settings)), trial


def test_mask_of_another_size_is_an_error() -> None:
    view = RegionView("p1", "pixel", None, [0.0, 0.0, 2.0, 2.0], 4.0, masks.encode(np.ones((4, 4), bool)))
    image = np.zeros((5, 5, 3), np.uint8)
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="PNG")
    with pytest.raises(ValueError, match="mask size"):
        attributes.AttributesCaptioner().caption_batch([CaptionInput("k", 5, 5, data.getvalue(), [view])])
    with pytest.raises(ValueError, match="mask size"):
        select_regions([Candidate([0.0, 0.0, 4.0, 4.0], 16.0, view.rle)], image,
                       RegionSettings(min_area_frac=0.0))


# --------------------------------------------------------------------------- benchmark


def test_bench_smoke_report(tmp_path: Path) -> None:
    from bench import embedded_default

    path = tmp_path / "bench.json"
    assert embedded_default.main(["--smoke", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["benchmark"] == "embedded_default" and report["repeat"] == 1
    assert report["target"]["min_speedup"] == 5.0 and "baseline" not in report
    (image,) = report["images"]
    assert image["key"] == "coins" and image["regions"] > 0 and image["candidates"] >= image["regions"]
    stages = ("segment_s", "select_s", "caption_s")
    assert all(image[s] > 0 for s in stages)
    assert image["total_s"] == pytest.approx(sum(image[s] for s in stages))
    assert report["mean"]["total_s"] == pytest.approx(image["total_s"])


def test_batch_helpers_take_hundreds_of_masks() -> None:
    """pycocotools' area() of a list overflows at 256 masks (its uint8 index); the batch helpers
    must not, or an image with that many candidate masks fails in select_regions."""
    image = np.zeros((40, 60), bool)
    rles = []
    for i in range(300):
        mask = image.copy()
        mask[i % 40, (i // 40) % 60: (i // 40) % 60 + 1 + i % 5] = True
        rles.append(masks.encode(mask))
    assert masks.areas(rles) == [masks.area(r) for r in rles]
    assert masks.bboxes(rles) == [masks.bbox(r) for r in rles]
