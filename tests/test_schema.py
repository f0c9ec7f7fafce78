"""The schema definition: generated doc is current, validation names field paths."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from annotators.segment import masks
from schemas import (FAILURES_SCHEMA, IMAGES_SCHEMA, RECORD_JSON_SCHEMA, REGIONS_SCHEMA, SCHEMA_VERSION,
                     RecordError, check_record, image_provenance, provenance_id, record_errors,
                     region_provenance)

SEG = provenance_id("segmenter", {"name": "given"})
CAP = provenance_id("captioner", {"name": "attributes"})
from schemas import doc


def _record() -> dict:
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:13] = True
    rle = masks.encode(mask)
    region = {"id": "p1", "level": "pixel", "parent": "r1", "bbox": [3.0, 2.0, 10.0, 6.0], "area": 60.0,
              "mask": rle, "scores": {}, "caption": "c", "long_caption": "lc", "tags": ["t"],
              "provenance": {"segmenter": SEG, "captioner": CAP}}
    box = dict(region, id="r1", level="region", parent=None, mask=None)
    return {"schema_version": "3", "key": "img_1", "source": {"uri": "x.png", "sha256": "a" * 64},
            "image": {"width": 30, "height": 20, "format": "png"},
            "image_level": {"caption": "c", "long_caption": "lc", "tags": [], "provenance": CAP},
            "regions": [box, region], "provenance": {"pipeline_version": "0", "settings_hash": "h",
                                                     "annotators": {SEG: {"name": "given"},
                                                                    CAP: {"name": "attributes"}}}}


def test_schema_doc_is_current() -> None:
    assert doc.DOC_PATH.read_text() == doc.render(), "run `python -m schemas.doc` to regenerate docs/SCHEMA.md"


def test_valid_record_passes() -> None:
    check_record(_record())


@pytest.mark.parametrize("mutate, path", [
    (lambda r: r.pop("key"), "<record>: 'key' is a required property"),
    (lambda r: r.__setitem__("key", "a.b"), "key: 'a.b' does not match"),
    (lambda r: r["image"].__setitem__("width", "30"), "image.width: '30' is not of type 'integer'"),
    (lambda r: r["regions"][1].__setitem__("level", "part"), "regions[1].level: 'part' is not one of"),
    (lambda r: r["regions"][1].__setitem__("parent", "r9"), "regions[1].parent: 'r9' is not an earlier region id"),
    (lambda r: r["regions"][1].__setitem__("bbox", [3.0, 2.0, 11.0, 6.0]), "regions[1].bbox: [3.0, 2.0, 11.0, 6.0] differs from the mask's box"),
    (lambda r: r["regions"][1].__setitem__("area", 61.0), "regions[1].area: 61.0 differs from the mask's 60 pixels"),
    (lambda r: r["regions"][1]["mask"].__setitem__("size", [21, 30]), "regions[1].mask.size"),
    (lambda r: r["regions"][1].__setitem__("mask", None), "regions[1].mask: a pixel-level region needs a mask"),
    (lambda r: r["regions"][0].__setitem__("bbox", [25.0, 0.0, 10.0, 5.0]), "regions[0].bbox: [25.0, 0.0, 10.0, 5.0] is outside"),
    (lambda r: r["image"].__setitem__("extra", 1), "image: Additional properties are not allowed"),
    (lambda r: r.__setitem__("schema_version", "2"), "schema_version: '3' was expected"),
    (lambda r: r["regions"][1]["provenance"].__setitem__("segmenter", {"name": "given"}),
     "regions[1].provenance.segmenter: {'name': 'given'} is not of type 'string'"),
    (lambda r: r["regions"][1]["provenance"].__setitem__("captioner", "c-000000000000"),
     "regions[1].provenance.captioner: 'c-000000000000' is not in provenance.annotators"),
    (lambda r: r["regions"][1]["provenance"].__setitem__("captioner", SEG),
     f"regions[1].provenance.captioner: '{SEG}' is not a captioner provenance id"),
    (lambda r: r["provenance"]["annotators"].__setitem__("c-111111111111", {"name": "unused"}),
     "provenance.annotators.c-111111111111: not used"),
    (lambda r: r["provenance"]["annotators"].__setitem__("x-1", {}), "provenance.annotators: 'x-1' does not match"),
    (lambda r: r["provenance"]["annotators"].__setitem__(CAP, "attributes"),
     f"provenance.annotators.{CAP}: 'attributes' is not of type 'object'"),
])
def test_errors_name_the_field(mutate, path) -> None:
    record = copy.deepcopy(_record())
    mutate(record)
    errors = record_errors(record)
    assert any(e.startswith(path) for e in errors), errors
    with pytest.raises(RecordError):
        check_record(record)


def test_parquet_schemas_come_from_the_definition() -> None:
    for schema in (IMAGES_SCHEMA, REGIONS_SCHEMA, FAILURES_SCHEMA):
        assert schema.metadata[b"schema_version"] == SCHEMA_VERSION.encode() == b"3"
        assert all(f.metadata and f.metadata[b"doc"] for f in schema)
    assert {"key", "stage", "reason", "detail", "source"} <= set(FAILURES_SCHEMA.names)
    assert RECORD_JSON_SCHEMA["properties"]["regions"]["items"]["properties"]["level"]["enum"] == ["region", "pixel"]


def test_provenance_is_stored_once_and_resolved_by_id() -> None:
    record = _record()
    assert region_provenance(record, record["regions"][1]) == {"segmenter": {"name": "given"},
                                                               "captioner": {"name": "attributes"}}
    assert image_provenance(record) == {"name": "attributes"}
    # the id is the content: equal provenance, equal id; a different one, a different id
    assert provenance_id("captioner", {"name": "attributes"}) == CAP
    assert provenance_id("captioner", {"name": "attributes", "v": 1}) != CAP
    assert CAP.startswith("c-") and SEG.startswith("s-")


@pytest.mark.parametrize("mutate", [
    lambda r: r.pop("key"), lambda r: r.__setitem__("key", "a.b"),
    lambda r: r["image"].__setitem__("width", "30"), lambda r: r["regions"][1].__setitem__("level", "part"),
    lambda r: r["image"].__setitem__("extra", 1), lambda r: r.__setitem__("schema_version", "1"),
    lambda r: r["provenance"]["annotators"].__setitem__("x-1", {}),
    lambda r: r["regions"][0].__setitem__("bbox", [1, 2, 3]),
    lambda r: r["regions"][0]["provenance"].__setitem__("captioner", {"name": "x"}),
])
def test_the_fast_check_rejects_what_the_full_schema_rejects(mutate) -> None:
    """Records are checked with the compiled schema as they are assembled; it must not let through
    what jsonschema (which names the errors) rejects."""
    import fastjsonschema

    from schemas import validation

    validation._fast_check()(_record())
    record = copy.deepcopy(_record())
    mutate(record)
    assert list(validation._validator().iter_errors(record))
    with pytest.raises(fastjsonschema.JsonSchemaException):
        validation._fast_check()(record)


def test_every_mask_of_a_record_is_checked_and_one_that_does_not_decode_is_named() -> None:
    """Masks are checked in one pycocotools call per record; each mismatch still names its own
    region, and a mask that cannot be decoded is named without hiding the others' errors."""
    record = copy.deepcopy(_record())
    pixel = record["regions"][1]
    for i, (x, area) in enumerate([(14, 60.0), (3, 60.0), (3, 59.0)]):
        mask = np.zeros((20, 30), bool)
        mask[2:8, x:x + 10] = True
        record["regions"].append(dict(copy.deepcopy(pixel), id=f"q{i}", bbox=[3.0, 2.0, 10.0, 6.0],
                                      area=area, mask=masks.encode(mask)))
    errors = record_errors(record)
    assert errors == ["regions[2].bbox: [3.0, 2.0, 10.0, 6.0] differs from the mask's box "
                      "[14.0, 2.0, 10.0, 6.0]",
                      "regions[4].area: 59.0 differs from the mask's 60 pixels"]
    record["regions"][3]["mask"]["counts"] = "é"      # not a COCO counts string
    errors = record_errors(record)
    assert errors[0].startswith("regions[2].bbox:") and errors[2].startswith("regions[4].area:")
    assert errors[1].startswith("regions[3].mask.counts: does not decode") and len(errors) == 3
