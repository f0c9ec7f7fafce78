"""Writing shards atomically with completion markers, and merging per-shard parts at the end.

Layout under OUT: ``shards/{shard}.tar`` (final names only appear complete: written under a
temporary name, then renamed), ``_work/{shard}/`` (index and failure parts plus ``stats.json``,
the completion marker written last), and after finalize ``index/``, ``failures/``,
``manifest.json`` and ``README.md``.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from apache_beam.io.filesystems import FileSystems

from pipelines.types import Failure, ShardOutcome
from schemas import FAILURES_SCHEMA, IMAGES_SCHEMA, REGIONS_SCHEMA

WORK_DIR = "_work"


def shard_path(out: str, shard: str) -> str:
    """Final path of a shard tar."""
    return FileSystems.join(out, "shards", f"{shard}.tar")


def stats_path(out: str, shard: str) -> str:
    """Completion marker of a shard."""
    return FileSystems.join(out, WORK_DIR, shard, "stats.json")


def record_json(record: dict[str, Any]) -> bytes:
    """Canonical bytes of a record (sorted keys, compact, UTF-8): deterministic."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tar_bytes(samples: list[tuple[str, str, bytes, bytes]]) -> bytes:
    """A WebDataset tar of (key, image ext, image bytes, json bytes), in the given order."""
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False, mtime=0)
    for key, ext, image, record in samples:
        writer.write({"__key__": key, ext: image, "json": record})
    writer.close()
    return buffer.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def _parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def image_row(record: dict[str, Any], shard: str) -> dict[str, Any]:
    """Row of index/images.parquet."""
    regions = record["regions"]
    text = record["image_level"]
    return {"key": record["key"], "shard": f"{shard}.tar", "source_uri": record["source"]["uri"],
            "source_sha256": record["source"]["sha256"], "dataset": record["source"].get("dataset"),
            "width": record["image"]["width"], "height": record["image"]["height"],
            "format": record["image"]["format"],
            "n_regions": sum(r["level"] == "region" for r in regions),
            "n_pixel": sum(r["level"] == "pixel" for r in regions),
            "caption": text["caption"], "caption_chars": len(text["caption"]),
            "long_caption_chars": len(text["long_caption"]), "tags": text["tags"]}


def region_rows(record: dict[str, Any], shard: str) -> list[dict[str, Any]]:
    """Rows of index/regions.parquet."""
    rows = []
    for r in record["regions"]:
        x, y, w, h = r["bbox"]
        rows.append({"key": record["key"], "shard": f"{shard}.tar", "region_id": r["id"],
                     "level": r["level"], "parent": r["parent"], "x": x, "y": y, "w": w, "h": h,
                     "area": r["area"], "has_mask": r["mask"] is not None, "caption": r["caption"],
                     "caption_chars": len(r["caption"]), "long_caption_chars": len(r["long_caption"]),
                     "tags": r["tags"], "scores_json": json.dumps(r["scores"], sort_keys=True)})
    return rows


def write_shard(out: str, shard: str, outcomes: Iterable[ShardOutcome], settings_hash: str) -> dict[str, Any]:
    """Write one shard and its parts; the stats file (written last) marks it complete."""
    outcomes = sorted(outcomes, key=lambda o: o.key)
    samples, images, regions, failures = [], [], [], []
    timings: Counter = Counter()
    dropped: Counter = Counter()
    hashes: dict[str, str] = {}
    for o in outcomes:
        failures.extend(f.row() for f in o.failures)
        timings.update(o.timings)
        dropped.update(o.dropped)
        if o.record is not None:
            samples.append((o.key, o.record["image"]["format"], o.image, record_json(o.record)))
            images.append(image_row(o.record, shard))
            regions.extend(region_rows(o.record, shard))
            hashes[o.key] = o.record["source"]["sha256"]
        hashes.update(o.hashes)
    stats: dict[str, Any] = {"shard": shard, "settings_hash": settings_hash, "samples": len(samples),
                             "keys": [s[0] for s in samples], "hashes": hashes,
                             "timings": dict(timings), "regions_dropped": dict(dropped), "tar": None}
    if samples:
        data = tar_bytes(samples)
        _write_atomic(shard_path(out, shard), data)
        stats["tar"] = {"name": f"{shard}.tar", "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data)}
    work = FileSystems.join(out, WORK_DIR, shard)
    _write_atomic(FileSystems.join(work, "images.parquet"), _parquet_bytes(images, IMAGES_SCHEMA))
    _write_atomic(FileSystems.join(work, "regions.parquet"), _parquet_bytes(regions, REGIONS_SCHEMA))
    _write_atomic(FileSystems.join(work, "failures.parquet"), _parquet_bytes(failures, FAILURES_SCHEMA))
    _write_atomic(stats_path(out, shard), json.dumps(stats, sort_keys=True, indent=1).encode())
    return stats


def read_stats(out: str, shard: str) -> dict[str, Any] | None:
    """A shard's stats if it is complete (marker present and tar, if any, of the recorded size)."""
    path = stats_path(out, shard)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        stats = json.loads(handle.read())
    if stats.get("tar"):
        tar = shard_path(out, shard)
        if not FileSystems.exists(tar):
            return None
        size = FileSystems.match([tar])[0].metadata_list[0].size_in_bytes
        if size != stats["tar"]["size"]:
            return None
    return stats


def read_parts(out: str, shard: str, name: str) -> pa.Table:
    """One of a shard's parquet parts."""
    with FileSystems.open(FileSystems.join(out, WORK_DIR, shard, f"{name}.parquet")) as handle:
        return pq.read_table(io.BytesIO(handle.read()), use_threads=False)


def failures_by_reason(failures: list[Failure]) -> dict[str, int]:
    """Counts "stage/reason" of whole-input failures."""
    return dict(Counter(f"{f.stage}/{f.reason}" for f in failures if f.region_id is None))
