"""Scoring annotators against synthetic ground truth (pipelines/eval_annotators.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from annotators.base import RegionView
from pipelines import eval_annotators as ev
from pipelines.config import config_from_dict
from pipelines.synthetic import scene, scene_png

GIVEN = {"segmenter": {"name": "given"}}


def _evaluate(config: dict[str, Any], n: int, hard: bool = False) -> dict[str, Any]:
    return ev.evaluate(config_from_dict(config), n, hard=hard)


def _scored_objects(n: int) -> list[dict[str, Any]]:
    """Ground truth objects of scenes 0..n-1 (seed 0, 256 px) large enough to be scored, each
    with the colours of its parts, read from the generator directly."""
    out = []
    for index in range(n):
        _, objects = scene_png(0, index)
        for obj in objects:
            if obj["area"] >= 0.002 * 256 * 256:
                parts = {o["colour"] for o in objects if o["parent"] == obj["id"]}
                out.append({**obj, "colours": {obj["colour"]} | parts})
    return out


def test_default_scenes_are_unchanged() -> None:
    """The default generator's pixels and ground truth, pinned (byte-identity of synthetic://N)."""
    digest = hashlib.sha256()
    for index in range(4):
        image, objects = scene(0, index, 96)
        digest.update(np.asarray(image).tobytes())
        digest.update(json.dumps(objects, sort_keys=True).encode())
    assert digest.hexdigest() == "49afdac2c765eb6630bb932cb1dd34222c3af8017addb2565675c613e83e312b"


def test_hard_scenes_are_deterministic_nested_and_new() -> None:
    first, again = scene_png(0, 5, 128, hard=True), scene_png(0, 5, 128, hard=True)
    assert first == again and first[0] != scene_png(0, 5, 128)[0]
    objects = [o for i in range(12) for o in scene(0, i, 128, hard=True)[1]]
    assert objects and all("texture" in o for o in objects)
    assert any(o["background"].startswith("photo:") for o in objects)
    assert any(o["background"] in ("grey", "beige", "navy", "olive") for o in objects)
    # subparts: a part whose whole is itself a part
    for index in range(12):
        truth = {o["id"]: o for o in scene(0, index, 128, hard=True)[1]}
        if any(o["parent"] and truth.get(o["parent"], {}).get("parent") for o in truth.values()):
            break
    else:
        pytest.fail("no scene with a part two deep")


def test_words_are_read_as_classes() -> None:
    assert ev.words("a dark red round region at the top left", "colour") == {"red"}
    assert ev.words("a Navy-blue disc beside a greyish oval", "colour") == {"blue", "grey"}
    assert ev.words("a very large, squarish triangle; a tiny dot", "size") == {"very large", "tiny"}
    assert ev.words("a very large, square triangle; a tiny dot", "shape") == {"rectangle", "triangle", "circle"}
    assert ev.words("in the upper-left corner, to its right", "position") == {"top left", "right"}
    assert ev.words("at the bottom center", "position") == {"bottom"}
    assert ev.words("reddened, tangent, largest", "colour") | ev.words("largest", "size") == set()


def test_matching_is_one_to_one_and_ignores_tiny_objects() -> None:
    iou = np.array([[0.9, 0.6, 0.0],    # prediction 0: best on object 0
                    [0.8, 0.0, 0.0],    # prediction 1: object 0 is taken → unmatched
                    [0.0, 0.0, 0.7]])   # prediction 2: an ignored object → out of precision
    matched, left_out = ev.match(iou, np.array([False, False, True]), 0.5)
    assert matched == {0: 0} and left_out == {2}


def test_perfect_segmenter_scores_one() -> None:
    for hard in (False, True):
        result = _evaluate(GIVEN, 12 if not hard else 8, hard)
        masks, tree = result["masks"], result["hierarchy"]
        assert result["objects"]["scored"] > 20 and masks["predicted"] == result["objects"]["scored"]
        for threshold in ev.THRESHOLDS:
            assert masks["all"][f"recall@{threshold}"] == 1.0 and masks["all"][f"precision@{threshold}"] == 1.0
        assert masks["all"]["mean_best_iou"] == 1.0 and masks["on_background"] == 0.0
        assert all(row["mean_best_iou"] == 1.0 for row in masks["by_size"].values() if row["objects"])
        assert tree["parts"] > 3 and tree["under_whole"] == tree["direct"] == 1.0
        assert tree["under_whole_of_all_parts"] == 1.0 and tree["wrong_ancestor"] == 0.0


