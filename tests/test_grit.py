"""GRIT / LongGRIT-style inputs: given boxes with referring phrases and an image caption.

The given box (mapped to the stored image) is the record's region-level region with its phrase,
SAM's mask for it a pixel-level child; the phrase and the caption are kept in the record and the
index, and caption programs can use them (``{label}``, ``{given_caption}``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import validate
from tests.conftest import build, records
from tests.fault_server import FaultConfig, serve_faults

pytestmark = pytest.mark.slow

PROGRAM = """
id: grit-test
version: "1"
system: Describe regions.
visual_prompts:
  region: [{name: box, kind: box}]
  pixel: [{name: box, kind: box}]
steps:
  image:
    - name: caption
      prompt: "The image was described as '{given_caption}'. Describe it."
      images: [image]
  region:
    - name: caption
      prompt: "Describe the region labelled '{label}' at {bbox}."
      images: [image, box]
  pixel:
    - name: caption
      prompt: "Describe the object '{label}'."
      images: [image, box]
"""


def _inputs(root: Path) -> Path:
    """Two 2048×1536 photos (stored at 1024×768) with phrases for their boxes, as GRIT has."""
    root.mkdir()
    rows = []
    for i in range(2):
        rgb = np.full((1536, 2048, 3), 90 + 20 * i, np.uint8)
        rgb[400:800, 1000:1600] = (200, 60, 40)                  # a red block
        rgb[1000:1400, 200:700] = (40, 160, 60)                 # a green block
        Image.fromarray(rgb).save(root / f"g{i}.jpg", quality=92)
        rows.append({"key": f"g{i}", "path": f"g{i}.jpg", "caption": f"two blocks, photo {i}",
                     "boxes": [[1000, 400, 600, 400], [200, 1000, 500, 400]],
                     "labels": ["a red block", None]})
    manifest = root / "grit.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_given_phrases_become_region_level_regions_with_sam_masks_under_them(tmp_path: Path) -> None:
    manifest = _inputs(tmp_path / "in")
    program = tmp_path / "grit-test.yaml"
    program.write_text(PROGRAM)
    with serve_faults(FaultConfig(latency_s=0.001, fault_rate=0.0)) as server:
        config = {"segmenter": {"name": "sam-boxes", "model_type": "tiny", "device": "cpu"},
                  "regions": {"min_area_frac": 0.0},
                  "captioner": {"name": "vllm", "model": "fake-vlm", "program": str(program),
                                "endpoints": [server.base_url]}}
        out, manifest_out = build(tmp_path, str(manifest), config=config)
        prompts = [m["content"] if isinstance(m["content"], str) else
                   " ".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
                   for r in server.requests for m in r.body["messages"] if m["role"] == "user"]
    assert validate.validate(str(out)).ok and manifest_out["counts"]["written"] == 2
    for key, record in records(out).items():
        assert record["image_level"]["given"] == {"caption": f"two blocks, photo {key[1]}"}
        given = [r for r in record["regions"] if r["level"] == "region"]
        # the given boxes, mapped from 2048×1536 to the stored 1024×768, are the region level
        assert [r["bbox"] for r in given] == [[500.0, 200.0, 300.0, 200.0], [100.0, 500.0, 250.0, 200.0]]
        assert [r.get("given") for r in given] == [{"label": "a red block"}, None]
        assert all(r["scores"]["given_box"] == i for i, r in enumerate(given))
        for pixel in (r for r in record["regions"] if r["level"] == "pixel"):
            parent = next(r for r in given if r["id"] == pixel["parent"])
            assert pixel["scores"]["given_box"] == parent["scores"]["given_box"]
            assert pixel.get("given") == parent.get("given")
    labels = {(row["key"], row["region_id"]): row["label"]
              for row in pq.read_table(out / "index" / "regions").to_pylist()}
    assert sorted(v for v in labels.values() if v) .count("a red block") >= 2
    # the phrase and the caption reach the prompts
    assert any("Describe the region labelled 'a red block' at [500, 200, 300, 200]." in p for p in prompts)
    assert any("The image was described as 'two blocks, photo 1'." in p for p in prompts)
    assert any("Describe the region labelled '' at [100, 500, 250, 200]." in p for p in prompts)


def test_label_lists_must_match_their_boxes(tmp_path: Path) -> None:
    from pipelines.sources import list_inputs

    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "m.jsonl"
    rows = [{"key": "short", "path": "a.png", "boxes": [[0, 0, 5, 5], [1, 1, 2, 2]], "labels": ["one"]},
            {"key": "typed", "path": "a.png", "boxes": [[0, 0, 5, 5]], "labels": [3]},
            {"key": "long", "path": "a.png", "caption": "x" * 20_000},
            {"key": "fine", "path": "a.png", "boxes": [[0, 0, 5, 5]], "labels": ["  a  dog "], "caption": "c"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = {r.key: r for r in list_inputs(str(manifest))}
    for key, text in (("short", "'labels' has 1 entries for 2 boxes"), ("typed", "list of strings"),
                      ("long", "'caption' is longer than")):
        assert refs[key].loader["reason"] == "bad_manifest_row" and text in refs[key].loader["detail"]
    assert refs["fine"].given == {"boxes": [[0, 0, 5, 5]], "labels": ["a dog"], "caption": "c"}
