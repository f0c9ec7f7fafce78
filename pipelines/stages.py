"""The pipeline's stages as Beam DoFns. Each emits items on the main output and Failures on
the ``failed`` output; an unexpected exception fails the element, never the pipeline.

Each stage records what an item cost it (``pipelines.cost``): wall seconds in ``item.timings``,
CPU and GPU seconds (and the captioner's model calls, tokens, bytes) in ``item.costs``; a
batched stage shares its batch's cost over its items. Measured spans end before an item is
yielded (the next stages run inside the yield)."""
from __future__ import annotations

import gc
import hashlib
import io
import logging
import traceback
from collections import Counter
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from PIL import Image

from annotators.base import AnnotatorFailure, CaptionInput, SegmentInput, SegmentOutput
from annotators.registry import build_captioner, build_segmenter
from pipelines import decode as dec
from pipelines.assemble import build_record
from pipelines.cost import Meter, on_gpu
from pipelines.config import PipelineConfig
from pipelines.regions import select_regions
from pipelines.types import Failure, ImageItem, ImageRef, ShardOutcome

FAILED = "failed"
LOG = logging.getLogger(__name__)


def _failure_out(failure: Failure) -> pvalue.TaggedOutput:
    Metrics.counter("failures", f"{failure.stage}.{failure.reason}").inc()
    return pvalue.TaggedOutput(FAILED, failure)


def internal_failure(item: ImageItem, stage: str, exc: BaseException) -> pvalue.TaggedOutput:
    """An unexpected exception as the item's failure (out of memory: transient)."""
    LOG.warning("%s failed on %s: %s", stage, item.ref.key, exc)
    detail = f"{type(exc).__name__}: {exc} | " + "".join(traceback.format_exc(limit=3))[-800:]
    # Out of memory is the machine's state, not the input's: a rerun should try again.
    reason = "out_of_memory" if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() \
        else "internal_error"
    return _failure_out(item.fail(stage, reason, detail))


def _record(item: ImageItem, stage: str, meter: Meter) -> None:
    """A one-item stage's cost on ``item`` (no GPU: those stages run no model)."""
    item.timings[stage], item.costs[stage] = meter.share(1)


def _rgb(item: ImageItem) -> np.ndarray:
    """The stored image's pixels, decoded once per item and kept while the item is in memory."""
    if item.rgb is None:
        item.rgb = np.asarray(Image.open(io.BytesIO(item.data)).convert("RGB"))
    return item.rgb


_HEAP_SETTLED = False


def settle_heap() -> None:
    """Once per worker process, when its first stage is set up: collect garbage, then move every
    object alive now (modules, Beam's pipeline graph, settings) out of the garbage collector's
    generations (``gc.freeze``). They live as long as the process, and a full collection would
    otherwise walk all of them again and again while images stream through: ~9 % of the wall
    time of a given-mask build of 1,000 photos on a 2-core machine (7 interleaved pairs of runs,
    2-14 % per pair; bench/pipeline_overhead.py's inputs). Frozen objects are still freed when
    their last reference goes."""
    global _HEAP_SETTLED
    if not _HEAP_SETTLED:
        _HEAP_SETTLED = True
        gc.collect()
        gc.freeze()


class ReadImages(beam.DoFn):
    """ImageRef → ImageItem with the input's bytes and sha256."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def setup(self) -> None:
        settle_heap()

    def process(self, ref: ImageRef) -> Iterator[Any]:
        item = ImageItem(ref=ref)
        if ref.loader["kind"] == "invalid":   # e.g. a bad manifest row (no dedup pass ran)
            yield _failure_out(item.fail("read", ref.loader["reason"], ref.loader["detail"]))
            return
        problem: Any = None
        with Meter("read") as meter:
            try:
                item.data, item.ground_truth = dec.read_bytes(ref, self.config.decode.max_bytes)
                item.sha256 = hashlib.sha256(item.data).hexdigest()
            except dec.InputError as exc:
                problem = _failure_out(item.fail("read", exc.reason, exc.detail))
            except Exception as exc:
                problem = internal_failure(item, "read", exc)
        if problem is not None:
            yield problem
            return
        _record(item, "read", meter)
        Metrics.counter("dataset", "read").inc()
        yield item


class DecodeImages(beam.DoFn):
    """Decode hygiene (see pipelines.decode): the item's data becomes the stored image."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def process(self, item: ImageItem) -> Iterator[Any]:
        problem: Any = None
        with Meter("decode") as meter:
            try:
                decoded = dec.decode(item.data, self.config.decode)
            except dec.InputError as exc:
                problem = _failure_out(item.fail("decode", exc.reason, exc.detail))
            except Exception as exc:
                problem = internal_failure(item, "decode", exc)
        if problem is not None:
            yield problem
            return
        item.data, item.format, item.rgb = decoded.data, decoded.format, decoded.pixels
        item.width, item.height, item.image_info = decoded.width, decoded.height, decoded.info
        _record(item, "decode", meter)
        yield item


