"""Streaming the shards: shard lists, the sample pipeline, the loader and its resume position.

The pipeline is a chain of small generators, left to right, the way webdataset composes them:

    epoch_shards → split_by_node → split_by_worker → read_shards → shuffle → examples → batches

* Training streams epoch after epoch without end (each epoch a seeded shard order), so every
  process always has data and the run length is a number of steps, the same on 1 or N processes.
* Bad input never stops a run: unreadable shards, truncated tars, undecodable images, broken
  records or masks are counted by reason (in every batch's ``errors`` and in metrics.jsonl) and
  logged, and the sample is skipped. Only a long unbroken run of bad samples stops the worker.
* The position is kept to the shard: every batch lists the shards whose last sample it holds;
  a checkpoint stores the shards consumed per epoch, and a resumed run skips them.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import logging
import random
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import fsspec
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from trainer.samples import SampleOptions, build_example, collate
from trainer.text import Tokenizer

log = logging.getLogger("trainer.data")


# --------------------------------------------------------------------------- shard lists

def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_urls(specs: Iterable[str]) -> list[str]:
    """Shard paths/URLs from specs: files, globs, brace lists, fsspec URLs, or dataset folders.

    A folder means its ``shards/*.tar`` (a pipeline output) or else its ``*.tar``. The result is
    sorted and de-duplicated, so the same specs always give the same list.
    """
    found: set[str] = set()
    for spec in specs:
        for item in braceexpand.braceexpand(spec):
            if item.startswith("pipe:"):
                found.add(item)
                continue
            fs, path = fsspec.core.url_to_fs(item)
            remote = _is_remote(item)
            if globlib.has_magic(path):
                matches = sorted(fs.glob(path))
            elif fs.isdir(path):
                inner = path.rstrip("/") + "/shards"
                base = inner if fs.isdir(inner) else path.rstrip("/")
                matches = sorted(fs.glob(base + "/*.tar"))
            elif fs.exists(path):
                matches = [path]
            else:
                raise FileNotFoundError(f"no shards at {item}")
            found.update(fs.unstrip_protocol(m) if remote else m for m in matches)
    if not found:
        raise FileNotFoundError(f"no shards found in {list(specs)}")
    return sorted(found)


def split_holdout(urls: list[str], holdout: int) -> tuple[list[str], list[str]]:
    """The last ``holdout`` shards (sorted) for evaluation, the rest for training."""
    if holdout and holdout >= len(urls):
        raise ValueError(f"data.holdout_shards={holdout} leaves no training shard of {len(urls)}")
    return (urls[:-holdout], urls[-holdout:]) if holdout else (urls, [])


# --------------------------------------------------------------------------- errors

class ErrorCounter:
    """A webdataset ``handler``: count the error by reason, log it (rate-limited), continue."""

    def __init__(self, log_first: int = 5, log_every: int = 100) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first, self.log_every = log_first, log_every

    def record(self, stage: str, exn: BaseException, where: str = "") -> None:
        """Count one failure ``stage/ExceptionType``."""
        reason = f"{stage}/{type(exn).__name__}"
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.log_first or n % self.log_every == 0:
            log.warning("skipped bad input (%s, #%d) %s: %s", reason, n, where, str(exn)[:300])

    def __call__(self, exn: BaseException) -> bool:
        self.record("read", exn)
        return True

    def snapshot(self) -> dict[str, int]:
        """Counts so far (cumulative for this worker)."""
        return dict(self.counts)


# --------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class ShardEnd:
    """Marks a shard that yielded no sample (empty or unreadable), so it still counts as read."""

    epoch: int
    url: str


def epoch_shards(urls: list[str], seed: int, shuffle: bool, start_epoch: int = 0,
                 skip: dict[int, set[str]] | None = None) -> Iterator[dict[str, Any]]:
    """Endless ``{"url", "epoch"}`` stream: each epoch all shards, in a seeded order, minus skips."""
    skip = skip or {}
    epoch = start_epoch
    while True:
        order = list(urls)
        if shuffle:
            random.Random(f"{seed}-{epoch}").shuffle(order)
        for url in order:
            if url not in skip.get(epoch, ()):
                yield {"url": url, "epoch": epoch}
        epoch += 1


def _open(url: str) -> Any:
    if url.startswith("pipe:"):
        return wds.gopen(url)
    if _is_remote(url):
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _mark_last(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    previous = None
    for sample in samples:
        if previous is not None:
            yield previous
        previous = sample
    if previous is not None:
        previous["__last__"] = True
        yield previous


def read_shards(shards: Iterable[dict[str, Any]], handler: ErrorCounter) -> Iterator[Any]:
    """Samples of each shard (webdataset's tar reader and grouping), the last one marked."""
    for shard in shards:
        url, epoch = shard["url"], shard["epoch"]
        got = False
        try:
            stream = _open(url)
        except Exception as exn:  # noqa: BLE001 — an unreadable shard is counted, not fatal
            handler.record("open", exn, url)
            yield ShardEnd(epoch, url)
            continue
        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
            for sample in _mark_last(group_by_keys(files, handler=handler)):
                sample["__epoch__"] = epoch
                got = True
                yield sample
        if not got:
            yield ShardEnd(epoch, url)


def shuffle_tracked(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Buffer shuffle that also reports, on each sample, the shards fully yielded so far.

    ``__done__`` on a sample lists the (epoch, url) shards whose every sample has now left the
    buffer (with this one or before it).
    """
    buffer: list[dict[str, Any]] = []
    inside: Counter[tuple[int, str]] = Counter()
    finished: set[tuple[int, str]] = set()
    done: list[tuple[int, str]] = []

    def pop() -> dict[str, Any]:
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        sample = buffer.pop()
        key = (sample["__epoch__"], sample["__url__"])
        inside[key] -= 1
        if inside[key] == 0 and key in finished:
            finished.discard(key)
            del inside[key]
            done.append(key)
        sample["__done__"] = done[:]
        done.clear()
        return sample

    for item in items:
        if isinstance(item, ShardEnd):
            done.append((item.epoch, item.url))
            continue
        key = (item["__epoch__"], item["__url__"])
        inside[key] += 1
        if item.pop("__last__", False):
            finished.add(key)
        buffer.append(item)
        if len(buffer) >= max(bufsize, 1):
            yield pop()
    while buffer:
        yield pop()


def to_examples(samples: Iterable[dict[str, Any]], opts: SampleOptions, errors: ErrorCounter,
                max_consecutive: int, fixed_epoch: int | None = None) -> Iterator[dict[str, Any]]:
    """Shard samples → model inputs; a bad sample is counted and skipped (its shard info kept)."""
    done: list[tuple[int, str]] = []
    bad_run = 0
    for sample in samples:
        done.extend(sample.pop("__done__", []))
        epoch = sample["__epoch__"] if fixed_epoch is None else fixed_epoch
        try:
            example = build_example(sample, opts, epoch)
        except Exception as exn:  # noqa: BLE001 — counted by reason, never fatal on its own
            errors.record("sample", exn, f"{sample.get('__url__')}:{sample.get('__key__')}")
            bad_run += 1
            if bad_run >= max_consecutive:
                raise RuntimeError(f"{bad_run} bad samples in a row (data.max_consecutive_errors); "
                                   f"errors so far: {errors.snapshot()}") from exn
            continue
        bad_run = 0
        example["__done__"], done = done, []
        yield example


def batches(examples: Iterable[dict[str, Any]], size: int, tokenizer: Tokenizer, errors: ErrorCounter,
            worker: int, keep_partial: bool) -> Iterator[dict[str, Any]]:
    """Groups of ``size`` images collated into one batch, with the stream's bookkeeping.

    A finite stream (``keep_partial``) ends with its partial group, or with an empty batch
    (``keys == []``) when only error counts are left to report.
    """
    group: list[dict[str, Any]] = []
    reported: dict[str, int] = {}

    def finish() -> dict[str, Any]:
        nonlocal reported
        batch = collate(group, tokenizer) if group else {"keys": []}
        batch["shards_done"] = [key for e in group for key in e["__done__"]]
        batch["errors"] = reported = errors.snapshot()
        batch["worker"] = worker
        return batch

    for example in examples:
        group.append(example)
        if len(group) == size:
            yield finish()
            group = []
    if keep_partial and (group or errors.snapshot() != reported):
        yield finish()


# --------------------------------------------------------------------------- dataset + loader

@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild the stream (picklable)."""

    urls: list[str]
    options: SampleOptions
    batch_size: int                 # images per batch in this process
    train: bool = True
    seed: int = 0
    shuffle_buffer: int = 0
    max_consecutive_errors: int = 1000
    start_epoch: int = 0
    skip: dict[int, set[str]] = field(default_factory=dict)


class RegionStream(IterableDataset):
    """The sample pipeline as a torch IterableDataset (one copy per loader worker)."""

    def __init__(self, spec: StreamSpec, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        errors = ErrorCounter()
        if spec.train:
            shards: Iterable[dict[str, Any]] = epoch_shards(spec.urls, spec.seed, True, spec.start_epoch, spec.skip)
            shards = wds.split_by_node(shards)
        else:
            shards = ({"url": url, "epoch": 0} for url in spec.urls)
        shards = wds.split_by_worker(shards)
        rng = random.Random(f"{spec.seed}-{rank}-{worker}-{spec.start_epoch}")
        samples = shuffle_tracked(read_shards(shards, errors), spec.shuffle_buffer if spec.train else 0, rng)
        examples = to_examples(samples, spec.options, errors, spec.max_consecutive_errors,
                               None if spec.train else 0)
        yield from batches(examples, spec.batch_size, self.tokenizer, errors, worker, not spec.train)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor (also inside nested dicts) moved to ``device``."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value
    return {k: move(v) for k, v in batch.items()}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)   # workers decode with PIL; keep torch from oversubscribing cores
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the trainer's stop-and-checkpoint handler is not theirs


def make_loader(spec: StreamSpec, tokenizer: Tokenizer, workers: int, prefetch: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream: batches are built in ``workers`` processes."""
    extra: dict[str, Any] = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers else {}
    return DataLoader(RegionStream(spec, tokenizer), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, **extra)


# --------------------------------------------------------------------------- position

def _list_hash(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


@dataclass
class DataPosition:
    """Shards consumed so far, per epoch; complete epochs fold into ``start_epoch``.

    ``base_errors`` are the bad-input counts of earlier runs of the same output; this run's
    counts come with the batches (each worker's running totals).
    """

    urls: list[str]
    start_epoch: int = 0
    consumed: dict[int, set[str]] = field(default_factory=dict)
    base_errors: Counter[str] = field(default_factory=Counter)
    _worker_errors: dict[int, dict[str, int]] = field(default_factory=dict)
    _all: set[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all = set(self.urls)

    def update(self, batch: dict[str, Any]) -> None:
        """Account for a batch that has been trained on."""
        for epoch, url in batch["shards_done"]:
            self.consumed.setdefault(int(epoch), set()).add(url)
        self._worker_errors[batch["worker"]] = batch["errors"]
        self._fold()

    def _fold(self) -> None:
        while self.consumed.get(self.start_epoch, set()) >= self._all:
            del self.consumed[self.start_epoch]
            self.start_epoch += 1

    def run_errors(self) -> dict[str, int]:
        """Bad inputs skipped by this run's workers."""
        total: Counter[str] = Counter()
        for counts in self._worker_errors.values():
            total.update(counts)
        return dict(total)

    def error_counts(self) -> dict[str, int]:
        """Bad inputs skipped, earlier runs included."""
        return dict(Counter(self.base_errors) + Counter(self.run_errors()))

    def epoch(self) -> float:
        """Progress in epochs (complete epochs + share of the current one)."""
        return self.start_epoch + len(self.consumed.get(self.start_epoch, ())) / max(len(self.urls), 1)

    def state(self) -> dict[str, Any]:
        """JSON-able state for a checkpoint (this process's view)."""
        return {"shards": len(self.urls), "shards_hash": _list_hash(self.urls),
                "start_epoch": self.start_epoch,
                "consumed": {str(e): sorted(u) for e, u in sorted(self.consumed.items())},
                "errors": self.error_counts()}

    def merged_state(self, others: list[dict[str, Any]]) -> dict[str, Any]:
        """The state of all processes together: ``others`` are every process's ``run_state()``."""
        merged = DataPosition(self.urls, start_epoch=min(o["start_epoch"] for o in others),
                              base_errors=Counter(self.base_errors))
        for other in others:
            for epoch in range(merged.start_epoch, other["start_epoch"]):
                merged.consumed[epoch] = set(self._all)
            for epoch, urls in other["consumed"].items():
                merged.consumed.setdefault(int(epoch), set()).update(urls)
            merged.base_errors.update(other["run_errors"])
        merged._fold()
        return merged.state()

    def run_state(self) -> dict[str, Any]:
        """What merged_state needs from one process."""
        return {"start_epoch": self.start_epoch, "run_errors": self.run_errors(),
                "consumed": {e: sorted(u) for e, u in self.consumed.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], urls: list[str]) -> DataPosition:
        """Restore; a changed shard list (shards added, removed or moved) restarts at epoch 0."""
        position = cls(urls, base_errors=Counter(state.get("errors", {})))
        if state.get("shards_hash") != _list_hash(urls):
            log.warning("the training shard list changed since the checkpoint (%s shards → %d): "
                        "data position restarts at epoch 0", state.get("shards"), len(urls))
            return position
        position.start_epoch = int(state["start_epoch"])
        position.consumed = {int(e): set(u) for e, u in state["consumed"].items()}
        return position

    def stream_args(self) -> dict[str, Any]:
        """``start_epoch`` and ``skip`` for a StreamSpec."""
        return {"start_epoch": self.start_epoch, "skip": {e: set(u) for e, u in self.consumed.items()}}
