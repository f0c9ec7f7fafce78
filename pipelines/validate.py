"""`make validate OUTPUT=dir`: every sample of every complete shard against the schema, each
shard's index and failures files against it, and the manifest against them all. Shards are checked
in parallel processes in bounded memory. Exit 1 with a readable report on any problem.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines.layout import index_path
from pipelines.writer import complete_shard_names, read_parquet
from schemas import FAILURES_SCHEMA, IMAGES_SCHEMA, REGIONS_SCHEMA, record_errors


@dataclass
class Report:
    """Problems found, grouped by where they were found."""

    errors: list[str] = field(default_factory=list)
    samples: int = 0
    shards: int = 0
    regions: int = 0

    def add(self, where: str, message: str) -> None:
        """Record one problem."""
        self.errors.append(f"{where}: {message}")

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.errors

    def text(self, limit: int = 50) -> str:
        """Readable report."""
        head = (f"checked {self.shards} shards, {self.samples} samples, {self.regions} regions: "
                + ("OK" if self.ok else f"{len(self.errors)} problem(s)"))
        shown = [f"  - {e}" for e in self.errors[:limit]]
        if len(self.errors) > limit:
            shown.append(f"  ... and {len(self.errors) - limit} more")
        return "\n".join([head, *shown])


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def _check_sample(report: Report, where: str, key: str, members: dict[str, bytes]) -> dict | None:
    exts = sorted(members)
    images = [e for e in exts if e in ("jpg", "png")]
    if "json" not in members or len(images) != 1 or len(exts) != 2:
        report.add(where, f"sample '{key}' has members {exts}; expected json + one of jpg/png")
        return None
    try:
        record = json.loads(members["json"])
    except ValueError as exc:
        report.add(where, f"sample '{key}': json does not parse ({exc})")
        return None
    for error in record_errors(record):
        report.add(f"{where} {key}", error)
    if not isinstance(record, dict) or "image" not in record:
        return None
    if record.get("key") != key:
        report.add(where, f"sample '{key}': record key is '{record.get('key')}'")
    if record["image"].get("format") != images[0]:
        report.add(where, f"sample '{key}': image member .{images[0]} but format {record['image'].get('format')}")
    try:
        with Image.open(io.BytesIO(members[images[0]])) as image:
            size = image.size
            image.load()
        if list(size) != [record["image"].get("width"), record["image"].get("height")]:
            report.add(where, f"sample '{key}': image is {size[0]}x{size[1]}, record says "
                              f"{record['image'].get('width')}x{record['image'].get('height')}")
    except Exception as exc:
        report.add(where, f"sample '{key}': image does not decode ({exc})")
    return record


def check_shard(report: Report, name: str, data: bytes) -> dict[str, dict]:
    """Check one tar; returns its records by key."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if not info.isfile() or not ext:
                    report.add(name, f"unexpected member '{info.name}'")
                    continue
                if order and order[-1] != key and key in samples:
                    report.add(name, f"key '{key}' appears in two separate places")
                if ext in samples[key]:
                    report.add(name, f"duplicate member '{info.name}'")
                if not order or order[-1] != key:
                    order.append(key)
                samples[key][ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError) as exc:
        report.add(name, f"not a readable tar ({exc})")
        return {}
    records = {}
    for key, members in samples.items():
        record = _check_sample(report, name, key, members)
        if record is not None:
            records[key] = record
    return records


def _check_index(report: Report, out: str, shard: str, records: dict[str, dict]) -> int:
    """The shard's index and failures files against its records; returns its failed inputs."""
    tables = {}
    for table, schema in (("images", IMAGES_SCHEMA), ("regions", REGIONS_SCHEMA),
                          ("failures", FAILURES_SCHEMA)):
        where = index_path(out, table, shard)[len(out):].lstrip("/")
        try:
            tables[table] = read_parquet(index_path(out, table, shard))
        except Exception as exc:
            report.add(where, f"missing or unreadable ({exc})")
            return 0
        if tables[table].schema.remove_metadata() != schema.remove_metadata():
            report.add(where, f"schema differs from the expected one:\n{tables[table].schema}")
            return 0
    name = f"{shard}.tar"
    indexed = {r["key"] for r in tables["images"].to_pylist() if r["shard"] == name}
    for key in sorted(set(records) - indexed)[:20]:
        report.add(f"index/images/{shard}.parquet", f"no row for '{key}'")
    for key in sorted(indexed - set(records))[:20]:
        report.add(f"index/images/{shard}.parquet", f"row for '{key}', which the shard does not hold")
    per_key = Counter(tables["regions"].column("key").to_pylist())
    for key, record in records.items():
        if per_key.get(key, 0) != len(record["regions"]):
            report.add(f"index/regions/{shard}.parquet", f"'{key}' has {per_key.get(key, 0)} rows, "
                                                        f"record has {len(record['regions'])} regions")
    rows = tables["failures"].to_pylist()
    # an input is (key, source): a duplicate_key row shares its key with another input's record
    failed = {(r["key"], r["source"]) for r in rows if r["region_id"] is None and r["class"] == "permanent"}
    written = {(key, record.get("source", {}).get("uri")) for key, record in records.items()}
    for key, source in sorted(failed & written)[:20]:
        report.add(f"failures/{shard}.parquet", f"'{key}' ({source}) is both a record and a failed input")
    if any(r["class"] == "transient" for r in rows):
        report.add(f"failures/{shard}.parquet", "a complete shard holds transient failures")
    return len(failed)


