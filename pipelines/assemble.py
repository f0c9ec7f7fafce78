"""Assemble: an annotated ImageItem → a schema-valid record (or failures)."""
from __future__ import annotations

from typing import Any

from annotators.base import CaptionResult, RegionView, TextOut
from pipelines.config import mask_secrets
from pipelines.types import Failure, ImageItem
from schemas import SCHEMA_VERSION, ProvenanceTable, record_errors


def _drop_failed(regions: list[RegionView], failed: set[str]) -> list[RegionView]:
    """Remove failed regions; their children move up to the nearest surviving ancestor."""
    if not failed:
        return regions
    by_id = {r.id: r for r in regions}
    kept = []
    for region in regions:
        if region.id in failed:
            continue
        parent = region.parent
        while parent is not None and parent in failed:
            parent = by_id[parent].parent
        kept.append(RegionView(region.id, region.level, parent, region.bbox, region.area, region.rle,
                               region.stats, region.given))
    return kept


class _ProvenanceIds:
    """A record's provenance ids. Each distinct provenance is masked and hashed once per record,
    not once per region: captioner provenance by object (a captioner shares one dict across an
    image's texts; every object stays alive while the record is built), segmenter provenance by
    the region's source."""

    def __init__(self, segmenter: dict[str, Any]) -> None:
        self.table = ProvenanceTable()
        self.segmenter = segmenter
        self._ids: dict[tuple[str, Any], str] = {}

    def captioner(self, provenance: dict[str, Any]) -> str:
        key = ("captioner", id(provenance))
        if key not in self._ids:
            self._ids[key] = self.table.add("captioner", mask_secrets(provenance))
        return self._ids[key]

    def segmenter_of(self, source: str) -> str:
        key = ("segmenter", source)
        if key not in self._ids:
            self._ids[key] = self.table.add("segmenter", {**self.segmenter, "source": source})
        return self._ids[key]


def _region_json(region: RegionView, text: TextOut, ids: _ProvenanceIds) -> dict[str, Any]:
    out = {
        "id": region.id,
        "level": region.level,
        "parent": region.parent,
        "bbox": [round(float(v), 2) for v in region.bbox],
        "area": float(region.area),
        "mask": region.rle,
        "scores": {k: round(float(v), 6) for k, v in {**region.stats.get("scores", {}), **text.scores}.items()},
        "caption": text.caption,
        "long_caption": text.long_caption,
        "tags": list(text.tags),
        "provenance": {"segmenter": ids.segmenter_of(region.stats.get("source", "")),
                       "captioner": ids.captioner(text.provenance)},
    }
    if text.judge is not None:
        out["judge"] = dict(text.judge)
    if text.steps:
        out["steps"] = dict(text.steps)
    if region.given:
        out["given"] = dict(region.given)
    return out


def build_record(item: ImageItem, segmenter: dict[str, Any], pipeline_version: str,
                 settings_hash: str) -> tuple[dict[str, Any] | None, list[Failure]]:
    """The record for ``item`` plus region-level failures; (None, failures) if the image fails."""
    segmenter = mask_secrets(segmenter)
    result: CaptionResult = item.captions
    failures = list(item.region_failures)
    for f in result.failures:
        if f.region_id is None:
            return None, failures + [item.fail("caption", f.reason, f.detail)]
        failures.append(Failure(item.ref.key, item.ref.uri, "caption", f.reason, f.detail,
                                f.region_id, item.ref.shard))
    if result.image_level is None:
        return None, failures + [item.fail("caption", "no_image_caption", "captioner returned none")]
    missing = {r.id for r in item.regions} - set(result.regions)
    explained = {f.region_id for f in result.failures} | {f.region_id for f in item.region_failures}
    for region_id in sorted(missing - explained):
        failures.append(Failure(item.ref.key, item.ref.uri, "caption", "missing_caption",
                                "captioner gave no text", region_id, item.ref.shard))
    regions = _drop_failed(item.regions, missing)
    source: dict[str, Any] = {"uri": item.ref.uri, "sha256": item.sha256}
    if item.ref.dataset:
        source["dataset"] = item.ref.dataset
    if item.ground_truth:
        source["ground_truth"] = item.ground_truth
    image_level = result.image_level
    ids = _ProvenanceIds(segmenter)
    image_provenance = ids.captioner(image_level.provenance)
    region_json = [_region_json(r, result.regions[r.id], ids) for r in regions]
    record = {
        "schema_version": SCHEMA_VERSION,
        "key": item.ref.key,
        "source": source,
        "image": {"width": item.width, "height": item.height, "format": item.format, **item.image_info},
        "image_level": {"caption": image_level.caption, "long_caption": image_level.long_caption,
                        "tags": list(image_level.tags), "provenance": image_provenance,
                        **({"judge": dict(image_level.judge)} if image_level.judge is not None else {}),
                        **({"steps": dict(image_level.steps)} if image_level.steps else {}),
                        **({"given": {"caption": item.given_caption}} if item.given_caption else {})},
        "regions": region_json,
        "provenance": {"pipeline_version": pipeline_version, "settings_hash": settings_hash,
                       "annotators": ids.table.as_dict()},
    }
    errors = record_errors(record)
    if errors:
        return None, failures + [item.fail("assemble", "schema_invalid", "; ".join(errors[:5]))]
    return record, failures