def test_bad_segmenters_score_low() -> None:
    shifted = _evaluate({"segmenter": {"name": "tests.plugins.scoring:ShiftedTruthSegmenter"}}, 12)
    masks = shifted["masks"]
    assert masks["predicted"] > 20
    assert masks["all"]["recall@0.5"] < 0.25 and masks["all"]["precision@0.5"] < 0.25
    assert masks["all"]["recall@0.75"] < 0.1 and masks["all"]["mean_best_iou"] < 0.4
    assert shifted["texts"]["matched_objects"] < 0.25 * shifted["objects"]["scored"]
    half = _evaluate({"segmenter": {"name": "tests.plugins.scoring:HalfTruthSegmenter"}}, 12)["masks"]["all"]
    assert half["precision@0.5"] == half["precision@0.75"] == 1.0   # all it gives is right
    assert 0.4 < half["recall@0.5"] < 0.75 and 0.4 < half["mean_best_iou"] < 0.8
    whole = _evaluate({"segmenter": {"name": "tests.plugins.scoring:WholeImageSegmenter"}}, 6)
    assert whole["masks"]["predicted"] == 0 and whole["masks"]["all"]["recall@0.5"] == 0.0
    assert whole["masks"]["all"]["precision@0.5"] is None and whole["masks"]["all"]["mean_best_iou"] == 0.0


def test_failing_stages_are_counted_and_their_objects_missed() -> None:
    result = _evaluate({"segmenter": {"name": "tests.plugins.scoring:RaisingSegmenter"}}, 4)
    assert result["images"]["failed"] == {"segment": 4, "select_regions": 0, "render_prompts": 0, "caption": 0}
    assert "RuntimeError: no masks today" in result["images"]["failure_examples"][0]
    assert result["masks"]["all"]["recall@0.5"] == 0.0 and result["objects"]["scored"] > 8
    assert "FAILED scenes: segment 4" in ev.table({**result, "config_name": "x"})


def test_parts_outside_their_wholes_are_counted() -> None:
    """Wholes segmented without their parts: both still match, but no part sits under its whole."""
    tree = _evaluate({"segmenter": {"name": "tests.plugins.scoring:RingsSegmenter"}}, 12)["hierarchy"]
    assert tree["pairs_matched"] > 3 and tree["under_whole"] == tree["direct"] == 0.0
    flat = _evaluate({**GIVEN, "regions": {"max_depth": 1}}, 12)["hierarchy"]   # parts dropped
    assert flat["parts"] > 3 and flat["pairs_matched"] == 0 and flat["under_whole_of_all_parts"] == 0.0


def _truth(gid: str, parent: str | None) -> ev.Truth:
    return ev.Truth(gid, parent, {}, 0.1, False, "red", "top", {"small"}, {"circle"}, {"red"}, {"circle"})


def _view(rid: str, level: str, parent: str | None) -> RegionView:
    return RegionView(rid, level, parent, [0, 0, 1, 1], 1.0, {} if level == "pixel" else None)


def test_hierarchy_walks_pixel_ancestors() -> None:
    """Part P of whole W lies under W's region through a box region (still its nearest pixel-level
    ancestor); part Q of W lies under W's region through an unmatched region (under it, not
    directly); whole V lies under P's region: a wrong ancestor."""
    truth = [_truth("W", None), _truth("P", "W"), _truth("V", None), _truth("Q", "W")]
    views = [_view("r1", "region", None), _view("p1", "pixel", "r1"), _view("r2", "region", "p1"),
             _view("p2", "pixel", "r2"), _view("p3", "pixel", "p2"), _view("p4", "pixel", "p1"),
             _view("p5", "pixel", "p4")]
    by_id = {v.id: v for v in views}
    tally = ev.Tally()
    matched = {"W": by_id["p1"], "P": by_id["p2"], "V": by_id["p3"], "Q": by_id["p5"]}
    ev._score_hierarchy(truth, matched, views, tally)
    assert tally.n == {"hierarchy.parts": 2, "hierarchy.matched_objects": 4, "hierarchy.pairs_matched": 2,
                       "hierarchy.under_whole": 2, "hierarchy.direct": 1, "hierarchy.wrong_ancestor": 1}


def test_attributes_names_colours_right_on_easy_scenes() -> None:
    """With perfect masks the measured colour is the painted one for (nearly) every object; the
    region's own words are never absent from it (its parts' colours count as present)."""
    regions = _evaluate(GIVEN, 12)["texts"]["regions"]
    for field in ("caption", "tags"):
        assert regions[field]["colour"]["right"] >= 0.9, regions[field]
        assert regions[field]["absent"]["colour"]["texts"] <= 0.05
    assert regions["caption"]["position"]["right"] >= 0.9 and regions["caption"]["size"]["right"] >= 0.9


