"""Weight-free annotators, the registry and config validation."""
from __future__ import annotations

import io

import numpy as np
import pytest

from annotators.base import Candidate, CaptionInput, SegmentInput
from annotators.caption.attributes import AttributesCaptioner, colour_name, position_name, size_name
from annotators.registry import build_captioner, build_segmenter
from annotators.segment import masks
from annotators.segment.classical import ClassicalSegmenter
from annotators.segment.given import GivenSegmenter
from pipelines.config import RegionSettings, config_from_dict, load_config
from pipelines.regions import select_regions
from pipelines.synthetic import COLOURS, scene
from settings import ConfigError


def test_classical_levels_nest_exactly() -> None:
    rgb = np.asarray(scene(3, 1, 128)[0])
    out = ClassicalSegmenter({"work_side": 128}).segment_batch([SegmentInput("k", rgb)])[0]
    by_level: dict[int, list[np.ndarray]] = {}
    for c in out.candidates:
        by_level.setdefault(int(c.source[-1]), []).append(masks.decode(c.rle))
        assert masks.bbox(c.rle) == c.bbox and masks.area(c.rle) == c.area
    assert set(by_level) == {0, 1, 2}
    for level in (1, 2):   # every finer segment lies inside exactly one coarser segment
        for m in by_level[level]:
            assert sum(bool((m & ~p).sum() == 0) for p in by_level[level - 1]) == 1
    coverage = sum(m.astype(int) for m in by_level[0])
    assert (coverage == 1).all()


def test_classical_recovers_synthetic_objects() -> None:
    image, objects = scene(5, 2, 128)
    rgb = np.asarray(image)
    out = ClassicalSegmenter({"work_side": 128}).segment_batch([SegmentInput("k", rgb)])[0]
    cands = [masks.decode(c.rle) for c in out.candidates]
    for obj in objects:
        truth = masks.decode(obj["mask"])
        best = max((m & truth).sum() / (m | truth).sum() for m in cands)
        assert best > 0.5, obj["shape"]


def test_attributes_names_known_colours_and_positions() -> None:
    image, objects = scene(7, 4, 160)
    data = io.BytesIO()
    image.save(data, format="PNG")
    views, _ = select_regions(
        [Candidate(o["bbox"], o["area"], o["mask"])
         for o in objects], np.asarray(image), RegionSettings(min_area_frac=0.0))
    result = AttributesCaptioner().caption_batch([CaptionInput("k", 160, 160, data.getvalue(), views)])[0]
    assert not result.failures and set(result.regions) == {v.id for v in views}
    for obj in objects:
        view = next(v for v in views if v.rle and v.rle["counts"] == obj["mask"]["counts"])
        text = result.regions[view.id]
        if obj["parent"] is None and not any(o["parent"] == obj["id"] for o in objects):
            assert obj["colour"] in text.tags, (obj, text.caption)
        assert text.caption and len(text.long_caption) > len(text.caption)
    assert result.image_level.caption and result.image_level.tags


def test_attribute_helpers() -> None:
    for name, rgb in COLOURS.items():
        assert colour_name(rgb) == name
    assert position_name(5, 5, 90, 90) == "top left" and position_name(45, 80, 90, 90) == "bottom"
    assert size_name(0.005) == "tiny" and size_name(0.7) == "very large"


def test_given_rescales_to_the_stored_image() -> None:
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:50] = True
    seg = GivenSegmenter()
    rgb = np.zeros((20, 30, 3), np.uint8)   # stored at half size
    out = seg.segment_batch([SegmentInput("k", rgb, {"masks": [masks.encode(mask)], "boxes": [[30, 10, 20, 10]],
                                                     "original_size": (40, 60)})])[0]
    mask_c, box_c = out.candidates
    assert mask_c.rle["size"] == [20, 30] and mask_c.bbox == [15.0, 5.0, 10.0, 5.0]
    assert box_c.rle is None and box_c.bbox == [15.0, 5.0, 10.0, 5.0]


def test_given_many_masks_keep_each_masks_area_and_box() -> None:
    """300 masks of one image (pycocotools counts a list's areas in a uint8): each candidate's
    area and box are its own stored mask's."""
    rng = np.random.default_rng(3)
    given = []
    for i in range(300):
        mask = np.zeros((40, 60), bool)
        y, x = rng.integers(0, 36), rng.integers(0, 56)
        mask[y:y + 1 + i % 4, x:x + 1 + i % 5] = True
        given.append(masks.encode(mask))
    rgb = np.zeros((20, 30, 3), np.uint8)
    out = GivenSegmenter({"boxes_from_masks": False}).segment_batch(
        [SegmentInput("k", rgb, {"masks": given, "original_size": (40, 60)})])[0]
    kept = [c for c in out.candidates if c.rle is not None]
    assert len(kept) + out.dropped.get("empty_mask", 0) == 300 and len(kept) > 200
    assert [c.area for c in kept] == [float(masks.area(c.rle)) for c in kept]
    assert [c.bbox for c in kept] == [masks.bbox(c.rle) for c in kept]


