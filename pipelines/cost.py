"""What a build cost: wall, CPU and GPU seconds per stage, and the captioner's model calls,
tokens and bytes. Measured per image in the workers, summed per shard into ``stats.json`` (the
durable record: a rerun that writes only new shards keeps the earlier shards' costs), summed over
the build into ``manifest.json`` ``cost`` (``section``), shown per image and extrapolated on the
dataset card.

How each figure is measured (``Meter``):

* ``wall_s``: ``time.perf_counter`` around a stage's work on an item; a batched stage (segment,
  caption) shares its batch's time equally over the batch's items.
* ``cpu_s``: CPU time over the same span, shared the same way. The stages whose work runs in the
  DoFn's own thread (``CPU_CLOCKS`` "thread": read, decode, select_regions, render_prompts,
  assemble) use that thread's clock (``time.thread_time``), exact even where a runner runs
  several bundles in threads of one process. The model stages (segment, caption, consistency;
  "process") use the process's clock (``time.process_time``): their work runs in threads the
  stage does not own one by one (torch's intra-op pool, the HTTP client's event-loop thread, the caption engine's
  per-client threads). Where other measured work ran in the same process meanwhile (a runner
  running bundles in parallel threads), an item's process CPU includes that work too: the item is
  counted in ``cpu_overlapped`` and its figure is an upper bound. Work done in another process
  (a model server, a model shared across SDK processes) is not counted.
* ``gpu_s``: for a stage whose model sits on a CUDA device (the annotator's provenance names the
  ``device``), the stage's wall time: how long the device was held, not kernel time. 0 on CPU.
* model usage (caption): ``annotators.caption.backends.base.CallCost``, summed per image by the
  caption engine (``CaptionResult.cost``).
"""
from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping

from annotators.caption.backends.base import COST_FIELDS

STAGES = ("read", "decode", "segment", "select_regions", "render_prompts", "caption", "consistency",
          "assemble")
CPU_CLOCKS: dict[str, str] = {stage: "thread" for stage in STAGES} | {
    "segment": "process", "caption": "process", "consistency": "process"}
SECONDS = ("wall_s", "cpu_s", "gpu_s")
EXTRAPOLATE_TO = (1_000_000, 10_000_000)

_LOCK = threading.Lock()
_ACTIVE = [0, 0]   # meters running now in this process, meters started so far


class Meter:
    """Wall and CPU seconds of one span of a stage's work (``with Meter(stage) as m: ...``;
    then ``m.wall``, ``m.cpu``, ``m.overlapped``). The span must not yield: a Beam DoFn's output
    runs the next stages inside the yield."""

    def __init__(self, stage: str) -> None:
        self.process_clock = CPU_CLOCKS.get(stage) == "process"
        self._clock: Callable[[], float] = time.process_time if self.process_clock else time.thread_time
        self.wall = self.cpu = 0.0
        self.overlapped = False
        self._started = 0
        self._busy = False

    def __enter__(self) -> Meter:
        with _LOCK:
            self._busy = _ACTIVE[0] > 0
            _ACTIVE[0] += 1
            _ACTIVE[1] += 1
            self._started = _ACTIVE[1]
        self._wall0, self._cpu0 = time.perf_counter(), self._clock()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = self._clock() - self._cpu0
        with _LOCK:
            _ACTIVE[0] -= 1
            # another span started or was running meanwhile: the process clock counted it too
            self.overlapped = self.process_clock and (self._busy or _ACTIVE[1] != self._started)

    def share(self, n: int, on_gpu: bool = False) -> tuple[float, dict[str, float]]:
        """One of ``n`` items' share: (wall seconds, {"cpu_s", "gpu_s"[, "cpu_overlapped"]})."""
        n = max(n, 1)
        wall = self.wall / n
        out = {"cpu_s": self.cpu / n, "gpu_s": wall if on_gpu else 0.0}
        if self.overlapped:
            out["cpu_overlapped"] = 1
        return wall, out


def on_gpu(provenance: Mapping[str, Any] | None) -> bool:
    """True when an annotator's provenance says its model (or one of its clients') is on CUDA."""
    if not provenance:
        return False
    devices = [provenance.get("device")]
    clients = provenance.get("clients")
    if isinstance(clients, Mapping):
        devices += [c.get("device") for c in clients.values() if isinstance(c, Mapping)]
    return any(isinstance(d, str) and d.startswith("cuda") for d in devices)


def add(total: dict[str, dict[str, float]], costs: Mapping[str, Mapping[str, float]]) -> None:
    """Add per-stage costs ({stage: {field: value}}) into ``total``."""
    for stage, values in costs.items():
        into = total.setdefault(stage, {})
        for name, value in values.items():
            into[name] = into.get(name, 0) + value


def summed(many: Iterable[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per-stage costs summed (shards into the build; items into a shard)."""
    total: dict[str, dict[str, float]] = {}
    for costs in many:
        add(total, costs)
    return {stage: dict(sorted(values.items())) for stage, values in sorted(total.items())}


def _per(totals: Mapping[str, float], n: int) -> dict[str, float] | None:
    return {k: round(v / n, 9) for k, v in totals.items()} if n else None


def section(costs: Mapping[str, Mapping[str, float]], timings: Mapping[str, float], images: int,
            regions: int) -> dict[str, Any]:
    """The manifest's ``cost``: per stage {wall_s, cpu_s, gpu_s, cpu_clock, cpu_overlapped},
    their total, the captioner's model usage (``COST_FIELDS``), and the totals per image (the
    ``images`` inputs whose work is summed) and per region (``regions`` written)."""
    stages = {}
    for stage in STAGES:
        c = costs.get(stage, {})
        stages[stage] = {"wall_s": round(timings.get(stage, 0.0), 6),
                         "cpu_s": round(c.get("cpu_s", 0.0), 6),
                         "gpu_s": round(c.get("gpu_s", 0.0), 6),
                         "cpu_clock": CPU_CLOCKS[stage],
                         "cpu_overlapped": int(c.get("cpu_overlapped", 0))}
    total = {k: round(sum(s[k] for s in stages.values()), 6) for k in SECONDS}
    caption = {name: int(costs.get("caption", {}).get(name, 0)) for name in COST_FIELDS}
    every = {**total, **{k: caption[k] for k in ("calls", "failed_calls", "prompt_tokens",
                                                 "completion_tokens", "bytes_sent",
                                                 "bytes_received")}}
    return {"images": images, "regions": regions, "stages": stages, "total": total,
            "caption": caption, "per_image": _per(every, images), "per_region": _per(every, regions)}


def extrapolate(cost: Mapping[str, Any], images: int) -> dict[str, float] | None:
    """Totals for ``images`` images at the measured per-image averages: CPU-hours, GPU-hours,
    worker wall-hours, model calls, prompt and completion tokens (None without measured images)."""
    per = cost.get("per_image")
    if not per:
        return None
    return {"images": images, "cpu_hours": per["cpu_s"] * images / 3600,
            "gpu_hours": per["gpu_s"] * images / 3600, "wall_hours": per["wall_s"] * images / 3600,
            "calls": per["calls"] * images, "prompt_tokens": per["prompt_tokens"] * images,
            "completion_tokens": per["completion_tokens"] * images}