class Segment(beam.DoFn):
    """Batches of items → candidate masks/boxes from the configured segmenter (loaded once)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.segmenter = None
        self.provenance: dict[str, Any] | None = None
        self.on_gpu = False

    def setup(self) -> None:
        self.segmenter = build_segmenter(self.config.segmenter)
        self.segmenter.setup()
        # what this worker actually runs (device, dtype, fast path), not the driver's guess
        self.provenance = self.segmenter.provenance()
        self.on_gpu = on_gpu(self.provenance)

    def teardown(self) -> None:
        if self.segmenter is not None:
            self.segmenter.teardown()

    def _input(self, item: ImageItem) -> SegmentInput:
        given = dict(item.ref.given or {})
        given["original_size"] = (item.image_info.get("original_height", item.height),
                                  item.image_info.get("original_width", item.width))
        given["orientation"] = item.image_info.get("exif_orientation", 1)
        if item.ground_truth and "masks" not in given:
            given["masks"] = [obj["mask"] for obj in item.ground_truth]
        rgb = _rgb(item) if self.segmenter.needs_pixels else None
        return SegmentInput(item.ref.key, rgb, given, size=(item.height, item.width))

    def process(self, batch: list[ImageItem]) -> Iterator[Any]:
        ok: list[ImageItem] = []
        inputs: list[SegmentInput] = []
        outputs: list[Any] = []
        problems: list[Any] = []
        with Meter("segment") as meter:
            for item in batch:
                try:
                    inputs.append(self._input(item))
                    ok.append(item)
                except Exception as exc:
                    problems.append(internal_failure(item, "segment", exc))
            try:
                outputs = self.segmenter.segment_batch(inputs) if inputs else []
                if len(outputs) != len(inputs):
                    raise RuntimeError(f"segmenter gave {len(outputs)} answers for {len(inputs)} images")
            except Exception as exc:
                problems += [internal_failure(item, "segment", exc) for item in ok]
                ok, outputs = [], []
        yield from problems
        wall, costs = meter.share(len(ok), self.on_gpu)
        for item, out in zip(ok, outputs, strict=True):
            if isinstance(out, AnnotatorFailure):
                reason = "out_of_memory" if "out of memory" in out.detail.lower() else out.reason
                yield _failure_out(item.fail("segment", reason, out.detail))
                continue
            assert isinstance(out, SegmentOutput)
            item.candidates, item.segment_dropped = out.candidates, dict(out.dropped)
            item.segmenter_provenance = self.provenance
            item.timings["segment"], item.costs["segment"] = wall, dict(costs)
            Metrics.distribution("segment", "candidates").update(len(out.candidates))
            yield item


class SelectRegions(beam.DoFn):
    """Candidates → region tree (see pipelines.regions); drops are counted, not lost."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def process(self, item: ImageItem) -> Iterator[Any]:
        with Meter("select_regions") as meter:
            try:
                item.regions, dropped = select_regions(item.candidates, (item.height, item.width),
                                                       self.config.regions)
            except Exception as exc:
                problem = internal_failure(item, "select_regions", exc)
            else:
                problem = None
                merged = Counter(item.segment_dropped)
                merged.update(dropped)
                item.segment_dropped = dict(merged)
                item.candidates = []   # masks now live in the regions; free the rest
        if problem is not None:
            yield problem
            return
        for reason, count in merged.items():
            Metrics.counter("regions_dropped", reason).inc(count)
        if not any(r.level == "pixel" for r in item.regions):
            Metrics.counter("dataset", "images_without_masks").inc()
        _record(item, "select_regions", meter)
        yield item


class RenderPrompts(beam.DoFn):
    """Visual prompts the captioner asked for, rendered per target (image or region)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.specs: dict[str, list[dict[str, Any]]] = {}

    def setup(self) -> None:
        self.specs = build_captioner(self.config.captioner).prompt_specs()

    def process(self, item: ImageItem) -> Iterator[Any]:
        if not self.specs:
            yield item
            return
        from annotators.caption import visual_prompts as vp

        problem: Any = None
        with Meter("render_prompts") as meter:
            try:
                item.prompts = vp.render_specs(self.specs, _rgb(item), item.regions)
            except Exception as exc:
                problem = internal_failure(item, "render_prompts", exc)
        if problem is not None:
            yield problem
            return
        _record(item, "render_prompts", meter)
        yield item


class Caption(beam.DoFn):
    """Batches of items → text and tags from the configured captioner (loaded once)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.captioner = None
        self.on_gpu = False

    def setup(self) -> None:
        self.captioner = build_captioner(self.config.captioner)
        self.captioner.setup()
        self.on_gpu = on_gpu(self.captioner.provenance())

    def teardown(self) -> None:
        if self.captioner is not None:
            self.captioner.teardown()

    def process(self, batch: list[ImageItem]) -> Iterator[Any]:
        problems: list[Any] = []
        with Meter("caption") as meter:
            inputs = [CaptionInput(i.ref.key, i.width, i.height, i.data, i.regions, i.prompts,
                                   {"caption": i.given_caption} if i.given_caption else {})
                      for i in batch]
            try:
                results = self.captioner.caption_batch(inputs)
                if len(results) != len(inputs):
                    raise RuntimeError(f"captioner gave {len(results)} answers for {len(inputs)} images")
            except Exception as exc:
                problems = [internal_failure(item, "caption", exc) for item in batch]
        if problems:
            yield from problems
            return
        wall, costs = meter.share(len(batch), self.on_gpu)
        for item, result in zip(batch, results, strict=True):
            item.captions = result
            item.prompts = {}
            # the model's calls, tokens and bytes are the image's own; seconds are shared
            item.timings["caption"], item.costs["caption"] = wall, {**costs, **result.cost}
            yield item


