"""Writing shards: outcomes are staged, then each shard is written once, atomically, when complete.

Images never travel through a shuffle here. ``StageOutcomes`` writes finished outcomes (record,
image bytes, failures) into small staging files under ``_work/{shard}/staged/`` — the pattern of
Beam's own file sinks — and only their names are grouped by shard. ``write_shard`` then reads its
shard's staged outcomes (memory bounded by one shard) and:

* if an input of the shard hit a *transient* failure, the shard is **not complete**: its failures
  and ``members.parquet`` (the inputs settled so far) are written, the staged outcomes kept; a
  rerun redoes only the transient inputs and completes the shard with the bytes a clean run writes;
* otherwise it writes ``shards/{shard}.tar`` (temporary name, then renamed), the per-shard
  ``index/images``, ``index/regions`` and ``failures`` parquet files, ``members.parquet``, and last
  the completion marker ``_work/{shard}/stats.json``; then drops the staged files.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import uuid
from collections import Counter
from typing import Any, Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipelines import cost
from pipelines import layout as lay
from pipelines.budget import endpoint_of
from pipelines.types import ShardOutcome, failure_class
from schemas import FAILURES_SCHEMA, IMAGES_SCHEMA, REGIONS_SCHEMA

MEMBERS_SCHEMA = pa.schema([("key", pa.string()), ("uri", pa.string()), ("sha256", pa.string()),
                            ("shard", pa.string()), ("status", pa.string())])
STAGED = "staged"


def record_json(record: dict[str, Any]) -> bytes:
    """Canonical bytes of a record (sorted keys, compact, UTF-8): deterministic."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tar_bytes(samples: list[tuple[str, str, bytes, bytes]]) -> bytes:
    """A WebDataset tar of (key, image ext, image bytes, json bytes), in the given order.

    Byte for byte what ``webdataset.TarWriter(encoder=False, mtime=0)`` writes (members of a
    sample sorted by extension, mode 0444, owner "bigdata", PAX headers), with the standard
    library only: importing webdataset imports torch, seconds of every worker's start-up. Each
    member is its ``tarfile`` header, its bytes and zeros to a whole 512-byte block, as
    ``tarfile``'s stream mode writes it; joined once instead of copied through a stream in
    16 KiB pieces."""
    parts: list[bytes] = []
    size = 0
    for key, ext, image, record in samples:
        for name, data in sorted([(ext, image), ("json", record)]):
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"
            header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
            padding = -len(data) % tarfile.BLOCKSIZE
            parts += [header, data, bytes(padding)]
            size += len(header) + len(data) + padding
    # the end: two zero blocks, then zeros to a whole record (tarfile's stream close)
    end = 2 * tarfile.BLOCKSIZE
    parts.append(bytes(end + -(size + end) % tarfile.RECORDSIZE))
    return b"".join(parts)


def parquet_bytes(rows: list[dict[str, Any]] | dict[str, list[Any]], schema: pa.Schema) -> bytes:
    """One parquet file of ``rows`` (a list of rows, or a dict of columns)."""
    buffer = io.BytesIO()
    table = (pa.Table.from_pydict(rows, schema=schema) if isinstance(rows, dict)
             else pa.Table.from_pylist(rows, schema=schema))
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_parquet(path: str) -> pa.Table:
    """A parquet file through Beam's filesystems."""
    with FileSystems.open(path) as handle:
        # use_threads=False: Arrow's thread pool next to Beam's can abort the interpreter at exit
        return pq.read_table(io.BytesIO(handle.read()), use_threads=False)


def image_row(record: dict[str, Any], shard: str) -> dict[str, Any]:
    """Row of index/images."""
    regions = record["regions"]
    text = record["image_level"]
    return {"key": record["key"], "shard": f"{shard}.tar", "source_uri": record["source"]["uri"],
            "source_sha256": record["source"]["sha256"], "dataset": record["source"].get("dataset"),
            "width": record["image"]["width"], "height": record["image"]["height"],
            "format": record["image"]["format"],
            "n_regions": sum(r["level"] == "region" for r in regions),
            "n_pixel": sum(r["level"] == "pixel" for r in regions),
            "caption": text["caption"], "caption_chars": len(text["caption"]),
            "long_caption_chars": len(text["long_caption"]), "tags": text["tags"],
            "captioner_provenance": text["provenance"]}


def _flagged(scores: dict[str, float]) -> bool | None:
    """The consistency filter's flag (``consistency_flag`` score: 1 below the threshold)."""
    flag = scores.get("consistency_flag")
    return None if flag is None else bool(flag)


REGION_COLUMNS = tuple(REGIONS_SCHEMA.names)   # filled by name below; a new column fails loudly


