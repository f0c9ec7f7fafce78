"""Re-caption (and re-segment) an existing dataset, recomputing only what new settings change.

    FROM shards → ReadPrevious → [Segment → SelectRegions → MatchPrevious, for images that need
    new masks] → Recaption → [CheckConsistency] → Assemble → FailureBudget → WriteShards
    (+ FROM's failures carried)

Each text records, in its captioner provenance, a hash per caption step (``step_hashes``: the
step, its client's output-changing settings, its visual prompts, the hashes of the steps it
reads). For every target (the image, each region) a step whose hash is unchanged keeps its
earlier output; the others are asked again, and a target whose steps are all unchanged is carried
over as it was (same text, same provenance id: its JSON is byte for byte the earlier one). A
batch where nothing changed calls no model and sets no model up.

Masks: if the segmenter, the region selection or the decode settings are unchanged, every region
is carried from FROM. If the segmenter or the region selection changed, each stored image is
segmented again and a new region keeps the texts of an earlier region with the same level, box and
mask (for a captioner whose texts read other regions — the embedded ``attributes`` one describes
neighbours and parts — only when the image's regions are all the same as before).
``--retry-failed`` (permanent | all) also segments again the images that lost regions to a
permanent failure (judge_rejected, answer_schema, ...), so those regions are asked again. Changed
decode settings change the stored images themselves: that needs the original inputs
(``make build-dataset``).

Output: a new dataset (same shard names as FROM; its manifest's ``input`` is ``recaption:FROM``)
and ``recaption_report.json`` (targets carried / partly reused / recomputed, steps reused / sent,
regions failed).

Usage:
    python -m pipelines.recaption --from out/ds --config new.yaml --output out/ds2
        [--retry-failed permanent] [--workers N] [--overwrite] [any Apache Beam flag]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from annotators.base import CaptionInput, CaptionResult, RegionView, TextOut
from annotators.registry import build_captioner, build_segmenter
from pipelines import finalize, stages, writer
from pipelines import layout as lay
from pipelines.build_dataset import (
    Plan,
    RunFailed,
    Stages,
    WriteShards,
    annotator_provenance,
    beam_counters,
    outcomes,
    pipeline_options,
    summarise,
)
from pipelines.config import (
    PipelineConfig,
    build_consistency,
    config_from_dict,
    load_config,
)
from pipelines.cost import Meter, on_gpu
from pipelines.types import Failure, ImageItem, ImageRef, failure_class
from schemas import SCHEMA_VERSION
from settings import ConfigError, hashed_view, stable_hash

LOG = logging.getLogger("recaption")
REPORT = "recaption_report.json"
NAMESPACE = "recaption"
# scores written with a text (by the captioner, the consistency filter); the rest are the segmenter's
TEXT_SCORES = ("judge_keep", "consistency", "consistency_flag")
FILTER_SCORES = ("consistency", "consistency_flag")
RETRY = {"none": (), "permanent": ("permanent",), "all": ("permanent", "transient")}


# --------------------------------------------------------------------------- what changed


@dataclass(frozen=True)
class Changes:
    """What the new settings change against FROM's."""

    resegment: bool                # segmenter or region selection changed: new masks everywhere
    retry: tuple[str, ...]         # failure classes of FROM's region failures to ask again
    keep_consistency: bool = False  # same consistency filter: a carried text keeps its score


def segmentation_view(config: PipelineConfig) -> dict[str, Any]:
    """What decides an image's regions: the segmenter's hashed settings and the region selection."""
    return {"segmenter": build_segmenter(config.segmenter).hash_view(),
            "regions": hashed_view(config.regions)}


def compare(old: PipelineConfig, new: PipelineConfig, retry: str) -> Changes:
    """Changes from ``old`` to ``new``; ConfigError where a recaption cannot follow them."""
    if stable_hash(hashed_view(old.decode)) != stable_hash(hashed_view(new.decode)):
        raise ConfigError("decode: the settings differ from FROM's, which changes the stored images; "
                          "keep FROM's decode section, or build anew from the original inputs "
                          "with make build-dataset")
    if new.shards.split != old.shards.split:
        raise ConfigError(f"shards.split: FROM was built with split '{old.shards.split}'; keep it")
    resegment = stable_hash(segmentation_view(old)) != stable_hash(segmentation_view(new))
    if (resegment or retry != "none") and new.segmenter.get("name") == "given":
        raise ConfigError("segmenter: 'given' masks come with the original inputs, which a "
                          "recaption does not read; keep FROM's segmenter and region settings "
                          "and --retry-failed none, or build anew with make build-dataset")
    same_filter = old.consistency is not None and new.consistency is not None and \
        stable_hash(build_consistency(old.consistency).hash_view()) == \
        stable_hash(build_consistency(new.consistency).hash_view())
    return Changes(resegment, RETRY[retry], same_filter)


