"""The card's "Judge and consistency" section (pipelines/card.py): exact counts, the most common
reasons escaped so model text can neither break a table nor inject HTML, quantiles of the
consistency score, the same bytes for the same stats, and datasets without verdicts (built
before the columns existed, or without a judge) rendering without the section.

The datasets are built by the pipeline (default annotators), then given verdicts the way the
pipeline writes them: records changed, shards and index files written again with
``pipelines.writer`` and dropped regions added as failure rows."""
from __future__ import annotations

import json
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines import card, writer
from pipelines.types import Failure
from schemas import FAILURES_SCHEMA, IMAGES_SCHEMA, REGIONS_SCHEMA
from tests.conftest import build

# Model text: a table separator, markup, a newline, Markdown emphasis
FLAG_REASON = "says red | but it is blue <script>alert(1)</script>\nsecond *line*"
DROP_REASON = "no hat | here <b>bold</b>\nat all"
OTHER_DROP_REASON = "wrong colour"
KEPT_REASON = "matches the pixels"


@dataclass
class Judged:
    """What ``add_verdicts`` did: the counts the card and preview must show."""

    kept: int = 0
    flagged: dict[str, str] = field(default_factory=dict)                        # key → region id
    consistency_flagged: dict[str, str] = field(default_factory=dict)            # key → region id
    # key → (region id, failure reason, detail)
    dropped: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)

    def drops(self, reason: str) -> int:
        """Regions dropped with failure reason ``reason``."""
        return sum(r == reason for rows in self.dropped.values() for _, r, _ in rows)


def _leaves(record: dict[str, Any]) -> list[str]:
    parents = {r["parent"] for r in record["regions"]}
    return [r["id"] for r in record["regions"] if r["id"] not in parents]


def _judge_record(record: dict[str, Any], index: int, judged: Judged) -> list[tuple[str, str, str]]:
    """Verdicts and scores on every region of the ``index``-th record; returns the regions it
    removed as (region id, failure reason, detail)."""
    leaves = _leaves(record)
    remove: list[tuple[str, str, str]] = []
    if index in (1, 2):
        remove.append((leaves[0], card.JUDGE_REJECTED, DROP_REASON))
    if index == 3:
        remove.append((leaves[0], card.JUDGE_REJECTED, OTHER_DROP_REASON))
    if index == 2:
        remove.append((leaves[1], card.INCONSISTENT, "score 0.031 below 0.2"))
    gone = {region_id for region_id, _, _ in remove}
    record["regions"] = [r for r in record["regions"] if r["id"] not in gone]
    record["image_level"]["judge"] = {"keep": True, "reason": KEPT_REASON}
    for n, region in enumerate(record["regions"]):
        flagged = index == 0 and region["id"] == leaves[0]
        region["judge"] = {"keep": not flagged, "reason": FLAG_REASON if flagged else KEPT_REASON}
        score = round(0.2 + 0.007 * ((n * 37 + index * 11) % 100), 3)   # 3 decimals: exact quantiles
        region["scores"] |= {"judge_keep": 0.0 if flagged else 1.0, "consistency": score}
        if index == 1 and region["id"] == leaves[1]:
            region["scores"] |= {"consistency": 0.012, "consistency_flag": 1.0}
            judged.consistency_flagged[record["key"]] = region["id"]
        if flagged:
            judged.flagged[record["key"]] = region["id"]
        else:
            judged.kept += 1
        judged.scores.append(region["scores"]["consistency"])
    return remove


def _rewrite_shard(out: Path, shard: str, changed: list[tuple[dict[str, Any], str, bytes]],
                   failures: list[dict[str, Any]]) -> None:
    """Shard tar and index files of ``shard`` from (record, image format, image) with the
    writer's functions; ``failures`` appended to its failures file."""
    (out / "shards" / f"{shard}.tar").write_bytes(writer.tar_bytes(
        [(rec["key"], ext, image, writer.record_json(rec)) for rec, ext, image in changed]))
    records = [rec for rec, _, _ in changed]
    (out / "index" / "images" / f"{shard}.parquet").write_bytes(
        writer.parquet_bytes([writer.image_row(rec, shard) for rec in records], IMAGES_SCHEMA))
    (out / "index" / "regions" / f"{shard}.parquet").write_bytes(
        writer.parquet_bytes(writer.region_columns(records, shard), REGIONS_SCHEMA))
    path = out / "failures" / f"{shard}.parquet"
    old = pq.read_table(path).to_pylist() if path.exists() else []
    path.write_bytes(writer.parquet_bytes(old + failures, FAILURES_SCHEMA))


def add_verdicts(out: Path) -> Judged:
    """Judge verdicts and consistency scores on a built dataset, as a ``longgrit`` build with
    ``on_reject: drop`` (and one region flagged) and a consistency filter would write them: region
    0 of the first record flagged by the judge; a region of records 1, 2 and 3 dropped by the
    judge (two with ``DROP_REASON``), one of record 2 dropped by the consistency filter, one of
    record 1 flagged by it."""
    judged, index = Judged(), 0
    for tar_path in sorted((out / "shards").glob("*.tar")):
        shard = tar_path.name[:-len(".tar")]
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
        changed, failures = [], []
        for key in sorted(samples):
            record = json.loads(samples[key]["json"])
            fmt = record["image"]["format"]
            removed = _judge_record(record, index, judged)
            if removed:
                judged.dropped[key] = removed
            stage = {card.JUDGE_REJECTED: "caption", card.INCONSISTENT: "consistency"}
            failures += [Failure(key, record["source"]["uri"], stage[reason], reason, detail, region_id,
                                 shard).row() for region_id, reason, detail in removed]
            changed.append((record, fmt, samples[key][fmt]))
            index += 1
        _rewrite_shard(out, shard, changed, failures)
    return judged


