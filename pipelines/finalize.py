"""After the pipeline: merge per-shard parts into the index and failures tables, write the
manifest and the dataset card, and summarise the build."""
from __future__ import annotations

import io
import json
import platform
from collections import Counter
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from annotators.base import ConfigError
from pipelines import card, writer
from pipelines.config import PIPELINE_VERSION, PipelineConfig
from pipelines.types import ImageRef
from schemas import FAILURES_SCHEMA, IMAGES_SCHEMA, REGIONS_SCHEMA, SCHEMA_VERSION

STAGES = ("read", "decode", "segment", "select_regions", "render_prompts", "caption", "assemble")
_PACKAGES = ("apache-beam", "numpy", "pillow", "pyarrow", "webdataset", "pycocotools",
             "scikit-image", "jsonschema", "torch", "segment-anything", "openai")


def completed_shards(out: str, refs: list[ImageRef], settings_hash: str,
                     overwrite: bool) -> dict[str, dict[str, Any]]:
    """Shards already complete under ``out`` with the same settings (to be skipped)."""
    done = {}
    for shard in sorted({r.shard for r in refs}):
        stats = writer.read_stats(out, shard)
        if stats is None:
            continue
        if stats["settings_hash"] != settings_hash:
            if overwrite:
                continue
            raise ConfigError(f"--output: '{out}' holds shards built with other settings "
                              f"(settings hash {stats['settings_hash']} != {settings_hash}); use a new "
                              f"--output, or --overwrite to rebuild them")
        done[shard] = stats
    return done


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the output."""
    out = {"python": platform.python_version(), "pipeline": PIPELINE_VERSION}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_table(path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())


def _merge(out: str, shards: list[str], name: str, schema: pa.Schema, sort: list[str]) -> pa.Table:
    tables = [writer.read_parts(out, shard, name).cast(schema) for shard in shards]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return table.sort_by([(c, "ascending") for c in sort]) if table.num_rows else table


def finalize(out: str, input_spec: str, refs: list[ImageRef], config: PipelineConfig,
             provenance: dict[str, Any], seconds: float, resumed: int = 0,
             counters: dict[str, int] | None = None) -> dict[str, Any]:
    """Write index/, failures/, manifest.json and README.md from the completed shards."""
    shards = sorted({r.shard for r in refs})
    stats = {s: writer.read_stats(out, s) for s in shards}
    missing = [s for s, st in stats.items() if st is None]
    if missing:
        raise RuntimeError(f"shards not completed by the pipeline: {missing[:5]}")
    images = _merge(out, shards, "images", IMAGES_SCHEMA, ["key"])
    regions = _merge(out, shards, "regions", REGIONS_SCHEMA, ["key", "region_id"])
    failures = _merge(out, shards, "failures", FAILURES_SCHEMA, ["key", "stage", "reason"])
    _write_table(FileSystems.join(out, "index", "images.parquet"), images)
    _write_table(FileSystems.join(out, "index", "regions.parquet"), regions)
    _write_table(FileSystems.join(out, "failures", "failures.parquet"), failures)
    rows = failures.to_pylist()
    input_failures = [r for r in rows if r["region_id"] is None]
    timings: Counter = Counter()
    dropped: Counter = Counter()
    for st in stats.values():
        timings.update(st["timings"])
        dropped.update(st.get("regions_dropped", {}))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "dataset_name": config.dataset_name,
        "input": input_spec,
        "settings_hash": config.settings_hash(),
        "settings": config.to_dict(),
        "annotators": provenance,
        "counts": {
            "inputs": len(refs),
            "written": images.num_rows,
            "failed": len({r["key"] for r in input_failures}),
            "failed_by_reason": dict(sorted(Counter(f"{r['stage']}/{r['reason']}" for r in input_failures).items())),
            "region_failures_by_reason": dict(sorted(Counter(
                f"{r['stage']}/{r['reason']}" for r in rows if r["region_id"] is not None).items())),
            "regions_by_level": dict(sorted(Counter(regions.column("level").to_pylist()).items())),
            "regions_dropped_by_reason": dict(sorted(dropped.items())),
            "images_without_masks": sum(1 for n in images.column("n_pixel").to_pylist() if n == 0),
        },
        "shards": [dict(st["tar"], samples=st["samples"]) for st in stats.values() if st["tar"]],
        "seconds_per_stage": {s: round(timings.get(s, 0.0), 3) for s in STAGES},
        "seconds_wall": round(seconds, 2),
        "resumed_shards": resumed,
        "beam_counters_this_run": counters or {},
        "versions": versions(),
    }
    with FileSystems.create(FileSystems.join(out, "manifest.json")) as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    with FileSystems.create(FileSystems.join(out, "README.md")) as handle:
        handle.write(card.render(manifest, images, regions).encode())
    _clean_temporaries(out)
    return manifest | {"output": out}


def _clean_temporaries(out: str) -> None:
    """Temporary files left by killed workers (never under a final name)."""
    try:
        leftovers = FileSystems.match([FileSystems.join(out, "shards", "*.tmp-*")])[0].metadata_list
    except Exception:
        return
    if leftovers:
        FileSystems.delete([m.path for m in leftovers])


def summary(manifest: dict[str, Any]) -> str:
    """Human summary printed at the end of a build."""
    c = manifest["counts"]
    lines = [f"dataset written to {manifest.get('output', '?')}",
             f"  inputs {c['inputs']}, records written {c['written']}, inputs failed {c['failed']}, "
             f"shards {len(manifest['shards'])} (resumed {manifest['resumed_shards']})"]
    for title, table in (("failures by reason", c["failed_by_reason"]),
                         ("region failures by reason", c["region_failures_by_reason"]),
                         ("regions by level", c["regions_by_level"]),
                         ("candidate regions dropped", c["regions_dropped_by_reason"])):
        if table:
            lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in table.items()))
    lines.append("  seconds per stage (summed over images): " + ", ".join(
        f"{k} {v:.2f}" for k, v in manifest["seconds_per_stage"].items() if v))
    lines.append(f"  wall time {manifest['seconds_wall']:.1f} s; validate with: make validate "
                 f"OUTPUT={manifest.get('output', '?')}")
    return "\n".join(lines)
