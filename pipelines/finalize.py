"""The build's totals: shard stats summed in the pipeline (``SummaryFn`` → ``_work/summary.json``),
then the manifest, the dataset card and the summary printed at the end — all from that one small
file, never from loading the index on the driver."""
from __future__ import annotations

import json
import platform
from collections import Counter
from importlib import metadata
from typing import Any, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines import card, cost
from pipelines import layout as lay
from pipelines.config import PIPELINE_VERSION, PipelineConfig, mask_secrets
from pipelines.cost import STAGES
from pipelines.writer import read_json
from schemas import SCHEMA_VERSION

_PACKAGES = ("apache-beam", "numpy", "pillow", "pyarrow", "webdataset", "pycocotools",
             "scikit-image", "jsonschema", "torch", "segment-anything", "openai")
_SUMMED = ("inputs", "written", "failed", "transient", "images_without_masks", "caption_chars",
           "region_long_caption_chars")
_COUNTERS = ("failed_by_reason", "failed_by_class", "region_failures_by_reason", "regions_by_level",
             "regions_dropped_by_reason", "timings", "transient_by_where")
VANISHED_SHOWN = 20


class SummaryFn(beam.CombineFn):
    """("shard" | "old_shard", stats), ("inputs", 1), ("vanished", member), ("pruned", shard) →
    one summary. A shard written by this run replaces its older stats."""

    def create_accumulator(self) -> dict[str, Any]:
        return {"shards": {}, "old": {}, "inputs": 0, "vanished": 0, "vanished_keys": [], "pruned": []}

    def add_input(self, acc: dict[str, Any], element: tuple[str, Any]) -> dict[str, Any]:
        kind, value = element
        if kind == "shard":
            acc["shards"][value["shard"]] = value
        elif kind == "old_shard":
            acc["old"][value["shard"]] = value
        elif kind == "inputs":
            acc["inputs"] += value
        elif kind == "vanished":
            acc["vanished"] += 1
            acc["vanished_keys"] = sorted(acc["vanished_keys"] + [value["key"]])[:VANISHED_SHOWN]
        elif kind == "pruned":
            acc["pruned"].append(value)
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict[str, Any]]) -> dict[str, Any]:
        merged = self.create_accumulator()
        for acc in accumulators:
            merged["shards"].update(acc["shards"])
            merged["old"].update(acc["old"])
            merged["inputs"] += acc["inputs"]
            merged["vanished"] += acc["vanished"]
            merged["vanished_keys"] = sorted(merged["vanished_keys"] + acc["vanished_keys"])[:VANISHED_SHOWN]
            merged["pruned"] += acc["pruned"]
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        pruned = set(acc["pruned"])
        shards = {k: v for k, v in acc["old"].items() if k not in pruned}
        shards.update(acc["shards"])
        return {"shards": dict(sorted(shards.items())), "new_shards": sorted(acc["shards"]),
                "inputs": acc["inputs"], "vanished": acc["vanished"],
                "vanished_keys": acc["vanished_keys"], "pruned": sorted(pruned)}


def write_summary(summary: dict[str, Any], out: str) -> None:
    """The pipeline's last step: its totals, for the driver."""
    lay.write_atomic(lay.summary_path(out), json.dumps(summary, sort_keys=True).encode())


def _delete(paths: list[str]) -> None:
    present = [p for p in paths if FileSystems.exists(p)]
    if present:
        FileSystems.delete(present)


def delete_shard(shard: str, out: str) -> None:
    """Remove a shard and everything written for it (``--prune-vanished``)."""
    _delete([lay.work_path(out, shard, "stats.json"), lay.shard_path(out, shard),
             lay.index_path(out, "images", shard), lay.index_path(out, "regions", shard),
             lay.index_path(out, "failures", shard), lay.work_path(out, shard, "members.parquet")])