def _drawn_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference: draw the mask and resize it with Pillow's NEAREST."""
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


@pytest.mark.parametrize("source, target", [((960, 1280), (768, 1024)), ((2048, 1536), (1024, 768)),
                                            ((40, 60), (20, 30)), ((37, 53), (100, 71)), ((300, 200), (7, 5)),
                                            ((64, 64), (64, 50))])
def test_given_masks_are_rescaled_on_their_runs_like_a_drawn_resize(source, target) -> None:
    from annotators.segment.frame import rescale_mask as _rescale_mask

    rng = np.random.default_rng(sum(source) + sum(target))
    h, w = source
    yy, xx = np.mgrid[0:h, 0:w]
    shapes = [np.zeros((h, w), bool), np.ones((h, w), bool),            # empty, full frame
              (yy < h // 3),                                              # runs that wrap columns
              ((xx - w / 2) ** 2 / (w / 3) ** 2 + (yy - h / 2) ** 2 / (h / 4) ** 2) <= 1]
    shapes += [rng.random((h, w)) < 0.3 for _ in range(2)]                  # noise: many short runs
    for mask in shapes:
        got = masks.decode(_rescale_mask(masks.encode(mask), *target))
        np.testing.assert_array_equal(got, _drawn_resize(mask, *target))
    # all of them at once, with masks already at the target size and of another size mixed in
    # (runs of neighbouring masks must not join, each keeps its own frame)
    from annotators.segment.frame import rescale_masks

    other = rng.random((h + 3, w + 1)) < 0.5
    mixed = shapes + [np.ones(target, bool), other, shapes[1]]
    got = rescale_masks([masks.encode(m) for m in mixed], *target)
    assert len(got) == len(mixed)
    for mask, out in zip(mixed, got, strict=True):
        np.testing.assert_array_equal(masks.decode(out), _drawn_resize(mask, *target))


def test_registry_and_settings_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="segmenter.name: unknown segmenter 'foo'; use one of"):
        build_segmenter({"name": "foo"})
    with pytest.raises(ConfigError, match="captioner.max_neighbour: unknown setting; did you mean 'max_neighbours'"):
        build_captioner({"name": "attributes", "max_neighbour": 1})
    with pytest.raises(ConfigError, match="segmenter.work_side: expected int, got 'big'"):
        build_segmenter({"name": "classical", "work_side": "big"})
    with pytest.raises(ConfigError, match="segmenter.work_side: must be in 32..2048"):
        build_segmenter({"name": "classical", "work_side": 4})
    with pytest.raises(ConfigError, match="shard: unknown config section; did you mean 'shards'"):
        config_from_dict({"shard": {}})
    with pytest.raises(ConfigError, match="regions.max_depth: must be 1, 2 or 3"):
        config_from_dict({"regions": {"max_depth": 7}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    assert load_config(None).segmenter == {"name": "classical"}


def test_default_yaml_is_the_embedded_default() -> None:
    assert load_config("configs/default.yaml").settings_hash() == load_config(None).settings_hash()


def test_classical_merging_matches_skimage_rag() -> None:
    from skimage import graph, segmentation

    from annotators.segment.classical import _adjacency, _merge_below

    image = np.asarray(scene(9, 3, 96)[0]).copy()
    image += np.random.default_rng(0).integers(0, 40, image.shape, dtype=np.uint8)
    fine = segmentation.felzenszwalb(image, scale=50, min_size=5)
    pairs, weights = _adjacency(image, fine)
    for threshold in (10.0, 30.0, 60.0):
        ours = _merge_below(fine, pairs, weights, threshold)
        theirs = graph.cut_threshold(fine, graph.rag_mean_color(image, fine), threshold, in_place=False)
        # the same partition, up to the names of the labels
        assert len(set(zip(ours.ravel(), theirs.ravel()))) == len(np.unique(ours)) == len(np.unique(theirs))


def test_given_masks_with_counts_past_their_frame_are_refused_not_resized() -> None:
    """A given mask whose counts run past its ``size`` (or a negative count) is bad input: the
    resize refuses it instead of spilling its pixels into the next mask of the image."""
    from annotators.segment.frame import rescale_masks

    good = {"size": [2, 2], "counts": [0, 1, 3]}
    # [5, 1]: 6 pixels in a frame of 4; "1O4": the counts 1, -1, 4 (COCO's string form)
    for bad in ({"size": [2, 2], "counts": [5, 1]}, {"size": [2, 2], "counts": "1O4"}):
        with pytest.raises(ValueError, match="counts"):
            rescale_masks([bad, good], 4, 4)
    assert masks.decode(rescale_masks([good], 4, 4)[0]).sum() == 4
