"""Which inputs this run must process, and into which shard each goes.

``PlanInputs`` joins the inputs with the *members* of the shards already written (complete or
waiting for a retry, ``_work/*/members.parquet``) by key, inside the pipeline:

* an input whose (key, uri) is already a member is settled: skipped;
* a member no input names any more has *vanished*: reported (and, with ``prune``, its shard is
  rebuilt without it);
* a key used by two different inputs keeps the member, else the smallest uri; the others are
  ``read/duplicate_key`` failure rows — never two samples;
* every other input is new: its shard is ``layout.shard_name(bucket_of(key), next generation)``.

``DropDuplicates`` then hashes the new inputs' bytes and groups only ``(sha256, key)`` pairs (plus
the members' hashes): an image already written keeps its place, otherwise the smallest key keeps
it; the others are ``dedup/duplicate`` failure rows.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from pipelines import decode as dec
from pipelines import layout as lay
from pipelines.types import Failure, ImageRef

FAILED = "failed"
VANISHED = "vanished"
PRESENT = "present"


def _failure(ref: ImageRef, stage: str, reason: str, detail: str) -> Failure:
    Metrics.counter("failures", f"{stage}.{reason}").inc()
    return Failure(ref.key, ref.uri, stage, reason, detail, None, ref.shard)


class ReadMembers(beam.PTransform):
    """(key, member row) of every shard already written under OUT."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        pattern = lay.join(self.out, lay.WORK_DIR, "*", "members.parquet")
        return (pbegin | "MatchMembers" >> fileio.MatchFiles(pattern, empty_match_treatment="ALLOW")
                | "MemberPaths" >> beam.Map(lambda m: m.path)
                | "MemberRows" >> beam.io.ReadAllFromParquet()
                | "ByKey" >> beam.Map(lambda row: (row["key"], row)))


class ReadCompleteStats(beam.PTransform):
    """Stats of every complete shard under OUT (their completion markers)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        from pipelines.writer import read_json

        pattern = lay.join(self.out, lay.WORK_DIR, "*", "stats.json")
        return (pbegin | "MatchStats" >> fileio.MatchFiles(pattern, empty_match_treatment="ALLOW")
                | "ReadStats" >> beam.Map(lambda m: read_json(m.path)))


def decide(grouped: tuple[str, dict[str, list[Any]]], buckets: int, next_generation: dict[int, int],
           split: str, pruned: Iterable[str]) -> Iterator[Any]:
    """One key's inputs and members → new refs (main), failures, vanished members and the
    number of distinct inputs with this key."""
    key, groups = grouped
    pruned = set(pruned)
    members = [m for m in groups["members"] if m["shard"] not in pruned]
    refs = list({r.uri: r for r in sorted(groups["refs"], key=lambda r: r.uri)}.values())
    uris = {r.uri for r in refs}   # the same file listed twice is one input
    yield pvalue.TaggedOutput(PRESENT, len(refs))
    for member in groups["members"]:
        if member["uri"] not in uris:
            yield pvalue.TaggedOutput(VANISHED, member)
    settled = {m["uri"] for m in members}
    holder = next((m["uri"] for m in members if m["status"] == "written"), None)
    bucket = lay.bucket_of(key, buckets)
    shard = lay.shard_name(split, bucket, next_generation.get(bucket, 0))
    for ref in refs:
        if ref.uri in settled:
            continue
        ref.shard = shard
        if holder is not None:
            yield pvalue.TaggedOutput(FAILED, _failure(
                ref, "read", "duplicate_key", f"key '{key}' is already used by {holder}"))
            continue
        holder = ref.uri
        yield ref


def vanished_shards(members: beam.PCollection) -> beam.PCollection:
    """Names of shards holding vanished members."""
    return (members | "VanishedShard" >> beam.Map(lambda m: m["shard"])
            | "DistinctShards" >> beam.Distinct())


class PlanInputs(beam.PTransform):
    """ImageRefs → (new refs with shards, failures, vanished members, members by key)."""

    def __init__(self, out: str, split: str, samples_per_shard: int, buckets: int | None,
                 prune: bool) -> None:
        super().__init__()
        self.out, self.split, self.samples_per_shard = out, split, samples_per_shard
        self.buckets, self.prune = buckets, prune

    def expand(self, refs: beam.PCollection) -> dict[str, beam.PCollection]:
        p = refs.pipeline
        members = p | "ReadMembers" >> ReadMembers(self.out)
        complete = p | "ReadCompleteStats" >> ReadCompleteStats(self.out)
        split, per_shard = self.split, self.samples_per_shard
        if self.buckets is None:   # first run: fixed from the number of inputs, counted here
            buckets = (refs | "CountInputs" >> beam.combiners.Count.Globally()
                       | "Buckets" >> beam.Map(lambda n: lay.bucket_count(n, per_shard)))
        else:
            buckets = p | "KnownBuckets" >> beam.Create([self.buckets])
        generations = (complete | "Generations" >> beam.FlatMap(
            lambda st: lay.next_generations(split, [st["shard"]]).items())
            | "NextGeneration" >> beam.CombinePerKey(max))
        grouped = ({"refs": refs | "RefsByKey" >> beam.Map(lambda r: (r.key, r)), "members": members}
                   | "JoinMembers" >> beam.CoGroupByKey())
        if self.prune:
            first = grouped | "FindVanished" >> beam.FlatMap(
                lambda g: [m for m in g[1]["members"] if m["uri"] not in {r.uri for r in g[1]["refs"]}])
            pruned = vanished_shards(first)
        else:
            pruned = p | "NothingPruned" >> beam.Create([])
        planned = grouped | "Decide" >> beam.FlatMap(
            decide, pvalue.AsSingleton(buckets), pvalue.AsDict(generations), split,
            pvalue.AsList(pruned)).with_outputs(FAILED, VANISHED, PRESENT, main="new")
        live = members | "LiveMembers" >> beam.Filter(
            lambda kv, gone: kv[1]["shard"] not in set(gone), pvalue.AsList(pruned))
        return {"new": planned.new, "failed": planned[FAILED], "vanished": planned[VANISHED],
                "present": planned[PRESENT],
                "members": live, "complete": complete, "buckets": buckets, "pruned": pruned}


# --------------------------------------------------------------------------- duplicates


class HashInputs(beam.DoFn):
    """New ref → (sha256, ref) from its bytes (dropped right away: only the hash travels on)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def process(self, ref: ImageRef) -> Iterator[Any]:
        if ref.loader["kind"] == "invalid":
            yield pvalue.TaggedOutput(FAILED, _failure(ref, "read", ref.loader["reason"],
                                                       ref.loader["detail"]))
            return
        try:
            data, _ = dec.read_bytes(ref, self.max_bytes)
        except dec.InputError as exc:
            yield pvalue.TaggedOutput(FAILED, _failure(ref, "read", exc.reason, exc.detail))
            return
        yield hashlib.sha256(data).hexdigest(), ref


