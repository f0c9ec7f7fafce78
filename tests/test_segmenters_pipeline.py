"""The segmenters inside the real pipeline: tiny SAM (auto and box-prompted) and imported masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from annotators.segment import masks
from pipelines import validate
from pipelines.synthetic import scene
from schemas import region_provenance
from tests.conftest import build, records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_tiny_sam_config_builds_and_validates(tmp_path: Path) -> None:
    pytest.importorskip("segment_anything")
    config = yaml.safe_load((REPO / "configs/tiny-sam.yaml").read_text())
    out, manifest = build(tmp_path, "synthetic://6", config=config)
    assert validate.validate(str(out)).ok
    counts = manifest["counts"]
    assert counts["inputs"] == 6 == counts["written"]
    seg = manifest["annotators"]["segmenter"]
    assert seg["name"] == "sam-auto" and seg["model_type"] == "tiny"
    assert seg["weights"] == "random-init seed 0" and seg["segment_anything_version"]
    got = records(out)
    with_masks = [r for r in got.values() if any(g["level"] == "pixel" for g in r["regions"])]
    assert with_masks, "SAM gave no mask on any image: the checks below would check nothing"
    assert counts["images_without_masks"] == 6 - len(with_masks)
    for record in with_masks:
        for region in record["regions"]:
            assert region_provenance(record, region)["segmenter"]["name"] == "sam-auto"
            if region["level"] == "pixel":
                assert {"predicted_iou", "stability"} <= set(region["scores"])


def _write_scene(root: Path, index: int) -> tuple[str, list[dict]]:
    image, objects = scene(21, index, 128)
    path = root / f"img{index}.png"
    image.save(path)
    return path.name, objects


def test_sam_boxes_from_a_manifest(tmp_path: Path) -> None:
    pytest.importorskip("segment_anything")
    root = tmp_path / "in"
    root.mkdir()
    rows = []
    for index in range(3):
        name, objects = _write_scene(root, index)
        rows.append({"path": name, "boxes": [o["bbox"] for o in objects]})
    rows.append({"path": "img_without_boxes.png"})
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "img_without_boxes.png")
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {"segmenter": {"name": "sam-boxes", "model_type": "tiny", "device": "cpu"},
              "regions": {"min_area_frac": 0.0, "dedup_iou": 1.0}}
    out, manifest = build(tmp_path, str(root / "manifest.jsonl"), config=config)
    assert validate.validate(str(out)).ok
    assert manifest["counts"]["written"] == 4
    got = records(out)
    kept = 0
    for row in rows[:3]:
        record = got[row["path"].removesuffix(".png")]
        by_id = {r["id"]: r for r in record["regions"]}
        boxes = [int(r["scores"]["given_box"]) for r in record["regions"] if r["level"] == "region"]
        pixels = [r for r in record["regions"] if r["level"] == "pixel"]
        assert len(boxes) == len(set(boxes)) and set(boxes) <= set(range(len(row["boxes"])))
        for pixel in pixels:   # SAM's mask under the given box it was prompted with
            parent = by_id[pixel["parent"]]
            assert parent["level"] == "region" and parent["scores"]["given_box"] == pixel["scores"]["given_box"]
        kept += len(boxes) + len(pixels)
    assert got["img_without_boxes"]["regions"] == []
    dropped = dict(manifest["counts"]["regions_dropped_by_reason"])
    assert dropped.pop("no_boxes") == 1
    # per given box a region and a SAM mask: each is in the record, or counted where dropped
    assert kept + sum(dropped.values()) == 2 * sum(len(r["boxes"]) for r in rows[:3])


def test_given_sa1b_and_coco_imports(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    name0, objects0 = _write_scene(root, 0)
    name1, objects1 = _write_scene(root, 1)
    sa1b = {"image": {"width": 128, "height": 128},
            "annotations": [{"segmentation": o["mask"], "bbox": o["bbox"], "area": o["area"],
                             "predicted_iou": 0.9, "stability_score": 0.95} for o in objects0]}
    (root / "img0.json").write_text(json.dumps(sa1b))
    coco = {"images": [{"id": 7, "width": 128, "height": 128, "file_name": name1}],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other thing"}],
            "annotations": [{"id": i, "image_id": 7, "bbox": o["bbox"], "area": o["area"], "iscrowd": 0,
                             "category_id": 1 + i % 2,
                             "segmentation": [[o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2], o["bbox"][1],
                                               o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3],
                                               o["bbox"][0], o["bbox"][1] + o["bbox"][3]]]}
                            for i, o in enumerate(objects1)]}
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "m.jsonl").write_text(json.dumps({"path": name0, "sa1b": "img0.json"}) + "\n"
                                  + json.dumps({"path": name1, "coco": "coco.json", "image_id": 7}) + "\n")
    config = {"segmenter": {"name": "given"}, "regions": {"min_area_frac": 0.0, "dedup_iou": 1.0}}
    out, manifest = build(tmp_path, str(root / "m.jsonl"), config=config)
    assert validate.validate(str(out)).ok
    got = records(out)
    sa1b_masks = sorted(g["mask"]["counts"] for g in got["img0"]["regions"] if g["level"] == "pixel")
    assert sa1b_masks == sorted(o["mask"]["counts"] for o in objects0)
    assert all(g["scores"]["predicted_iou"] == 0.9 for g in got["img0"]["regions"] if g["level"] == "pixel")
    coco_boxes = sorted(tuple(g["bbox"]) for g in got["img1"]["regions"] if g["level"] == "pixel")
    assert coco_boxes == sorted(tuple(masks.bbox(masks.from_polygons(a["segmentation"], 128, 128)))
                                for a in coco["annotations"])
    # COCO category names are kept as the masks' labels (GRIT phrases and manifest labels too)
    names = {tuple(masks.bbox(masks.from_polygons(a["segmentation"], 128, 128))):
             coco["categories"][a["category_id"] - 1]["name"] for a in coco["annotations"]}
    for g in got["img1"]["regions"]:
        if g["level"] == "pixel":
            assert g["given"] == {"label": names[tuple(g["bbox"])]}
    regions = pq.read_table(out / "index" / "regions")
    assert regions.num_rows == sum(len(r["regions"]) for r in got.values())
    assert {r["label"] for r in regions.to_pylist() if r["key"] == "img1"} >= {"thing", "other thing"}