@dataclass
class ShardResult:
    """What one shard's check reports back (small: no records)."""

    shard: str
    errors: list[str]
    keys: list[str]
    regions: int
    failed: int


def check_one(args: tuple[str, str, dict | None]) -> ShardResult:
    """Check one complete shard (its tar, if any, and its index and failures files)."""
    out, shard, entry = args
    report = Report()
    records: dict[str, dict] = {}
    if entry is not None:
        name = entry["name"]
        try:
            data = _read(FileSystems.join(out, "shards", name))
        except Exception as exc:
            report.add(f"shards/{name}", f"listed in manifest.json but unreadable ({exc})")
            return ShardResult(shard, report.errors, [], 0, 0)
        if hashlib.sha256(data).hexdigest() != entry.get("sha256") or len(data) != entry.get("size"):
            report.add(f"shards/{name}", "sha256/size differ from manifest.json")
        records = check_shard(report, f"shards/{name}", data)
        if len(records) != entry.get("samples"):
            report.add(f"shards/{name}", f"{len(records)} samples, manifest says {entry.get('samples')}")
    failed = _check_index(report, out, shard, records)
    return ShardResult(shard, report.errors, sorted(records),
                       sum(len(r.get("regions", [])) for r in records.values()), failed)


def validate(out: str, processes: int | None = None) -> Report:
    """Validate a dataset directory (any Beam filesystem path); shards are checked in parallel
    worker processes, each returning only its problems and keys (memory stays bounded)."""
    report = Report()
    try:
        manifest = json.loads(_read(FileSystems.join(out, "manifest.json")))
    except Exception as exc:
        report.add("manifest.json", f"missing or unreadable ({exc})")
        return report
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    try:
        present = {m.path.rsplit("/", 1)[-1] for m in
                   FileSystems.match([FileSystems.join(out, "shards", "*")])[0].metadata_list}
    except Exception:
        present = set()
    for extra in sorted(present - set(listed)):
        report.add("shards/", f"'{extra}' is not listed in manifest.json")
    complete = list(complete_shard_names(out))
    for name in sorted(set(listed) - {f"{s}.tar" for s in complete}):
        report.add(f"shards/{name}", "listed in manifest.json but its shard is not complete")
    jobs = [(out, shard, listed.get(f"{shard}.tar")) for shard in complete]
    owner: dict[str, str] = {}
    failed = 0
    workers = max(1, min(processes or os.cpu_count() or 1, len(jobs) or 1))
    context = multiprocessing.get_context("spawn" if workers > 1 else None)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) if workers > 1 \
            else _Inline() as pool:
        for result in pool.map(check_one, jobs, chunksize=4):
            report.errors.extend(result.errors)
            report.shards += result.shard + ".tar" in listed
            report.regions += result.regions
            failed += result.failed
            for key in result.keys:
                if key in owner:
                    report.add(f"shards/{result.shard}.tar", f"key '{key}' also in {owner[key]}.tar")
                owner[key] = result.shard
    report.samples = len(owner)
    counts = manifest.get("counts", {})
    if counts.get("written") != len(owner):
        report.add("manifest.json", f"counts.written={counts.get('written')} but shards hold {len(owner)}")
    if counts.get("failed") != failed:
        report.add("manifest.json", f"counts.failed={counts.get('failed')} but failures hold {failed} inputs")
    waiting = counts.get("awaiting_retry", 0)
    incomplete = manifest.get("incomplete_shards", [])
    if not incomplete and counts.get("in_shards") != len(owner) + failed:
        report.add("manifest.json", f"counts.in_shards={counts.get('in_shards')} != written {len(owner)} "
                                    f"+ failed {failed}: an input is unaccounted for")
    if waiting and not incomplete:
        report.add("manifest.json", f"{waiting} inputs await a retry but no shard is incomplete")
    return report


class _Inline:
    """A one-process stand-in for a process pool."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn, jobs, chunksize: int = 1):   # noqa: ANN001, ANN205 - mirrors Executor.map
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> int:
    """CLI: validate OUTPUT; exit 1 on problems."""
    parser = argparse.ArgumentParser(description="Validate a built dataset against schema v1.")
    parser.add_argument("output")
    parser.add_argument("--max-errors", type=int, default=50)
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes checking shards (default: one per CPU)")
    args = parser.parse_args(argv)
    report = validate(args.output, args.processes)
    print(report.text(args.max_errors))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