# --------------------------------------------------------------------------- reading FROM


def _old_config(manifest: dict[str, Any], source: str) -> PipelineConfig:
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"--from: '{source}' has record schema {manifest.get('schema_version')!r}, "
                          f"this version writes {SCHEMA_VERSION!r}; build it anew with make build-dataset")
    try:
        return config_from_dict(manifest["settings"])
    except ConfigError as exc:
        raise ConfigError(f"--from: the settings in '{source}/manifest.json' no longer load ({exc}); "
                          "build it anew with make build-dataset") from None


def read_previous(shard: str, source: str, retry: tuple[str, ...]) -> Iterator[Any]:
    """FROM's shard ``shard`` → an ImageItem per sample (stored image, regions, the old record in
    ``previous``) and, on the failed output, FROM's failed inputs as they were."""
    failures = writer.read_parquet(lay.index_path(source, "failures", shard)).to_pylist()
    region_failures: dict[str, list[Failure]] = {}
    for row in failures:
        failure = Failure(row["key"], row["source"], row["stage"], row["reason"], row["detail"],
                          row["region_id"], shard)
        if row["region_id"] is None:
            yield beam.pvalue.TaggedOutput(stages.FAILED, failure)
        else:
            region_failures.setdefault(row["key"], []).append(failure)
    path = lay.shard_path(source, shard)
    if not FileSystems.exists(path):   # every input of the shard failed
        return
    for key, image, record in _samples(path):
        olds = region_failures.get(key, [])
        yield item_of(record, image, shard,
                      [f for f in olds if failure_class(f.reason) not in retry],
                      retried=any(failure_class(f.reason) in retry for f in olds))


def _samples(path: str) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, image bytes, record) of each sample of a shard tar, in order."""
    with FileSystems.open(path) as handle, tarfile.open(fileobj=io.BytesIO(handle.read())) as tar:
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if key not in members:
                order.append(key)
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key in order:
        record = json.loads(members[key]["json"])
        yield key, members[key][record["image"]["format"]], record


def item_of(record: dict[str, Any], image: bytes, shard: str, region_failures: list[Failure],
            retried: bool) -> ImageItem:
    """The ImageItem a build had after SelectRegions, rebuilt from its record."""
    source = record["source"]
    given = record["image_level"].get("given", {})
    ref = ImageRef(record["key"], source["uri"], {"kind": "dataset"}, shard, source.get("dataset"),
                   {"caption": given["caption"]} if "caption" in given else None)
    info = {k: v for k, v in record["image"].items() if k not in ("width", "height", "format")}
    table = record["provenance"]["annotators"]
    depth: dict[str, int] = {}
    regions = []
    for r in record["regions"]:
        depth[r["id"]] = 0 if r["parent"] is None else depth[r["parent"]] + 1
        segmenter = table[r["provenance"]["segmenter"]]
        stats = {"depth": depth[r["id"]], "source": segmenter.get("source", ""),
                 "scores": {k: v for k, v in r["scores"].items() if k not in TEXT_SCORES}}
        regions.append(RegionView(r["id"], r["level"], r["parent"], list(r["bbox"]), r["area"],
                                  r["mask"], stats, dict(r.get("given", {}))))
    base = next(({k: v for k, v in entry.items() if k != "source"} for pid, entry in sorted(table.items())
                 if pid.startswith("s-")), None)
    item = ImageItem(ref=ref, data=image, sha256=source["sha256"], width=record["image"]["width"],
                     height=record["image"]["height"], format=record["image"]["format"],
                     image_info=info, ground_truth=source.get("ground_truth"), regions=regions,
                     region_failures=region_failures, segmenter_provenance=base)
    item.previous = {"record": record, "retried": retried}
    return item


# --------------------------------------------------------------------------- matching and reuse


def _geometry(level: str, bbox: list[float], mask: dict[str, Any] | None) -> tuple[Any, ...]:
    return level, tuple(round(float(v), 2) for v in bbox), None if mask is None else mask["counts"]


def _tree(regions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Regions by geometry and label, each with its parent's geometry (ids left out), sorted."""
    by_id = {r["id"]: r for r in regions}

    def geometry(r: dict[str, Any]) -> tuple[Any, ...]:
        return _geometry(r["level"], [round(float(v), 2) for v in r["bbox"]], r["mask"])

    return sorted((geometry(r), None if r["parent"] is None else geometry(by_id[r["parent"]]),
                   str(sorted((r.get("given") or {}).items()))) for r in regions)


