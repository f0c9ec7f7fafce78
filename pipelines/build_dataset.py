"""Build a multi-granularity image–text dataset: the whole flow, left to right.

    ReadInputs → PlanInputs → DropDuplicates → ReadImages → DecodeImages → Segment
    → SelectRegions → RenderPrompts → Caption → [CheckConsistency] → Assemble → FailureBudget
    → WriteShards
                                                     (+ every stage's failures → failures table)

Inputs are read by workers; PlanInputs skips what earlier runs settled and gives each new input a
shard from its key alone (see pipelines/layout.py), so reruns only add shards. Shard stats are
summed in the pipeline into ``_work/summary.json``, from which the driver writes the manifest.

Usage:
    python -m pipelines.build_dataset --input samples --output out/dataset [--config cfg.yaml]
        [--workers N] [--prune-vanished] [any Apache Beam flag, e.g. --runner=DataflowRunner ...]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from settings import ConfigError
from annotators.registry import build_captioner, build_segmenter
from pipelines import finalize, progress, stages, writer
from pipelines import layout as lay
from pipelines.budget import MARKER, BudgetExceeded, FailureBudget
from pipelines.config import PIPELINE_VERSION, PipelineConfig, load_config, mask_secrets
from pipelines.plan import DropDuplicates, PlanInputs
from pipelines.sources import ReadInputs

LOG = logging.getLogger("build_dataset")
EXAMPLES = """examples:
  python -m pipelines.build_dataset --input photos/ --output out/ds
  python -m pipelines.build_dataset --input 'manifests/part-*.jsonl' --output out/ds --config sam.yaml --workers 2
  python -m pipelines.build_dataset --input samples --print-config
  python -m pipelines.build_dataset --input gs://b/images --output gs://b/out --config sam.yaml \\
      --runner=DataflowRunner --project=P --region=us-central1 --temp_location=gs://b/tmp --setup_file=./setup.py

