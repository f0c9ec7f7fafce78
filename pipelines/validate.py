"""`make validate OUTPUT=dir`: every sample of every shard against the schema, and the index,
failures table and manifest against the shards. Exit 1 with a readable report on any problem.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from PIL import Image

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


def _table(out: str, *parts: str) -> pa.Table:
    # use_threads=False: Arrow's thread pool next to Beam's can abort the interpreter at exit
    return pq.read_table(io.BytesIO(_read(FileSystems.join(out, *parts))), use_threads=False)


def _check_tables(report: Report, out: str, records: dict[str, tuple[str, dict]]) -> set[str]:
    images = _table(out, "index", "images.parquet")
    regions = _table(out, "index", "regions.parquet")
    failures = _table(out, "failures", "failures.parquet")
    for table, schema, name in ((images, IMAGES_SCHEMA, "index/images.parquet"),
                                (regions, REGIONS_SCHEMA, "index/regions.parquet"),
                                (failures, FAILURES_SCHEMA, "failures/failures.parquet")):
        if table.schema.remove_metadata() != schema.remove_metadata():
            report.add(name, f"schema differs from the expected one:\n{table.schema}")
    indexed = {(r["key"], r["shard"]) for r in images.to_pylist()}
    expected = {(k, f"{shard}") for k, (shard, _) in records.items()}
    for key, shard in sorted(expected - indexed)[:20]:
        report.add("index/images.parquet", f"no row for '{key}' in {shard}")
    for key, shard in sorted(indexed - expected)[:20]:
        report.add("index/images.parquet", f"row for '{key}' in {shard}, which has no such sample")
    per_key = Counter(regions.column("key").to_pylist())
    for key, (_, record) in records.items():
        if per_key.get(key, 0) != len(record["regions"]):
            report.add("index/regions.parquet", f"'{key}' has {per_key.get(key, 0)} rows, record has "
                                                f"{len(record['regions'])} regions")
    failed = {r["key"] for r in failures.to_pylist() if r["region_id"] is None}
    for key in sorted(failed & set(records))[:20]:
        report.add("failures/failures.parquet", f"'{key}' is both a record and a failed input")
    return failed


def validate(out: str) -> Report:
    """Validate a dataset directory (any Beam filesystem path)."""
    report = Report()
    try:
        manifest = json.loads(_read(FileSystems.join(out, "manifest.json")))
    except Exception as exc:
        report.add("manifest.json", f"missing or unreadable ({exc})")
        return report
    records: dict[str, tuple[str, dict]] = {}
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    try:
        present = {m.path.rsplit("/", 1)[-1] for m in
                   FileSystems.match([FileSystems.join(out, "shards", "*")])[0].metadata_list}
    except Exception:
        present = set()
    for extra in sorted(present - set(listed)):
        report.add("shards/", f"'{extra}' is not listed in manifest.json")
    for name, entry in sorted(listed.items()):
        try:
            data = _read(FileSystems.join(out, "shards", name))
        except Exception as exc:
            report.add(f"shards/{name}", f"listed in manifest.json but unreadable ({exc})")
            continue
        report.shards += 1
        if hashlib.sha256(data).hexdigest() != entry.get("sha256") or len(data) != entry.get("size"):
            report.add(f"shards/{name}", "sha256/size differ from manifest.json")
        shard_records = check_shard(report, f"shards/{name}", data)
        if len(shard_records) != entry.get("samples"):
            report.add(f"shards/{name}", f"{len(shard_records)} samples, manifest says {entry.get('samples')}")
        for key, record in shard_records.items():
            if key in records:
                report.add(f"shards/{name}", f"key '{key}' also in {records[key][0]}")
            records[key] = (name, record)
            report.regions += len(record.get("regions", []))
    report.samples = len(records)
    try:
        failed = _check_tables(report, out, records)
    except Exception as exc:
        report.add("index/failures", f"unreadable ({exc})")
        return report
    counts = manifest.get("counts", {})
    if counts.get("written") != len(records):
        report.add("manifest.json", f"counts.written={counts.get('written')} but shards hold {len(records)}")
    if counts.get("failed") != len(failed):
        report.add("manifest.json", f"counts.failed={counts.get('failed')} but failures hold {len(failed)} inputs")
    if counts.get("inputs") != len(records) + len(failed):
        report.add("manifest.json", f"counts.inputs={counts.get('inputs')} != written {len(records)} "
                                    f"+ failed {len(failed)}: an input is unaccounted for")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: validate OUTPUT; exit 1 on problems."""
    parser = argparse.ArgumentParser(description="Validate a built dataset against schema v1.")
    parser.add_argument("output")
    parser.add_argument("--max-errors", type=int, default=50)
    args = parser.parse_args(argv)
    report = validate(args.output)
    print(report.text(args.max_errors))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