def test_a_planted_wrong_colour_counts_as_absent() -> None:
    result = _evaluate({**GIVEN, "captioner": {"name": "tests.plugins.scoring:PurpleCaptioner"}}, 12)
    objects = _scored_objects(12)
    not_purple = sum("purple" not in o["colours"] for o in objects) / len(objects)
    painted_purple = sum(o["colour"] == "purple" for o in objects) / len(objects)
    assert 0 < painted_purple < 0.5 < not_purple < 1
    caption = result["texts"]["regions"]["caption"]
    assert result["texts"]["with_text"] == len(objects)
    assert caption["absent"]["colour"]["texts"] == pytest.approx(not_purple, abs=1e-4)
    assert caption["absent"]["colour"]["words"] == pytest.approx(not_purple, abs=1e-4)
    assert caption["colour"]["right"] == pytest.approx(painted_purple, abs=1e-4)
    scenes_without = sum(all(o["colour"] != "purple" for o in scene_png(0, i)[1]) for i in range(12))
    assert result["texts"]["image"]["caption"]["absent_in_scene"]["colour"]["texts"] == \
        pytest.approx(scenes_without / 12, abs=1e-4)


def test_captioners_get_the_visual_prompts_they_ask_for() -> None:
    texts = _evaluate({**GIVEN, "captioner": {"name": "tests.plugins.scoring:PromptedPurpleCaptioner"}}, 3)["texts"]
    assert texts["region_failures"] == 0 and texts["with_text"] == texts["matched_objects"] > 5


def _paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_paths(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in value.items()))
    return {prefix}


def test_cli_writes_the_report_for_the_embedded_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"segmenter": {"name": "classical", "work_side": 128}}))
    out = tmp_path / "report.json"
    assert ev.main(["--config", str(config), "--n", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "R@0.5" in printed and "hierarchy" in printed and str(out) in printed
    paths = _paths(report)
    expected = {"config", "config_name", "segmenter.name", "captioner.name", "regions.min_area_frac",
                "scenes.n", "scenes.hard", "images.scored", "images.candidates", "images.failure_examples",
                "objects.total",
                "objects.ignored", "objects.scored", "masks.predicted", "masks.on_background",
                "hierarchy.parts", "hierarchy.under_whole", "hierarchy.direct",
                "hierarchy.under_whole_of_all_parts", "hierarchy.wrong_ancestor",
                "texts.matched_objects", "texts.with_text", "seconds.total"}
    for threshold in ev.THRESHOLDS:
        expected |= {f"masks.all.recall@{threshold}", f"masks.all.precision@{threshold}"}
        expected |= {f"masks.by_size.{name}.recall@{threshold}" for name, _, _ in ev.SIZE_BUCKETS}
    expected |= {f"masks.by_size.{name}.mean_best_iou" for name, _, _ in ev.SIZE_BUCKETS}
    for field in ev.TEXT_FIELDS:
        expected |= {f"texts.regions.{field}.{a}.{k}" for a in ev.ATTRIBUTES for k in ("mentioned", "right")}
        expected |= {f"texts.regions.{field}.{kind}.{a}.{k}" for kind in ("absent", "absent_in_scene")
                     for a in ev.CHECKED for k in ("texts", "words", "evaluated")}
        expected |= {f"texts.image.{field}.absent_in_scene.{a}.texts" for a in ev.CHECKED}
    expected |= {f"definitions.{name}" for name in ev.DEFINITIONS}
    expected |= {f"images.failed.{stage}" for stage in ev.STAGES}
    assert expected <= paths, sorted(expected - paths)
    assert report["config_name"] == "mine" and report["scenes"] == {"n": 4, "seed": 0, "size": 256, "hard": False}
    assert report["images"]["scored"] == 4 and report["objects"]["scored"] > 8
    assert report["masks"]["all"]["recall@0.5"] >= 0.8   # flat shapes: the classical segmenter finds them
    assert report["texts"]["regions"]["caption"]["colour"]["right"] >= 0.8


def test_cli_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("segmenter: {name: no-such-segmenter}\n")
    assert ev.main(["--config", str(config), "--n", "1", "--json", str(tmp_path / "r.json")]) == 2
    assert "no-such-segmenter" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