Rerunning the same command continues a build: only new inputs and inputs whose failure was
transient are processed. Exit status: 0 done, 1 the run failed (failure budget, nothing written),
2 bad settings. Any other flag is an Apache Beam pipeline option."""
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "PortableRunner")


class RunFailed(RuntimeError):
    """The run finished or stopped without a usable dataset (non-zero exit)."""


@dataclass
class Plan:
    """What the driver decided before any work: settings, layout, output."""

    input_spec: str
    output: str
    config: PipelineConfig
    layout: lay.Layout | None     # None on a first run: the pipeline counts the inputs
    provenance: dict[str, Any]
    run_id: str
    prune: bool


class WriteShards(beam.PTransform):
    """Outcome branches → staged files → one shard written per shard name (only names are
    grouped)."""

    def __init__(self, plan: Plan, buckets: beam.PCollection, unfinished: beam.PCollection) -> None:
        super().__init__()
        self.plan, self.buckets, self.unfinished = plan, buckets, unfinished

    def expand(self, branches: tuple[beam.PCollection, ...]) -> beam.PCollection:
        plan = self.plan
        out, settings_hash, split = plan.output, plan.config.settings_hash(), plan.config.shards.split

        def write(grouped: tuple[str, Any], buckets: int) -> dict[str, Any]:
            return writer.write_shard(out, grouped[0], settings_hash, lay.Layout(buckets, split, settings_hash))

        # Each branch is staged where it is made (a Flatten before staging would make a local
        # runner hold every image in memory); only (shard, file name) pairs are flattened.
        staged = [branch | f"Stage{i}" >> beam.ParDo(writer.StageOutcomes(out, plan.run_id))
                  for i, branch in enumerate(branches)]
        return ((*staged, self.unfinished) | "AllShardWork" >> beam.Flatten()
                | "GroupShards" >> beam.GroupByKey()
                | "Write" >> beam.Map(write, beam.pvalue.AsSingleton(self.buckets)))


class Stages:
    """Adds the pipeline's stages; each stage's ``failed`` output is kept for the writer."""

    def __init__(self) -> None:
        self.rejected: list[beam.PCollection] = []

    def __call__(self, items: beam.PCollection, name: str, dofn: beam.DoFn) -> beam.PCollection:
        out = items | name >> beam.ParDo(dofn).with_outputs(stages.FAILED, main="ok")
        self.rejected.append(out[stages.FAILED])
        return out.ok

    @staticmethod
    def batches(size: int) -> beam.BatchElements:
        """Batches of ``size`` elements (fewer at the end of a bundle). A fixed size: Beam's
        adaptive sizing fits a regression over past batches before every batch (~0.2 ms per image
        at these sizes, as much as a stage's own work around the models), only to grow towards
        the same maximum."""
        return beam.BatchElements(min_batch_size=size, max_batch_size=size)


def outcomes(captioned: beam.PCollection, stage: Stages,
             plan: Plan) -> tuple[beam.PCollection, beam.PCollection]:
    """Captioned items → (records, failures) as the writer takes them: the consistency filter if
    configured, Assemble and the failure budget; every stage's failures; both counted."""
    config = plan.config
    if config.consistency is not None:
        captioned = stage(captioned, "CheckConsistency", stages.CheckConsistency(config))
    limits = config.limits
    # The budget watches the model stages' outcomes where they are made (fused with Caption), so a
    # dead server stops the run after a few batches, not after every input has failed.
    records = (captioned | "Assemble" >> beam.ParDo(stages.Assemble(config, PIPELINE_VERSION, plan.provenance["segmenter"]))
               | "FailureBudget" >> beam.ParDo(FailureBudget(
                   limits.max_transient_fraction, limits.min_samples, limits.window)))
    failures = (stage.rejected | "AllFailures" >> beam.Flatten()
                | "FailureOutcomes" >> beam.Map(stages.failure_outcome))
    records = records | "CountRecords" >> beam.ParDo(progress.CountProgress(plan.output, plan.run_id))
    failures = failures | "CountFailures" >> beam.ParDo(progress.CountProgress(plan.output, plan.run_id))
    return records, failures


def summarise(facts: list[beam.PCollection], output: str) -> None:
    """("shard" | "old_shard" | "inputs" | …, value) facts → ``_work/summary.json`` for the driver."""
    _ = (facts | "AllFacts" >> beam.Flatten()
         | "Summarise" >> beam.CombineGlobally(finalize.SummaryFn())
         | "WriteSummary" >> beam.Map(finalize.write_summary, output))


def build(pipeline: beam.Pipeline, plan: Plan) -> None:
    """Add the dataset flow to ``pipeline``."""
    config = plan.config
    stage = Stages()
    refs = pipeline | "ReadInputs" >> ReadInputs(plan.input_spec)
    planned = refs | "PlanInputs" >> PlanInputs(
        plan.output, config.shards.split, config.shards.samples_per_shard,
        plan.layout.buckets if plan.layout else None, plan.prune)
    stage.rejected.append(planned["failed"])
    new = planned["new"]
    if config.decode.dedup:
        kept = new | "DropDuplicates" >> DropDuplicates(planned["members"], config.decode.max_bytes)
        stage.rejected.append(kept["failed"])
        new = kept["ok"]
    items = stage(new | "Spread" >> beam.Reshuffle(), "ReadImages", stages.ReadImages(config))
    items = stage(items, "DecodeImages", stages.DecodeImages(config))
    items = stage(items | "BatchForSegment" >> stage.batches(config.batch.segment), "Segment", stages.Segment(config))
    items = stage(items, "SelectRegions", stages.SelectRegions(config))
    items = stage(items, "RenderPrompts", stages.RenderPrompts(config))
    items = stage(items | "BatchForCaption" >> stage.batches(config.batch.caption), "Caption", stages.Caption(config))
    records, failures = outcomes(items, stage, plan)
    _ = ((planned["new"], planned["failed"]) | "ThisRun" >> beam.Flatten()
         | "CountThisRun" >> beam.combiners.Count.Globally()
         | "WriteTotal" >> beam.Map(progress.write_total, plan.output, plan.run_id))
    unfinished = unfinished_shards(planned)
    written = (records, failures) | "WriteShards" >> WriteShards(plan, planned["buckets"], unfinished)
    if plan.prune:
        _ = planned["pruned"] | "DeletePruned" >> beam.Map(finalize.delete_shard, plan.output)
    summarise([written | "ShardFacts" >> beam.Map(lambda st: ("shard", st)),
               planned["complete"] | "OldShardFacts" >> beam.Map(lambda st: ("old_shard", st)),
               planned["present"] | "InputFacts" >> beam.Map(lambda n: ("inputs", n)),
               planned["vanished"] | "VanishedFacts" >> beam.Map(lambda m: ("vanished", m)),
               planned["pruned"] | "PrunedFacts" >> beam.Map(lambda s: ("pruned", s))], plan.output)


def unfinished_shards(planned: dict[str, beam.PCollection]) -> beam.PCollection:
    """(shard, None) for shards with settled members but no completion marker (a run stopped
    between the two): the writer finishes them even when no new input goes there."""
    return (planned["members"] | "MemberShards" >> beam.Map(lambda kv: kv[1]["shard"])
            | "DistinctMemberShards" >> beam.Distinct()
            | "NotComplete" >> beam.Filter(
                lambda shard, done: shard not in set(done),
                beam.pvalue.AsList(planned["complete"] | "CompleteNames" >> beam.Map(lambda st: st["shard"])))
            | "AsShardWork" >> beam.Map(lambda shard: (shard, None)))


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


def arg_parser() -> argparse.ArgumentParser:
    """The command-line options (the Airflow DAG lets a trigger pass only these and listed Beam flags)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="samples",
                        help="directory | glob | manifest(s) (.jsonl/.csv/.parquet, or a glob of them) | "
                             ".tar shards | samples | synthetic://N (default: samples)")
    parser.add_argument("--output", default="out/dataset", help="output directory (any Beam filesystem path)")
    parser.add_argument("--config", default=None, help="YAML settings (default: embedded defaults)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local worker processes (local runner only; default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="an output that holds a build with other settings is deleted and rebuilt")
    parser.add_argument("--prune-vanished", action="store_true",
                        help="rebuild the shards that hold inputs no longer in --input, without them "
                             "(default: report them and keep them)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (defaults filled in, secrets masked) and exit")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what every stage does")
    return parser


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    return arg_parser().parse_known_args(argv)


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


def prepare(argv: Sequence[str]) -> tuple[Plan, PipelineOptions]:
    """Settings and output checks, all before any work: ConfigError names the field and the fix."""
    args, beam_args = _parse(list(argv))
    if args.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    config = load_config(args.config)
    ReadInputs(args.input)   # checks --input
    layout = lay.read_layout(args.output)
    if layout is not None and layout.settings_hash != config.settings_hash():
        if not args.overwrite:
            raise ConfigError(f"--output: '{args.output}' holds a build made with other settings "
                              f"(settings hash {layout.settings_hash} != {config.settings_hash()}); "
                              f"use a new --output, or --overwrite to delete it and rebuild")
        finalize.delete_build(args.output)
        layout = None
    if layout is not None and layout.split != config.shards.split:
        raise ConfigError(f"shards.split: '{args.output}' was built with split '{layout.split}'")
    provenance = annotator_provenance(config)
    plan = Plan(args.input, args.output, config, layout, provenance, f"{time.time_ns():020d}",
                args.prune_vanished)
    return plan, pipeline_options(beam_args, args.workers)


def annotator_provenance(config: PipelineConfig) -> dict[str, Any]:
    """The driver's view of what annotates this build (the manifest's ``annotators``)."""
    out = {"segmenter": build_segmenter(config.segmenter).provenance(),
           "captioner": build_captioner(config.captioner).provenance()}
    if config.consistency is not None:
        from pipelines.config import build_consistency

        out["consistency"] = build_consistency(config.consistency).provenance()
    return out


def create_pipeline(argv: Sequence[str]) -> beam.Pipeline:
    """The constructed, not yet run, pipeline for these command-line arguments."""
    plan, options = prepare(argv)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, plan)
    return pipeline


def _budget_message(exc: BaseException) -> str | None:
    for line in str(exc).splitlines():
        if MARKER in line:
            return line[line.index(MARKER):].strip()
    return None


def run(argv: Sequence[str] | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Build the dataset; returns the manifest. Raises ConfigError before any work on bad
    settings, RunFailed when the failure budget stopped the run or nothing could be written."""
    plan, options = prepare(list(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    dry_run = str(options.get_all_options(retain_unknown_options=True).get("dry_run")) in ("True", "true")
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    monitor = progress.Monitor(plan.output, plan.run_id) if local and show_progress and not dry_run \
        else contextlib.nullcontext()
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, plan)
        with monitor:
            result = pipeline.run()
            if dry_run:   # e.g. DataflowRunner --dry_run=True: the job is built, nothing runs
                return {"dry_run": True, "output": plan.output,
                        "pipeline_bytes": len(pipeline.to_runner_api().SerializeToString())}
            result.wait_until_finish()
    except BudgetExceeded as exc:
        raise RunFailed(str(exc)) from exc
    except Exception as exc:   # runners wrap worker exceptions in their own types
        message = _budget_message(exc)
        if message is None:
            raise
        raise RunFailed(message) from exc
    finally:   # managed model servers started by in-process workers never outlive the run
        from annotators.serving import managed_server

        managed_server.stop_all()
    manifest = finalize.finalize(plan.output, plan.input_spec, plan.config, plan.provenance,
                                 time.perf_counter() - start, counters=beam_counters(result))
    problem = finalize.run_problem(manifest)
    if problem is not None:
        raise RunFailed(problem)
    return manifest


def print_config(argv: Sequence[str]) -> str:
    """The resolved settings as YAML, secrets masked."""
    import yaml

    args, _ = _parse(list(argv))
    config = load_config(args.config)
    return yaml.safe_dump({"settings_hash": config.settings_hash(), **mask_secrets(config.to_dict())},
                          sort_keys=False)


def main() -> int:
    """Command-line entry point: prints the summary; exit 2 on bad settings, 1 on a failed run."""
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:   # third-party chatter a user cannot act on
        for name in ("apache_beam", "httpx", "urllib3", "absl"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # warnings from Beam's own internals
        warnings.filterwarnings("ignore", module=r"apache_beam(\..*)?$")
    try:
        if "--print-config" in sys.argv:
            print(print_config(sys.argv[1:]), end="")
            return 0
        manifest = run(show_progress="--no-progress" not in sys.argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if manifest.get("dry_run"):
        print(f"dry run: pipeline built ({manifest['pipeline_bytes']} bytes), nothing was run")
        return 0
    print(finalize.summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
