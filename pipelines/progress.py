"""Live progress of a build: images done / total, images/s, ETA, failures so far by class.

Workers count the outcomes they finish (``CountProgress``) and write their counts to small files
under ``_work/progress/`` every few seconds; the number of inputs this run processes is written
there once it is known. On a local runner the driver's ``Monitor`` thread sums those files and
shows a bar on a terminal, or a log line every ``log_every_s`` when stderr is not a terminal (CI,
Airflow). On a distributed runner the same numbers are Beam counters (``dataset/written``,
``dataset/transient``, ``failures/*``) in the runner's own monitoring.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Iterator, TextIO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipelines import layout as lay
from pipelines.types import ShardOutcome

LOG = logging.getLogger("progress")


def progress_dir(out: str, run_id: str) -> str:
    """Where this run's workers leave their counts."""
    return lay.join(out, lay.WORK_DIR, "progress", run_id)


class CountProgress(beam.DoFn):
    """Passes outcomes through, counting them; writes this worker's counts every ``every_s``."""

    def __init__(self, out: str, run_id: str, every_s: float = 2.0) -> None:
        self.out, self.run_id, self.every_s = out, run_id, every_s
        self.counts: dict[str, int] = {}
        self.path = ""
        self.last = 0.0

    def setup(self) -> None:
        self.counts = {"done": 0, "written": 0, "permanent": 0, "transient": 0}
        self.path = FileSystems.join(progress_dir(self.out, self.run_id),
                                     f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")

    def process(self, outcome: ShardOutcome) -> Iterator[ShardOutcome]:
        self.counts["done"] += 1
        if outcome.transient:
            self.counts["transient"] += 1
        elif outcome.record is None:
            self.counts["permanent"] += 1
        else:
            self.counts["written"] += 1
        if time.monotonic() - self.last >= self.every_s:
            self._write()
        yield outcome

    def _in_flight(self) -> int:
        try:   # requests this process's caption backend is waiting on
            from annotators.caption.backends.base import IN_FLIGHT

            return IN_FLIGHT.value
        except ImportError:
            return 0

    def finish_bundle(self) -> None:
        self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        try:
            lay.write_atomic(self.path, json.dumps(self.counts | {"in_flight": self._in_flight()}).encode())
        except Exception:   # progress is best effort; it never fails the build
            LOG.debug("could not write progress", exc_info=True)


def write_total(total: int, out: str, run_id: str) -> None:
    """The number of inputs this run processes (known once the inputs are planned)."""
    lay.write_atomic(FileSystems.join(progress_dir(out, run_id), "total.json"),
                     json.dumps({"total": total}).encode())


def read(out: str, run_id: str) -> dict[str, int]:
    """Summed counts of all workers of a run (and the total, -1 while unknown)."""
    summed = {"done": 0, "written": 0, "permanent": 0, "transient": 0, "in_flight": 0, "total": -1}
    try:
        matched = FileSystems.match([FileSystems.join(progress_dir(out, run_id), "*.json")])[0]
    except Exception:
        return summed
    for meta in matched.metadata_list:
        try:
            with FileSystems.open(meta.path) as handle:
                data = json.loads(handle.read())
        except Exception:   # a file being replaced
            continue
        for name, value in data.items():
            summed[name] = value if name == "total" else summed.get(name, 0) + int(value)
    return summed


def line(counts: dict[str, int], seconds: float) -> str:
    """One progress line: done / total, rate, ETA, failures by class."""
    done, total = counts["done"], counts["total"]
    rate = done / seconds if seconds > 0 else 0.0
    if total >= 0:
        share = f"{done}/{total} ({100 * done / max(total, 1):.0f}%)"
        left = max(total - done, 0)
        eta = f"ETA {_duration(left / rate)}" if rate > 0 and left else ("done" if not left else "ETA ?")
    else:
        share, eta = f"{done}/? (listing inputs)", "ETA ?"
    flight = f" · {counts['in_flight']} requests in flight" if counts.get("in_flight") else ""
    return (f"images {share} · {rate:.1f} img/s · {eta} · failed: {counts['permanent']} permanent, "
            f"{counts['transient']} transient{flight}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Monitor:
    """Driver thread: shows the run's progress until stopped."""

    def __init__(self, out: str, run_id: str, stream: TextIO | None = None, every_s: float = 1.0,
                 log_every_s: float = 30.0) -> None:
        self.out, self.run_id = out, run_id
        self.stream = stream or sys.stderr
        self.every_s, self.log_every_s = every_s, log_every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.start = time.monotonic()
        self.last_line = ""

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._show(final=True)

    def _loop(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(self.every_s):
            if self.tty:
                self._show()
            elif time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                self._show()

    def _show(self, final: bool = False) -> None:
        counts = read(self.out, self.run_id)
        if counts["done"] == 0 and counts["total"] < 0 and final:
            return
        self.last_line = line(counts, time.monotonic() - self.start)
        if self.tty:
            self.stream.write("\r\033[K" + self.last_line + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.stream.write(self.last_line + "\n")
            self.stream.flush()