def delete_build(out: str) -> None:
    """Remove a whole build (``--overwrite`` with other settings)."""
    _delete([lay.join(out, name) for name in
             ("shards", "index", "failures", lay.WORK_DIR, "manifest.json", "README.md", "plots",
              "wids-index.json", "preview")])


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the output."""
    out = {"python": platform.python_version(), "pipeline": PIPELINE_VERSION}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def totals(summary: dict[str, Any]) -> dict[str, Any]:
    """Counts over all shards of the build (complete ones, and those waiting for a retry), and
    their costs per stage (earlier runs' shards keep theirs: their stats.json holds them)."""
    shards = summary["shards"].values()
    out: dict[str, Any] = {name: sum(st.get(name, 0) for st in shards) for name in _SUMMED}
    for name in _COUNTERS:
        total: Counter = Counter()
        for st in shards:
            total.update(st.get(name, {}))
        out[name] = dict(sorted(total.items()))
    # shards written before costs were recorded have none: averages are over the others
    measured = [st for st in shards if "costs" in st]
    out["costs"] = cost.summed(st["costs"] for st in measured)
    timings: Counter = Counter()
    for st in measured:
        timings.update(st.get("timings", {}))
    out["cost_timings"] = dict(timings)
    out["cost_inputs"] = sum(st["inputs"] for st in measured)
    out["cost_regions"] = sum(sum(st.get("regions_by_level", {}).values()) for st in measured)
    return out


def finalize(out: str, input_spec: str, config: PipelineConfig, provenance: dict[str, Any],
             seconds: float, counters: dict[str, int] | None = None) -> dict[str, Any]:
    """manifest.json and README.md from the pipeline's summary."""
    summary = read_json(lay.summary_path(out))
    t = totals(summary)
    complete = [st for st in summary["shards"].values() if st["complete"]]
    incomplete = sorted(name for name, st in summary["shards"].items() if not st["complete"])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "dataset_name": config.dataset_name,
        "input": input_spec,
        "settings_hash": config.settings_hash(),
        "settings": mask_secrets(config.to_dict()),
        "annotators": mask_secrets(provenance),
        "counts": {
            "inputs": summary["inputs"],
            "in_shards": t["inputs"],
            "written": sum(st["written"] for st in complete),
            "failed": sum(st["failed"] for st in complete),
            "awaiting_retry": t["transient"],
            "transient_by_where": t["transient_by_where"],
            "held": sum(st["written"] + st["failed"] for st in summary["shards"].values()
                        if not st["complete"]),
            "failed_by_reason": t["failed_by_reason"],
            "failed_by_class": t["failed_by_class"],
            "region_failures_by_reason": t["region_failures_by_reason"],
            "regions_by_level": t["regions_by_level"],
            "regions_dropped_by_reason": t["regions_dropped_by_reason"],
            "images_without_masks": t["images_without_masks"],
            "vanished": summary["vanished"],
        },
        "means": {
            "image_caption_chars": round(t["caption_chars"] / max(t["written"], 1), 1),
            "region_long_caption_chars": round(
                t["region_long_caption_chars"] / max(sum(t["regions_by_level"].values()), 1), 1),
        },
        "vanished_keys": summary["vanished_keys"],
        "pruned_shards": summary["pruned"],
        "incomplete_shards": incomplete,
        "shards": [st["tar"] for st in complete if st["tar"]],
        "shards_this_run": len(summary["new_shards"]),
        "seconds_per_stage": {s: round(t["timings"].get(s, 0.0), 3) for s in STAGES},
        "cost": cost.section(t["costs"], t["cost_timings"], t["cost_inputs"], t["cost_regions"]),
        "seconds_wall": round(seconds, 2),
        "beam_counters_this_run": counters or {},
        "versions": versions(),
    }
    # text statistics for the card: read column by column from the per-shard index files
    manifest["stats"] = card.dataset_stats(out)
    with FileSystems.create(FileSystems.join(out, "manifest.json")) as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    card.write(out, manifest)   # README.md, plots/*.png, wids-index.json
    _clean_temporaries(out)
    return manifest | {"output": out}


