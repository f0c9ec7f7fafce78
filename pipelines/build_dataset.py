"""Build a multi-granularity image–text dataset: the whole flow, left to right.

    ReadImages → DropDuplicates → DecodeImages → Segment → SelectRegions → RenderPrompts
    → Caption → Assemble → WriteShards            (+ every stage's failures → failures table)

Usage:
    python -m pipelines.build_dataset --input samples --output out/dataset [--config cfg.yaml]
        [--workers N] [any Apache Beam flag, e.g. --runner=DataflowRunner --project=...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from annotators.base import ConfigError
from annotators.registry import build_captioner, build_segmenter
from pipelines import finalize, sources, stages, writer
from pipelines.config import PIPELINE_VERSION, PipelineConfig, load_config
from pipelines.types import ImageRef

LOG = logging.getLogger("build_dataset")


class WriteShards(beam.PTransform):
    """Outcomes (records and failures) → one tar + parts per shard, grouped by shard name."""

    def __init__(self, output: str, settings_hash: str) -> None:
        super().__init__()
        self.output = output
        self.settings_hash = settings_hash

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        output, settings_hash = self.output, self.settings_hash
        return (outcomes
                | "ByShard" >> beam.Map(lambda o: (o.shard, o))
                | "GroupShards" >> beam.GroupByKey()
                | "Write" >> beam.MapTuple(
                    lambda shard, items: writer.write_shard(output, shard, items, settings_hash)))


class FindDuplicates(beam.PTransform):
    """(sha256, key) of every read input, plus those of already complete shards → AsDict-able
    (loser key, keeper key) pairs: the smallest key of each sha256 keeps the image."""

    def __init__(self, known_hashes: dict[str, str], enabled: bool) -> None:
        super().__init__()
        self.known = sorted((h, k) for k, h in known_hashes.items())
        self.enabled = enabled

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        if not self.enabled:
            return items.pipeline | "NoDedup" >> beam.Create([])
        new = items | "Hashes" >> beam.Map(lambda i: (i.sha256, i.ref.key))
        old = items.pipeline | "KnownHashes" >> beam.Create(self.known)
        return ((new, old) | "AllHashes" >> beam.Flatten()
                | "BySha" >> beam.GroupByKey()
                | "Losers" >> beam.FlatMap(stages.duplicate_losers))


def build(pipeline: beam.Pipeline, refs: list[ImageRef], config: PipelineConfig, output: str,
          known_hashes: dict[str, str], provenance: dict[str, Any]) -> None:
    """Add the dataset flow for ``refs`` to ``pipeline``."""
    rejected: list[beam.PCollection] = []

    def stage(items: beam.PCollection, name: str, dofn: beam.DoFn, *side: Any) -> beam.PCollection:
        out = items | name >> beam.ParDo(dofn, *side).with_outputs(stages.FAILED, main="ok")
        rejected.append(out[stages.FAILED])
        return out.ok

    def batches(size: int) -> beam.BatchElements:
        return beam.BatchElements(min_batch_size=1, max_batch_size=size)

    items = pipeline | "Inputs" >> beam.Create(refs, reshuffle=True)
    items = stage(items, "ReadImages", stages.ReadImages(config))
    losers = items | "FindDuplicates" >> FindDuplicates(known_hashes, config.decode.dedup)
    items = stage(items, "DropDuplicates", stages.DropDuplicates(), beam.pvalue.AsDict(losers))
    items = stage(items, "DecodeImages", stages.DecodeImages(config))
    items = stage(items | "BatchForSegment" >> batches(config.batch.segment), "Segment", stages.Segment(config))
    items = stage(items, "SelectRegions", stages.SelectRegions(config))
    items = stage(items, "RenderPrompts", stages.RenderPrompts(config))
    items = stage(items | "BatchForCaption" >> batches(config.batch.caption), "Caption", stages.Caption(config))
    records = items | "Assemble" >> beam.ParDo(stages.Assemble(config, PIPELINE_VERSION, provenance["segmenter"]))
    failures = (rejected | "AllFailures" >> beam.Flatten()
                | "FailureOutcomes" >> beam.Map(stages.failure_outcome))
    ((records, failures)
     | "Outcomes" >> beam.Flatten()
     | "WriteShards" >> WriteShards(output, config.settings_hash()))


def beam_counters(result: Any) -> dict[str, int]:
    """This run's Beam counters ("namespace/name" → value); empty where the runner has none."""
    try:
        query = result.metrics().query()
    except Exception:   # some runners do not report metrics
        return {}
    out: dict[str, int] = {}
    for counter in query.get("counters", []):
        name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        out[name] = out.get(name, 0) + int(value or 0)
    return dict(sorted(out.items()))


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="samples",
                        help="directory | glob | manifest (.jsonl/.csv/.parquet) | .tar shards | "
                             "samples | synthetic://N (default: samples)")
    parser.add_argument("--output", default="out/dataset", help="output directory (any Beam filesystem path)")
    parser.add_argument("--config", default=None, help="YAML settings (default: embedded defaults)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local worker processes (local runner only; default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an output that holds a build with other settings (its shards are replaced)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_known_args(argv)


def pipeline_options(beam_args: list[str], workers: int) -> PipelineOptions:
    """Beam options from the user's flags; local default: the pure-Python FnApiRunner."""
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "FnApiRunner"   # skips the Prism download that DirectRunner tries first
    if workers > 1 and standard.runner in ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner"):
        direct = options.view_as(DirectOptions)
        direct.direct_running_mode = "multi_processing"
        direct.direct_num_workers = workers
    return options


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the dataset; returns the manifest. Raises ConfigError before any work on bad settings."""
    args, beam_args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    config = load_config(args.config)
    refs = sources.assign_shards(sources.enumerate_inputs(args.input), config.shards.samples_per_shard,
                                 config.shards.split)
    done = finalize.completed_shards(args.output, refs, config.settings_hash(), args.overwrite)
    pending = [r for r in refs if r.shard not in done]
    known = {k: h for stats in done.values() for k, h in stats["hashes"].items()}
    LOG.info("%d inputs in %d shards; %d shards already complete", len(refs),
             len({r.shard for r in refs}), len(done))
    provenance = {"segmenter": build_segmenter(config.segmenter).provenance(),
                  "captioner": build_captioner(config.captioner).provenance()}
    start = time.perf_counter()
    counters: dict[str, int] = {}
    if pending:
        try:
            pipeline = beam.Pipeline(options=pipeline_options(beam_args, args.workers))
            build(pipeline, pending, config, args.output, known, provenance)
            result = pipeline.run()
            result.wait_until_finish()
            counters = beam_counters(result)
        finally:   # managed model servers started by in-process workers never outlive the run
            from annotators import managed_server

            managed_server.stop_all()
    manifest = finalize.finalize(args.output, args.input, refs, config, provenance,
                                 time.perf_counter() - start, resumed=len(done), counters=counters)
    return manifest


def main() -> int:
    """Command-line entry point: prints the summary, exit 2 on bad settings."""
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(finalize.summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
