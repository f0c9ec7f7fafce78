"""Where things live under OUT, and which shard an input belongs to.

An input's shard depends only on its key and on which shards were already complete when it first
arrived — never on the position of other inputs:

* ``bucket = H(key) mod B``, with ``B`` fixed by the first run (``ceil(inputs / samples_per_shard)``,
  counted inside the pipeline) and kept in ``_work/layout.json``;
* the shard is ``(bucket, generation)`` where the generation is the bucket's first one that is
  not complete. A first run writes generation 0; a rerun over an input that grew puts the new keys
  of a complete bucket into generation 1, 2, … — new shards, the complete ones untouched.

Shard names: ``{split}-{bucket:06d}`` for generation 0, ``{split}-{bucket:06d}-{generation:03d}``
after. Same inputs + settings → same members per shard → byte-identical tars, whatever the runner,
the number of workers, or a kill and resume.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems

WORK_DIR = "_work"
LAYOUT_VERSION = 1


def bucket_of(key: str, buckets: int) -> int:
    """Stable bucket of a key (same on every machine and Python; not Python's hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % buckets


def bucket_count(inputs: int, samples_per_shard: int) -> int:
    """Buckets for a first run over ``inputs`` inputs."""
    return max(1, math.ceil(inputs / samples_per_shard))


def shard_name(split: str, bucket: int, generation: int) -> str:
    """Name of a shard (no extension)."""
    return f"{split}-{bucket:06d}" if generation == 0 else f"{split}-{bucket:06d}-{generation:03d}"


def parse_shard(split: str, name: str) -> tuple[int, int] | None:
    """(bucket, generation) of a shard name of this split, or None."""
    match = re.fullmatch(re.escape(split) + r"-(\d{6})(?:-(\d{3}))?", name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def next_generations(split: str, complete: list[str]) -> dict[int, int]:
    """bucket → the generation new inputs of that bucket go to (given the complete shards)."""
    out: dict[int, int] = {}
    for name in complete:
        parsed = parse_shard(split, name)
        if parsed is not None:
            bucket, generation = parsed
            out[bucket] = max(out.get(bucket, 0), generation + 1)
    return out


def join(out: str, *parts: str) -> str:
    """A path under OUT."""
    return FileSystems.join(out, *parts)


def shard_path(out: str, shard: str) -> str:
    """Final path of a shard tar."""
    return join(out, "shards", f"{shard}.tar")


def work_path(out: str, shard: str, name: str) -> str:
    """A shard's working file (members, stats marker, staged outcomes)."""
    return join(out, WORK_DIR, shard, name)


def index_path(out: str, table: str, shard: str) -> str:
    """Per-shard parquet file of ``images``, ``regions`` or ``failures``."""
    if table == "failures":
        return join(out, "failures", f"{shard}.parquet")
    return join(out, "index", table, f"{shard}.parquet")


def layout_path(out: str) -> str:
    """The file that fixes the bucket count and the settings of a build."""
    return join(out, WORK_DIR, "layout.json")


def summary_path(out: str) -> str:
    """The pipeline's streamed aggregate of all shard stats (read by the driver)."""
    return join(out, WORK_DIR, "summary.json")


@dataclass(frozen=True)
class Layout:
    """What a build's first run fixed."""

    buckets: int
    split: str
    settings_hash: str

    def to_json(self) -> bytes:
        """Canonical bytes of layout.json."""
        return json.dumps({"buckets": self.buckets, "split": self.split,
                           "settings_hash": self.settings_hash, "layout_version": LAYOUT_VERSION},
                          sort_keys=True, indent=1).encode()


def read_layout(out: str) -> Layout | None:
    """The build's layout, or None when OUT holds no build yet."""
    path = layout_path(out)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        data: dict[str, Any] = json.loads(handle.read())
    return Layout(int(data["buckets"]), str(data["split"]), str(data["settings_hash"]))


def write_atomic(path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a final name only ever holds whole files."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_layout_once(out: str, layout: Layout) -> None:
    """layout.json, written by whichever worker writes first (all write the same bytes)."""
    if not FileSystems.exists(layout_path(out)):
        write_atomic(layout_path(out), layout.to_json())