def region_columns(records: list[dict[str, Any]], shard: str) -> dict[str, list[Any]]:
    """The columns of index/regions for ``records`` (filled column by column: a shard has tens
    of thousands of regions, and rows of dicts would be turned into columns again)."""
    cols: dict[str, list[Any]] = {name: [] for name in REGION_COLUMNS}
    tar = f"{shard}.tar"
    for record in records:
        regions = record["regions"]
        n = len(regions)
        cols["key"] += [record["key"]] * n
        cols["shard"] += [tar] * n
        for r in regions:
            x, y, w, h = r["bbox"]
            scores, judge = r["scores"], r.get("judge")
            cols["region_id"].append(r["id"])
            cols["level"].append(r["level"])
            cols["parent"].append(r["parent"])
            cols["x"].append(x)
            cols["y"].append(y)
            cols["w"].append(w)
            cols["h"].append(h)
            cols["area"].append(r["area"])
            cols["has_mask"].append(r["mask"] is not None)
            cols["caption"].append(r["caption"])
            cols["caption_chars"].append(len(r["caption"]))
            cols["long_caption_chars"].append(len(r["long_caption"]))
            cols["tags"].append(r["tags"])
            cols["scores_json"].append(json.dumps(scores, sort_keys=True) if scores else "{}")
            cols["segmenter_provenance"].append(r["provenance"]["segmenter"])
            cols["captioner_provenance"].append(r["provenance"]["captioner"])
            cols["label"].append(r["given"].get("label") if "given" in r else None)
            cols["judge_keep"].append(judge["keep"] if judge is not None else None)
            cols["judge_reason"].append(judge["reason"] if judge is not None else None)
            cols["consistency"].append(scores.get("consistency"))
            cols["consistency_flagged"].append(_flagged(scores))
    return cols


# --------------------------------------------------------------------------- staging


def stage(out: str, shard: str, run_id: str, outcomes: list[ShardOutcome]) -> str:
    """Write one staging file of a shard's outcomes; returns its path."""
    path = lay.work_path(out, shard, f"{STAGED}/{run_id}-{uuid.uuid4().hex[:12]}.pkl")
    lay.write_atomic(path, pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL))
    return path