def without_verdict_columns(out: Path) -> None:
    """The index as a build before the verdict columns wrote it."""
    for path in (out / "index" / "regions").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(card.Verdicts.REGION_COLUMNS + ["label"]), path)


def _manifest(out: Path) -> dict[str, Any]:
    """The build's manifest without its stats (``card.write`` computes them again)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("stats", None)
    return manifest


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Judged]:
    """A dataset without verdicts (default annotators), and a copy of it with verdicts."""
    tmp = tmp_path_factory.mktemp("card-quality")
    plain, _ = build(tmp, "synthetic://4?size=96", name="plain", config={
        "shards": {"samples_per_shard": 2}, "segmenter": {"name": "classical", "work_side": 96}})
    judged_out = tmp / "judged"
    shutil.copytree(plain, judged_out)
    return plain, judged_out, add_verdicts(judged_out)


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row: split at the ``|`` that are not backslash-escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _tables(text: str) -> dict[str, list[list[str]]]:
    """The tables of the card's "Judge and consistency" section by their first header cell:
    their body rows as cells."""
    start = text.index("## Judge and consistency")
    section = text[start:text.index("\n## ", start + 1)]
    tables: dict[str, list[list[str]]] = {}
    for block in section.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            tables[_cells(lines[0])[0]] = [_cells(line) for line in lines[2:]]
    return tables


def test_card_counts_verdicts_and_reasons(datasets: tuple[Path, Path, Judged]) -> None:
    _, out, judged = datasets
    card.write(str(out), _manifest(out))
    text = (out / "README.md").read_text()
    tables = _tables(text)
    flagged, dropped = len(judged.flagged), judged.drops(card.JUDGE_REJECTED)
    assert (flagged, dropped, judged.drops(card.INCONSISTENT)) == (1, 3, 1)
    total = judged.kept + flagged + dropped
    assert tables["judge"] == [["judged", str(total)], ["kept", str(judged.kept)],
                               ["flagged (in the records)", "1"], ["dropped (failure rows)", "3"],
                               ["rejected (flagged + dropped)", f"4 ({4 / total:.1%})"]]
    # reasons: one line each, in three cells, escaped; the most common drop reason first
    assert tables["verdict"] == [
        ["dropped", r"no hat \| here &lt;b&gt;bold&lt;/b&gt; at all", "2"],
        ["dropped", OTHER_DROP_REASON, "1"],
        ["flagged", r"says red \| but it is blue &lt;script&gt;alert(1)&lt;/script&gt; second \*line\*", "1"]]
    assert "<script>" not in text and "<b>" not in text
    # consistency: the regions in the records, quantiles of their scores, flagged and dropped
    scores = sorted(judged.scores)
    expected = [next(v for i, v in enumerate(scores) if i + 1 >= q * len(scores)) for q in (0.1, 0.5, 0.9)]
    assert tables["consistency"] == [["scored (in the records)", str(len(scores))],
                                     ["score p10 / p50 / p90", " / ".join(f"{v:.3f}" for v in expected)],
                                     ["flagged (below the threshold, kept)", "1"],
                                     ["dropped (failure rows)", "1"]]
    # the card's failures table has the drops too
    assert "| permanent | caption | judge_rejected | region | 3 |" in text


def test_card_is_the_same_bytes_for_the_same_dataset(datasets: tuple[Path, Path, Judged]) -> None:
    _, out, _ = datasets
    first = card.render(_manifest(out) | {"stats": card.dataset_stats(str(out))})
    stats = json.loads(json.dumps(card.dataset_stats(str(out))))   # as stored in manifest.json
    assert card.render(_manifest(out) | {"stats": stats}) == first


def test_reasons_are_cut_and_cannot_break_a_table() -> None:
    long = "x" * 300
    assert len(card.short_reason(long)) == card.MAX_REASON_CHARS and card.short_reason(long).endswith("…")
    cell = card.markdown_cell("a|b\r\n\x1b[31m`code` [link](http://x) _i_ ~s~ $m$ \\ <img src=x onerror=y>")
    assert "\n" not in cell and "\r" not in cell and "\x1b" not in cell
    assert len(_cells(f"| {cell} | 1 |")) == 2
    assert "<" not in cell and all(f"\\{c}" in cell for c in "|`[]_~$")
    assert card.markdown_cell("  ") == "(no reason)"


def test_datasets_without_verdicts_have_no_section(datasets: tuple[Path, Path, Judged],
                                                   tmp_path: Path) -> None:
    plain, _, _ = datasets
    stats = card.dataset_stats(str(plain))     # built with the columns, all null
    assert stats["verdicts"]["judge"]["judged"] == 0 and stats["verdicts"]["consistency"]["scored"] == 0
    assert "## Judge and consistency" not in card.render(_manifest(plain) | {"stats": stats})
    old = tmp_path / "old"                     # built before the columns existed
    shutil.copytree(plain, old)
    without_verdict_columns(old)
    assert card.dataset_stats(str(old)) == stats
    card.write(str(old), _manifest(old))
    text = (old / "README.md").read_text()
    assert "## Text" in text and "## Judge and consistency" not in text
    # stats written by an earlier version (no "verdicts") in a manifest
    older = {k: v for k, v in stats.items() if k != "verdicts"}
    assert "## Judge and consistency" not in card.render(_manifest(plain) | {"stats": older})