class CheckConsistency(beam.DoFn):
    """Each region's text scored against its pixels (``consistency``); below the threshold a
    region is dropped (failure ``inconsistent_text``, stage ``consistency``) or flagged
    (``scores.consistency_flag``). A text that already has its score (carried by a recaption
    with the same filter) is not scored again."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.scorer = None
        self.on_gpu = False

    def setup(self) -> None:
        from pipelines.config import build_consistency

        self.scorer = build_consistency(self.config.consistency)
        self.scorer.setup()
        # the device the model went to (its provenance, with the weights' hash, is the driver's)
        self.on_gpu = self.scorer.device.startswith("cuda")

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.teardown()

    def process(self, item: ImageItem) -> Iterator[Any]:
        from annotators.filter.consistency import FAILURE_REASON, RegionText
        from annotators.segment import masks

        settings = self.scorer.settings
        result = item.captions
        with Meter("consistency") as meter:
            try:
                todo = [r for r in item.regions if r.id in result.regions
                        and "consistency" not in result.regions[r.id].scores]
                texts = [getattr(result.regions[r.id], settings.text) for r in todo]
                scores = self.scorer.score(_rgb(item), [
                    RegionText(r.bbox, None if r.rle is None else masks.decode(r.rle).astype(bool), text)
                    for r, text in zip(todo, texts)]) if todo else []
            except Exception as exc:
                problem = internal_failure(item, "consistency", exc)
            else:
                problem = None
        if problem is not None:
            yield problem
            return
        for region, score in zip(todo, scores, strict=True):
            text = result.regions[region.id]
            text.scores["consistency"] = float(score)
            if settings.threshold is None:
                continue
            low = self.scorer.rejects(score)
            Metrics.counter("consistency", "below_threshold" if low else "kept").inc()
            if low and settings.action == "drop":
                del result.regions[region.id]
                item.region_failures.append(Failure(
                    item.ref.key, item.ref.uri, "consistency", FAILURE_REASON,
                    f"score {score:.3f} < threshold {settings.threshold} ({settings.text})",
                    region.id, item.ref.shard))
            else:
                text.scores["consistency_flag"] = 1.0 if low else 0.0
        item.timings["consistency"], item.costs["consistency"] = meter.share(1, self.on_gpu)
        yield item


class Assemble(beam.DoFn):
    """Item → ShardOutcome with a validated record, or the item's failures."""

    def __init__(self, config: PipelineConfig, pipeline_version: str,
                 segmenter_provenance: dict[str, Any]) -> None:
        self.config = config
        self.pipeline_version = pipeline_version
        self.segmenter_provenance = segmenter_provenance   # the driver's, if a stage set none
        self.settings_hash = ""

    def setup(self) -> None:
        self.settings_hash = self.config.settings_hash()   # once per worker, not per image

    def process(self, item: ImageItem) -> Iterator[ShardOutcome]:
        with Meter("assemble") as meter:
            try:
                record, failures = build_record(item, item.segmenter_provenance or self.segmenter_provenance,
                                                self.pipeline_version,
                                                self.settings_hash or self.config.settings_hash())
            except Exception as exc:
                record, failures = None, [item.fail("assemble", "internal_error", f"{type(exc).__name__}: {exc}")]
        for failure in failures:
            Metrics.counter("failures", f"{failure.stage}.{failure.reason}").inc()
        if record is not None:
            Metrics.counter("dataset", "written").inc()
            for level, count in Counter(region["level"] for region in record["regions"]).items():
                Metrics.counter("regions", level).inc(count)
        _record(item, "assemble", meter)
        yield ShardOutcome(item.ref.key, item.ref.shard, record, item.data if record else None,
                           failures, item.timings, item.ref.uri, item.sha256, item.segment_dropped,
                           item.costs)


def failure_outcome(failure: Failure) -> ShardOutcome:
    """A rejected input as the writer's input."""
    return ShardOutcome(failure.key, failure.shard, None, None, [failure], {}, failure.source)