class MatchPrevious(beam.DoFn):
    """After new masks: each new region gets the earlier texts of the old region with the same
    level, box and mask (``previous["texts"]``: new region id → old region dict)."""

    def process(self, item: ImageItem) -> Iterator[ImageItem]:
        before = item.previous["record"]["regions"]
        old = {_geometry(r["level"], r["bbox"], r["mask"]): r for r in before}
        matched = {}
        for region in item.regions:
            found = old.get(_geometry(region.level, [round(float(v), 2) for v in region.bbox], region.rle))
            if found is not None and found.get("given", {}) == region.given:
                matched[region.id] = found
        item.previous["texts"] = matched
        # the same regions in the same tree: texts that read other regions still hold
        item.previous["same_regions"] = _tree(before) == _tree([
            {"id": r.id, "parent": r.parent, "level": r.level, "bbox": r.bbox, "mask": r.rle,
             "given": r.given} for r in item.regions])
        item.region_failures = []   # new regions: FROM's region failures no longer name them
        Metrics.counter(NAMESPACE, "images_segmented_again").inc()
        yield item


def old_outputs(text: dict[str, Any]) -> dict[str, Any]:
    """A stored text's step outputs by step name."""
    out = {"caption": text["caption"], "long_caption": text["long_caption"], "tags": list(text["tags"]),
           **text.get("steps", {})}
    if "judge" in text:
        out["judge"] = dict(text["judge"])
    return out


def carried_text(text: dict[str, Any], provenance: dict[str, Any], keep_filter: bool) -> TextOut:
    """A stored text as the captioner's output, with its own provenance (so the same id); its
    consistency scores only when the filter is the same (else it is scored again)."""
    keep = TEXT_SCORES if keep_filter else tuple(k for k in TEXT_SCORES if k not in FILTER_SCORES)
    return TextOut(text["caption"], text["long_caption"], list(text["tags"]),
                   {k: v for k, v in text.get("scores", {}).items() if k in keep},
                   provenance, dict(text["judge"]) if "judge" in text else None,
                   dict(text.get("steps", {})))