class StageOutcomes(beam.DoFn):
    """ShardOutcome → (shard, staging file): outcomes buffered per shard, written in files of at
    most ``max_bytes`` (and at the end of each bundle), so a worker holds little at a time."""

    def __init__(self, out: str, run_id: str, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.out, self.run_id, self.max_bytes = out, run_id, max_bytes
        self.buffers: dict[str, list[ShardOutcome]] = {}
        self.size = 0

    def start_bundle(self) -> None:
        self.buffers, self.size = {}, 0

    def process(self, outcome: ShardOutcome) -> Iterator[tuple[str, str]]:
        self.buffers.setdefault(outcome.shard, []).append(outcome)
        self.size += len(outcome.image or b"") + 4096
        if self.size >= self.max_bytes:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for element in self._flush():
            yield WindowedValue(element, GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _flush(self) -> Iterator[tuple[str, str]]:
        buffers, self.buffers, self.size = self.buffers, {}, 0
        for shard, outcomes in sorted(buffers.items()):
            yield shard, stage(self.out, shard, self.run_id, outcomes)


def staged_outcomes(out: str, shard: str) -> dict[tuple[str, str], ShardOutcome]:
    """Every staged outcome of a shard, by (key, uri); a later run's outcome replaces an earlier
    one."""
    pattern = lay.work_path(out, shard, f"{STAGED}/*.pkl")
    try:
        paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:   # nothing staged
        paths = []
    chosen: dict[tuple[str, str], ShardOutcome] = {}
    for path in paths:   # names start with the run id, so later runs come last
        with FileSystems.open(path) as handle:
            for outcome in pickle.loads(handle.read()):
                chosen[(outcome.key, outcome.uri)] = outcome
    return chosen


# --------------------------------------------------------------------------- shards


def _member(o: ShardOutcome, shard: str) -> dict[str, Any]:
    return {"key": o.key, "uri": o.uri, "sha256": o.sha256, "shard": shard,
            "status": "written" if o.record is not None else "failed"}


def shard_stats(shard: str, outcomes: list[ShardOutcome]) -> dict[str, Any]:
    """Counts of one shard (summed over shards into the manifest by the pipeline), with what its
    inputs cost per stage (``timings``: wall seconds; ``costs``: see ``pipelines.cost``)."""
    failed_inputs = [f for o in outcomes for f in o.failures if f.region_id is None]
    region_failures = [f for o in outcomes if o.record is not None for f in o.failures
                       if f.region_id is not None]
    levels: Counter = Counter()
    timings: Counter = Counter()
    dropped: Counter = Counter()
    caption_chars = long_chars = without_masks = 0
    for o in outcomes:
        timings.update(o.timings)
        dropped.update(o.dropped)
        if o.record is None:
            continue
        regions = o.record["regions"]
        levels.update(r["level"] for r in regions)
        caption_chars += len(o.record["image_level"]["caption"])
        long_chars += sum(len(r["long_caption"]) for r in regions)
        without_masks += not any(r["level"] == "pixel" for r in regions)
    transient = sorted(o.key for o in outcomes if o.transient)
    where: Counter = Counter()
    for f in (f for o in outcomes for f in o.failures if f.transient):
        url = endpoint_of(f.detail)
        where[f"{f.stage}/{f.reason}" + (f" at {url}" if url else "")] += 1
    return {
        "shard": shard, "complete": not transient, "inputs": len(outcomes),
        "written": sum(o.record is not None and not o.transient for o in outcomes),
        "failed": sum(o.record is None and not o.transient for o in outcomes),
        "transient": len(transient), "transient_keys": transient[:20],
        "transient_by_where": dict(where),
        "failed_by_reason": dict(Counter(f"{f.stage}/{f.reason}" for f in failed_inputs)),
        "failed_by_class": dict(Counter(failure_class(f.reason) for f in failed_inputs)),
        "region_failures_by_reason": dict(Counter(f"{f.stage}/{f.reason}" for f in region_failures)),
        "regions_by_level": dict(levels), "regions_dropped_by_reason": dict(dropped),
        "images_without_masks": without_masks, "caption_chars": caption_chars,
        "region_long_caption_chars": long_chars, "timings": dict(timings), "tar": None,
        # outcomes staged by an older version have no costs
        "costs": cost.summed(getattr(o, "costs", {}) for o in outcomes),
    }


def write_shard(out: str, shard: str, settings_hash: str, layout: lay.Layout) -> dict[str, Any]:
    """Write one shard from its staged outcomes; returns its stats (``complete`` says whether the
    completion marker was written)."""
    lay.write_layout_once(out, layout)
    outcomes = [o for _, o in sorted(staged_outcomes(out, shard).items())]
    stats = shard_stats(shard, outcomes)
    stats["settings_hash"] = settings_hash
    failures = [f.row() | {"shard": shard} for o in outcomes for f in o.failures]
    settled = [o for o in outcomes if not o.transient]
    # failures and the settled members, whether or not the shard completes now (a stop before the
    # completion marker is finished by the next run from the staged outcomes)
    lay.write_atomic(lay.index_path(out, "failures", shard), parquet_bytes(failures, FAILURES_SCHEMA))
    lay.write_atomic(lay.work_path(out, shard, "members.parquet"),
                     parquet_bytes([_member(o, shard) for o in settled], MEMBERS_SCHEMA))
    if not stats["complete"]:
        return stats
    written = [o for o in outcomes if o.record is not None]
    if written:
        data = tar_bytes([(o.key, o.record["image"]["format"], o.image, record_json(o.record))
                          for o in written])
        lay.write_atomic(lay.shard_path(out, shard), data)
        stats["tar"] = {"name": f"{shard}.tar", "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data), "samples": len(written)}
    lay.write_atomic(lay.index_path(out, "images", shard),
                     parquet_bytes([image_row(o.record, shard) for o in written], IMAGES_SCHEMA))
    lay.write_atomic(lay.index_path(out, "regions", shard),
                     parquet_bytes(region_columns([o.record for o in written], shard),
                                   REGIONS_SCHEMA))
    lay.write_atomic(lay.work_path(out, shard, "stats.json"),
                     json.dumps(stats, sort_keys=True, indent=1).encode())
    _drop_staged(out, shard)
    return stats


def _drop_staged(out: str, shard: str) -> None:
    try:
        paths = [m.path for m in FileSystems.match(
            [lay.work_path(out, shard, f"{STAGED}/*")])[0].metadata_list]
    except Exception:
        return
    if paths:
        FileSystems.delete(paths)


def read_json(path: str) -> dict[str, Any]:
    """A JSON file through Beam's filesystems."""
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def complete_shard_names(out: str) -> Iterable[str]:
    """Names of complete shards (one listing of the markers; used by tools and tests)."""
    try:
        matched = FileSystems.match([FileSystems.join(out, lay.WORK_DIR, "*", "stats.json")])[0]
    except Exception:
        return []
    return sorted(m.path.rstrip("/").split("/")[-2] for m in matched.metadata_list)