def run_problem(manifest: dict[str, Any]) -> str | None:
    """Why a finished run must exit non-zero, or None."""
    c = manifest["counts"]
    if c["inputs"] == 0:
        return f"--input: no images found at '{manifest['input']}'"
    kept_vanished = 0 if manifest["pruned_shards"] else c["vanished"]
    if c["inputs"] + kept_vanished != c["in_shards"]:
        return (f"accounting error: {c['inputs']} inputs (+{kept_vanished} vanished) but "
                f"{c['in_shards']} in shards; rerun the same command")
    if c["written"] == 0 and c["awaiting_retry"] == 0 and c["failed"] > 0:
        top = ", ".join(f"{k} {v}" for k, v in sorted(c["failed_by_reason"].items(),
                                                     key=lambda kv: -kv[1])[:3])
        return f"no records written: all {c['failed']} inputs failed ({top})"
    if c["written"] == 0 and c["awaiting_retry"] > 0:
        top = "; ".join(f"{k} ×{v}" for k, v in sorted(c["transient_by_where"].items(),
                                                       key=lambda kv: -kv[1])[:3])
        return (f"no records written: {c['awaiting_retry']} inputs failed transiently ({top}); "
                f"fix the infrastructure and rerun the same command")
    return None


def _clean_temporaries(out: str) -> None:
    """Temporary files left by killed workers (never under a final name), and progress files."""
    _delete([lay.join(out, lay.WORK_DIR, "progress")])
    try:
        leftovers = FileSystems.match([FileSystems.join(out, "shards", "*.tmp-*")])[0].metadata_list
    except Exception:
        return
    if leftovers:
        FileSystems.delete([m.path for m in leftovers])


def cost_line(section: dict[str, Any]) -> str:
    """One line of what the build cost per image (CPU, GPU, model calls and tokens)."""
    per = section["per_image"]
    if not per:
        return "cost: nothing measured"
    top = sorted(((s, v["cpu_s"]) for s, v in section["stages"].items() if v["cpu_s"]),
                 key=lambda kv: -kv[1])[:3]
    n = max(section["images"], 1)
    line = (f"cost per image: CPU {per['cpu_s']:.3f} s ("
            + ", ".join(f"{s} {v / n:.3f}" for s, v in top) + f"), GPU {per['gpu_s']:.3f} s")
    c = section["caption"]
    if c["calls"]:
        line += (f"; model calls {per['calls']:.1f} ({c['failed_calls']} of {c['calls']} failed), "
                 f"tokens {per['prompt_tokens']:.0f} prompt + {per['completion_tokens']:.0f} "
                 f"completion")
        if c["calls_without_usage"]:
            line += f" ({c['calls_without_usage']} calls reported no usage)"
    return line


def summary(manifest: dict[str, Any]) -> str:
    """Human summary printed at the end of a build."""
    c = manifest["counts"]
    lines = [f"dataset written to {manifest.get('output', '?')}",
             f"  inputs {c['inputs']}, records written {c['written']}, inputs failed {c['failed']}, "
             f"awaiting retry {c['awaiting_retry']}; shards {len(manifest['shards'])} complete "
             f"({manifest['shards_this_run']} written by this run)"]
    for title, table in (("failures by reason", c["failed_by_reason"]),
                         ("failures by class", c["failed_by_class"]),
                         ("region failures by reason", c["region_failures_by_reason"]),
                         ("regions by level", c["regions_by_level"]),
                         ("candidate regions dropped", c["regions_dropped_by_reason"])):
        if table:
            lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in table.items()))
    if manifest["incomplete_shards"]:
        lines.append(f"  {len(manifest['incomplete_shards'])} shard(s) wait for {c['awaiting_retry']} "
                     f"input(s) that failed transiently: rerun the same command to complete them")
    if c["vanished"]:
        lines.append(f"  {c['vanished']} input(s) written earlier are no longer in --input (e.g. "
                     f"{', '.join(manifest['vanished_keys'][:5])}); they stay unless you rerun "
                     f"with --prune-vanished")
    lines.append("  seconds per stage (summed over images): " + ", ".join(
        f"{k} {v:.2f}" for k, v in manifest["seconds_per_stage"].items() if v))
    lines.append("  " + cost_line(manifest["cost"]))
    lines.append(f"  wall time {manifest['seconds_wall']:.1f} s; validate with: make validate "
                 f"OUTPUT={manifest.get('output', '?')}")
    return "\n".join(lines)