class Recaption(beam.DoFn):
    """Batches of rebuilt items → texts: carried where every step is unchanged, earlier outputs
    reused step by step elsewhere, the rest asked of the configured captioner (set up only when
    something must be asked)."""

    def __init__(self, config: PipelineConfig, keep_filter: bool = False) -> None:
        self.config = config
        self.keep_filter = keep_filter
        self.captioner = None
        self.hashes: dict[str, dict[str, str]] = {}
        self.ready = False

    def setup(self) -> None:
        stages.settle_heap()
        self.captioner = build_captioner(self.config.captioner)
        self.hashes = self.captioner.step_hashes()

    def teardown(self) -> None:
        if self.captioner is not None and self.ready:
            self.captioner.teardown()

    def _plan(self, item: ImageItem) -> tuple[dict[str, TextOut], dict[str, dict[str, Any]],
                                              dict[str, dict[str, Any]]]:
        """Per target: the carried text, or the outputs that can be reused; and what the
        captioner is given to reuse (a carried target's every output: it asks nothing for it)."""
        record = item.previous["record"]
        table = record["provenance"]["annotators"]
        texts: dict[str, dict[str, Any]] = {"image": record["image_level"]}
        if "texts" in item.previous:
            texts.update(item.previous["texts"])
            if self.captioner.reads_other_regions and not item.previous["same_regions"]:
                texts = {}   # new masks elsewhere in the image change every text of it
        else:
            texts.update({r["id"]: r for r in record["regions"]})
        levels = {"image": "image", **{r.id: r.level for r in item.regions}}
        carried: dict[str, TextOut] = {}
        reuse: dict[str, dict[str, Any]] = {}
        given: dict[str, dict[str, Any]] = {}
        for target, level in levels.items():
            text = texts.get(target)
            if text is None:
                continue
            provenance = table[text["provenance"] if target == "image" else text["provenance"]["captioner"]]
            old, new = provenance.get("steps", {}).get(level, {}), self.hashes[level]
            outputs = old_outputs(text)
            if old == new:
                carried[target] = carried_text(text, provenance, self.keep_filter)
                given[target] = outputs
                continue
            reuse[target] = given[target] = {s: outputs[s] for s, h in new.items()
                                             if old.get(s) == h and s in outputs}
        return carried, reuse, given

    def process(self, batch: list[ImageItem]) -> Iterator[Any]:
        plans = []
        asked: list[int] = []
        with Meter("caption") as meter:
            given = []
            for i, item in enumerate(batch):
                carried, reuse, reused = self._plan(item)
                plans.append((carried, reuse))
                given.append(reused)
                if len(carried) < 1 + len(item.regions):
                    asked.append(i)
            results: dict[int, CaptionResult] = {}
            problems: list[Any] = []
            if asked:
                if not self.ready:
                    self.captioner.setup()
                    self.ready = True
                inputs = [self._input(batch[i], given[i]) for i in asked]
                try:
                    answers = self.captioner.caption_batch(inputs)
                    if len(answers) != len(inputs):
                        raise RuntimeError(f"captioner gave {len(answers)} answers for {len(inputs)} images")
                    results = dict(zip(asked, answers))
                except Exception as exc:
                    problems = [stages.internal_failure(batch[i], "caption", exc) for i in asked]
        yield from problems
        done = [i for i in range(len(batch)) if i in results or i not in asked]
        wall, costs = meter.share(len(done), self.ready and on_gpu(self.captioner.provenance()))
        for i in done:
            item, (carried, reuse) = batch[i], plans[i]
            result = results.get(i) or CaptionResult(carried["image"], {}, [])
            item.captions = self._merge(item, result, carried, reuse)
            item.timings["caption"], item.costs["caption"] = wall, {**costs, **result.cost}
            yield item

    @staticmethod
    def _input(item: ImageItem, reuse: dict[str, dict[str, Any]]) -> CaptionInput:
        return CaptionInput(item.ref.key, item.width, item.height, item.data, item.regions, {},
                            {"caption": item.given_caption} if item.given_caption else {}, reuse)

    def _merge(self, item: ImageItem, result: CaptionResult, carried: dict[str, TextOut],
               reuse: dict[str, dict[str, Any]]) -> CaptionResult:
        """The captioner's result with every carried target's stored text put back; counted."""
        count = Counter()
        image = result.image_level
        if "image" in carried:
            image = carried["image"]
        regions = dict(result.regions)
        regions.update({k: v for k, v in carried.items() if k != "image"})
        failures = [f for f in result.failures if f.region_id not in carried]
        if image is None:   # the image itself failed: nothing of it is written
            return CaptionResult(None, {}, failures, result.cost)
        for target in ["image"] + [r.id for r in item.regions]:
            kind = "image" if target == "image" else "regions"
            if target in carried:
                count[f"{kind}_carried"] += 1
            elif any(f.region_id == target for f in failures):
                count[f"{kind}_failed"] += 1
            elif reuse.get(target):
                count[f"{kind}_partly_reused"] += 1
            else:
                count[f"{kind}_recomputed"] += 1
            count["steps_reused"] += len(reuse.get(target, {}))
        for name, value in count.items():
            Metrics.counter(NAMESPACE, name).inc(value)
        Metrics.counter(NAMESPACE, "model_calls").inc(int(result.cost.get("calls", 0)))
        return CaptionResult(image, regions, failures, result.cost)


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Job:
    """What the driver decided before any work."""

    source: str
    shards: list[str]
    layout: lay.Layout
    plan: Plan
    changes: Changes


