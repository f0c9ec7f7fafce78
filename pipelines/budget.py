"""The failure budget: stop a run early when infrastructure keeps failing.

A run whose caption server is down would otherwise process every image into a transient failure
row and exit 0. ``FailureBudget`` watches each worker's most recent outcomes and raises
``BudgetExceeded`` — failing the pipeline, non-zero — once the share of transient failures passes
``limits.max_transient_fraction`` over ``limits.window`` outcomes (after ``limits.min_samples``).
The message names the stage, the reason and the endpoint. Work finished before the stop is kept:
rerunning the same command continues.
"""
from __future__ import annotations

import re
from collections import Counter, deque
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.types import Failure, ShardOutcome
from settings.secrets import mask_text

MARKER = "failure budget exceeded"
_URL = re.compile(r"https?://[^\s'\"),]+")


class BudgetExceeded(RuntimeError):
    """Too many transient failures: the run stops instead of writing a dataset of failures."""


def endpoint_of(detail: str) -> str | None:
    """The first URL a failure's detail names (the endpoint that failed), if any; credentials in
    it are masked."""
    match = _URL.search(mask_text(detail))
    return match.group(0).rstrip(".:") if match else None


def describe(failures: Iterable[Failure], seen: int, transient: int, limit: float) -> str:
    """Why the run stopped: share, the most common stage/reason and the endpoints it hit."""
    by_reason: Counter = Counter()
    endpoints: dict[str, Counter] = {}
    for f in failures:
        name = f"{f.stage}/{f.reason}"
        by_reason[name] += 1
        url = endpoint_of(f.detail)
        if url:
            endpoints.setdefault(name, Counter())[url] += 1
    parts = []
    for name, count in by_reason.most_common(3):
        urls = ", ".join(u for u, _ in endpoints.get(name, Counter()).most_common(2))
        parts.append(f"{name} ×{count}" + (f" at {urls}" if urls else ""))
    return (f"{MARKER}: {transient} of the last {seen} inputs failed transiently "
            f"(limit {limit:.0%}, limits.max_transient_fraction): {'; '.join(parts)}. Fix the "
            f"infrastructure (is the model server up?), then rerun the same command: finished "
            f"shards are kept and only the failed inputs are redone.")


def check(recent: "deque[ShardOutcome]", limit: float, min_samples: int,
          transient_count: int | None = None) -> str | None:
    """The stop message if the recent outcomes break the budget, else None. ``transient_count``:
    how many of ``recent`` are transient, when the caller keeps that count."""
    if len(recent) < min_samples:
        return None
    if transient_count is None:
        transient_count = sum(1 for o in recent if o.transient)
    if transient_count <= limit * len(recent):
        return None
    transient = [o for o in recent if o.transient]
    failures = [f for o in transient for f in o.failures if f.transient]
    return describe(failures, len(recent), len(transient), limit)


class FailureBudget(beam.DoFn):
    """Passes outcomes through; raises BudgetExceeded when this worker's recent outcomes break
    the budget."""

    def __init__(self, max_fraction: float, min_samples: int, window: int) -> None:
        self.max_fraction, self.min_samples, self.window = max_fraction, min_samples, window
        self.recent: deque[ShardOutcome] = deque(maxlen=window)
        self.transient_count = 0   # transient outcomes in ``recent`` (no scan per element)

    def setup(self) -> None:
        self.recent = deque(maxlen=self.window)
        self.transient_count = 0

    def process(self, outcome: ShardOutcome) -> Iterator[ShardOutcome]:
        slim = ShardOutcome(outcome.key, outcome.shard, None, None, outcome.failures, {})
        if len(self.recent) == self.recent.maxlen and self.recent[0].transient:
            self.transient_count -= 1   # the oldest leaves the window
        self.recent.append(slim)
        if outcome.transient:
            self.transient_count += 1
            Metrics.counter("dataset", "transient").inc()
        message = check(self.recent, self.max_fraction, self.min_samples, self.transient_count)
        if message is not None:
            raise BudgetExceeded(message)
        yield outcome
