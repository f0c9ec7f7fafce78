"""Record validation: JSON Schema (with field paths) plus the rules a schema cannot state."""
from __future__ import annotations

import functools
from typing import Any

import fastjsonschema
import jsonschema

from schemas.provenance import ROLES
from schemas.record import RECORD
from schemas.spec import json_schema


class RecordError(ValueError):
    """A record breaks the schema; ``errors`` lists "<field path>: <problem>" strings."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
        self.errors = errors


def _schema() -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **json_schema(RECORD)}


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema())


@functools.lru_cache(maxsize=1)
def _fast_check() -> Any:
    """The schema compiled to Python (fastjsonschema): ~50× faster than jsonschema on a valid
    record; it stops at the first error, so a failing record is checked again by jsonschema,
    which names every error with its field path."""
    return fastjsonschema.compile(_schema())


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<record>"


def record_errors(record: Any, check_masks: bool = True) -> list[str]:
    """All problems with ``record`` as "<field path>: <message>"; empty when valid.

    Beyond JSON Schema: region ids unique, parents exist and come first, a mask's size equals the
    image size and (``check_masks``) its decoded tight box and pixel count equal ``bbox``/``area``;
    every provenance id refers to an entry of ``provenance.annotators`` of its role, and every entry
    is used.
    """
    try:
        _fast_check()(record)
    except fastjsonschema.JsonSchemaException:
        errors = [f"{_path(e.absolute_path)}: {e.message}"
                  for e in sorted(_validator().iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))]
        if errors:
            return errors
    return _semantic_errors(record, check_masks)


def check_record(record: Any, check_masks: bool = True) -> None:
    """Raise RecordError unless ``record`` is a valid record of the current schema version."""
    errors = record_errors(record, check_masks)
    if errors:
        raise RecordError(errors)


def _semantic_errors(record: dict, check_masks: bool) -> list[str]:
    errors: list[str] = []
    width, height = record["image"]["width"], record["image"]["height"]
    seen: dict[str, str] = {}
    masked: list[tuple[str, dict]] = []     # regions whose mask is checked against bbox / area
    for i, region in enumerate(record["regions"]):
        where = f"regions[{i}]"
        rid = region["id"]
        if rid in seen:
            errors.append(f"{where}.id: duplicate id '{rid}'")
        parent = region["parent"]
        if parent is not None and parent not in seen:
            errors.append(f"{where}.parent: '{parent}' is not an earlier region id")
        seen[rid] = region["level"]
        x, y, w, h = region["bbox"]
        if x < 0 or y < 0 or w < 0 or h < 0 or x + w > width + 1e-6 or y + h > height + 1e-6:
            errors.append(f"{where}.bbox: {region['bbox']} is outside the {width}x{height} image")
        problem = _mask_shape_error(region, where, width, height)
        if problem:
            errors.append(problem)
        elif check_masks and region["mask"] is not None:
            masked.append((where, region))
    errors.extend(_mask_errors(masked))
    errors.extend(_provenance_errors(record))
    return errors


def _provenance_errors(record: dict) -> list[str]:
    table = record["provenance"]["annotators"]
    refs = [("image_level.provenance", "captioner", record["image_level"]["provenance"])]
    for i, region in enumerate(record["regions"]):
        refs += [(f"regions[{i}].provenance.{role}", role, pid) for role, pid in region["provenance"].items()]
    errors = []
    for where, role, pid in refs:
        if pid not in table:
            errors.append(f"{where}: '{pid}' is not in provenance.annotators")
        elif pid[0] != ROLES[role]:
            errors.append(f"{where}: '{pid}' is not a {role} provenance id")
    for pid in sorted(set(table) - {pid for _, _, pid in refs}):
        errors.append(f"provenance.annotators.{pid}: not used by the image level or any region")
    return errors


def _mask_shape_error(region: dict, where: str, width: int, height: int) -> str | None:
    mask = region["mask"]
    if region["level"] == "pixel" and mask is None:
        return f"{where}.mask: a pixel-level region needs a mask"
    if mask is not None and list(mask["size"]) != [height, width]:
        return f"{where}.mask.size: {mask['size']} differs from the image [{height}, {width}]"
    return None


def _mask_errors(masked: list[tuple[str, dict]]) -> list[str]:
    """Each mask's decoded tight box and pixel count against its region's ``bbox`` / ``area``:
    one pycocotools call for all of a record's masks; a mask that does not decode is named."""
    if not masked:
        return []
    # pycocotools; imported only when masks are checked
    from annotators.segment import masks as mask_utils

    rles = [region["mask"] for _, region in masked]
    try:
        boxes, areas = mask_utils.bboxes(rles), mask_utils.areas(rles)
    except Exception:  # a malformed counts string: find which, one mask at a time
        errors = []
        for where, region in masked:
            try:
                errors += _mask_mismatch(where, region, mask_utils.bbox(region["mask"]),
                                         mask_utils.area(region["mask"]))
            except Exception as exc:
                errors.append(f"{where}.mask.counts: does not decode ({exc})")
        return errors
    return [error for (where, region), box, area in zip(masked, boxes, areas, strict=True)
            for error in _mask_mismatch(where, region, box, area)]


def _mask_mismatch(where: str, region: dict, box: list[float], area: int) -> list[str]:
    errors = []
    if any(abs(a - b) > 0.5 for a, b in zip(box, region["bbox"])):
        errors.append(f"{where}.bbox: {region['bbox']} differs from the mask's box {box}")
    if abs(area - region["area"]) > 0.5:
        errors.append(f"{where}.area: {region['area']} differs from the mask's {area} pixels")
    return errors