def build(pipeline: beam.Pipeline, job: Job) -> None:
    """Add the recaption flow to ``pipeline``."""
    config, plan = job.plan.config, job.plan
    stage = Stages()
    read = (pipeline | "Shards" >> beam.Create(job.shards) | "SpreadShards" >> beam.Reshuffle()
            | "ReadPrevious" >> beam.FlatMap(read_previous, job.source, job.changes.retry)
            .with_outputs(stages.FAILED, main="ok"))
    stage.rejected.append(read[stages.FAILED])
    items = read.ok | "Spread" >> beam.Reshuffle()
    if job.changes.resegment:
        again, kept = items, None
    else:
        parts = items | "NeedsMasks" >> beam.Partition(lambda item, n: 0 if item.previous["retried"] else 1, 2)
        again, kept = parts[0], parts[1]
    again = stage(again | "BatchForSegment" >> stage.batches(config.batch.segment), "Segment", stages.Segment(config))
    again = stage(again, "SelectRegions", stages.SelectRegions(config))
    again = again | "MatchPrevious" >> beam.ParDo(MatchPrevious())
    items = again if kept is None else (again, kept) | "AllItems" >> beam.Flatten()
    items = stage(items | "BatchForCaption" >> stage.batches(config.batch.caption), "Recaption",
                  Recaption(config, job.changes.keep_consistency))
    records, failures = outcomes(items, stage, plan)
    buckets = pipeline | "Buckets" >> beam.Create([job.layout.buckets])
    nothing = pipeline | "NoUnfinished" >> beam.Create([])
    written = (records, failures) | "WriteShards" >> WriteShards(plan, buckets, nothing)
    inputs = (read.ok | "ItemInputs" >> beam.Map(lambda item: item.ref.key),
              read[stages.FAILED] | "FailedInputs" >> beam.Map(lambda f: f.key))
    summarise([written | "ShardFacts" >> beam.Map(lambda st: ("shard", st)),
               inputs | "AllInputs" >> beam.Flatten() | "InputFacts" >> beam.Map(lambda _: ("inputs", 1))],
              plan.output)


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="the existing dataset (its output directory)")
    parser.add_argument("--config", default=None, help="the new settings (YAML; default: embedded defaults)")
    parser.add_argument("--output", required=True, help="where the new dataset goes (not FROM)")
    parser.add_argument("--retry-failed", choices=sorted(RETRY), default="none",
                        help="also ask again the regions FROM lost to failures of this class "
                             "(segments those images again; default none)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="delete a build already in --output")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def prepare(argv: Sequence[str]) -> tuple[Job, Any]:
    """Settings, FROM and output checks, all before any work."""
    args, beam_args = arg_parser().parse_known_args(list(argv))
    if args.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    source, output = args.source.rstrip("/"), args.output.rstrip("/")
    if source == output:
        raise ConfigError("--output: must differ from --from (a recaption writes a new dataset)")
    manifest_path = FileSystems.join(source, "manifest.json")
    if not FileSystems.exists(manifest_path):
        raise ConfigError(f"--from: '{source}' holds no finished dataset (no manifest.json)")
    manifest = writer.read_json(manifest_path)
    if manifest.get("incomplete_shards"):
        raise ConfigError(f"--from: '{source}' has incomplete shards {manifest['incomplete_shards'][:5]}; "
                          "finish it first (rerun make build-dataset with its settings)")
    old = _old_config(manifest, source)
    layout = lay.read_layout(source)
    if layout is None:
        raise ConfigError(f"--from: '{source}' has no {lay.WORK_DIR}/layout.json")
    config = load_config(args.config)
    changes = compare(old, config, args.retry_failed)
    if lay.read_layout(output) is not None or FileSystems.exists(FileSystems.join(output, "manifest.json")):
        if not args.overwrite:
            raise ConfigError(f"--output: '{output}' already holds a dataset; use a new --output or --overwrite")
        finalize.delete_build(output)
    provenance = annotator_provenance(config)
    plan = Plan(f"recaption:{source}", output, config, lay.Layout(layout.buckets, layout.split,
                                                                  config.settings_hash()),
                provenance, f"{time.time_ns():020d}", False)
    shards = sorted(writer.complete_shard_names(source))
    return Job(source, shards, layout, plan, changes), pipeline_options(beam_args, args.workers)


def report(counters: dict[str, int], job: Job, manifest: dict[str, Any]) -> dict[str, Any]:
    """What was carried, reused, recomputed, failed (from the run's counters)."""
    ours = {name.split("/", 1)[1]: value for name, value in counters.items() if name.startswith(f"{NAMESPACE}/")}
    keys = ("image_carried", "image_partly_reused", "image_recomputed", "image_failed",
            "regions_carried", "regions_partly_reused", "regions_recomputed", "regions_failed",
            "steps_reused", "model_calls", "images_segmented_again")
    return {"from": job.source, "output": job.plan.output, "resegment": job.changes.resegment,
            "retry_failed": list(job.changes.retry),
            "counts": {k: ours.get(k, 0) for k in keys} if counters else None,
            "written": manifest["counts"]["written"], "failed_inputs": manifest["counts"]["failed"],
            "region_failures_by_reason": manifest["counts"]["region_failures_by_reason"]}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Recaption; returns the report. ConfigError before any work on bad settings."""
    job, options = prepare(list(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    try:
        pipeline = beam.Pipeline(options=options)
        build(pipeline, job)
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        from annotators.serving import managed_server

        managed_server.stop_all()
    counters = beam_counters(result)
    manifest = finalize.finalize(job.plan.output, job.plan.input_spec, job.plan.config, job.plan.provenance,
                                 time.perf_counter() - start, counters=counters)
    out = report(counters, job, manifest)
    with FileSystems.create(FileSystems.join(job.plan.output, REPORT)) as handle:
        handle.write(json.dumps(out, indent=1, sort_keys=True).encode())
    problem = finalize.run_problem(manifest)
    if problem is not None:
        raise RunFailed(problem)
    return out


def main() -> int:
    """Command-line entry point: prints the report; exit 2 on bad settings, 1 on a failed run."""
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