def keep_one(grouped: tuple[str, Iterable[Any]]) -> Iterator[Any]:
    """(sha256, refs and member rows) → the keeper ref (main) and duplicate failures."""
    sha, values = grouped
    values = list(values)
    written = sorted(v["key"] for v in values if isinstance(v, dict) and v["status"] == "written")
    refs = sorted((v for v in values if isinstance(v, ImageRef)), key=lambda r: (r.key, r.uri))
    keeper = written[0] if written else (refs[0].key if refs else None)
    for ref in refs:
        if ref.key == keeper and not written:
            yield ref
            keeper = None   # one keeper, even if a key were listed twice
            continue
        yield pvalue.TaggedOutput(FAILED, _failure(
            ref, "dedup", "duplicate", f"same sha256 as '{written[0] if written else refs[0].key}' "
                                       f"sha256={sha}"))


class DropDuplicates(beam.PTransform):
    """New refs → refs whose bytes are not already kept (only hashes and refs are shuffled)."""

    def __init__(self, members: beam.PCollection, max_bytes: int) -> None:
        super().__init__()
        self.members, self.max_bytes = members, max_bytes

    def expand(self, refs: beam.PCollection) -> dict[str, beam.PCollection]:
        hashed = refs | "Hash" >> beam.ParDo(HashInputs(self.max_bytes)).with_outputs(FAILED, main="ok")
        known = (self.members | "WrittenMembers" >> beam.Filter(lambda kv: kv[1]["status"] == "written")
                 | "MemberSha" >> beam.Map(lambda kv: (kv[1]["sha256"], kv[1])))
        kept = ((hashed.ok, known) | "AllHashes" >> beam.Flatten()
                | "BySha" >> beam.GroupByKey()
                | "KeepOne" >> beam.FlatMap(keep_one).with_outputs(FAILED, main="ok"))
        failed = (hashed[FAILED], kept[FAILED]) | "DedupFailures" >> beam.Flatten()
        return {"ok": kept.ok, "failed": failed}
