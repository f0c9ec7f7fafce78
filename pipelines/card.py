"""The dataset card (OUT/README.md) and the files beside it that make the folder loadable.

The card follows the Hugging Face dataset-card format: a YAML header (license placeholder, task
categories, size category, ``configs`` whose ``data_files`` let ``load_dataset(<folder>)`` read
the shards and the index tables), then what the dataset is, how it was built, counts per level,
text statistics with plots (``plots/*.png``), the judge's verdicts and the consistency scores
(when the dataset has any), failures by class, what it cost (per image and per region, and
extrapolated to 1M and 10M images: ``pipelines.cost``), the schema and loading snippets that run
as written from the dataset folder (a test runs them).

Entry points:

* ``dataset_stats(out)``: caption-length distributions, regions per image, top tags, failures
  by class/stage/reason and ``verdicts`` (``Verdicts``: regions judged, kept, flagged, dropped and
  the most common reasons; consistency quantiles, flagged, dropped), read column by column from
  ``index/`` and ``failures/`` (one parquet file at a time, in record batches: memory does not
  grow with the dataset);
* ``render(manifest)``: the Markdown card; uses ``manifest["stats"]`` when present;
* ``write(out, manifest)``: stats (unless the manifest has them), plots, ``wids-index.json``
  and README.md.
"""
from __future__ import annotations

import html
import io
import json
import re
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.cost import EXTRAPOLATE_TO, STAGES, extrapolate

LEVELS = ("image", "region", "pixel")
TOP_TAGS = 20
HIST_BINS = 20
MAX_DISTINCT_TAGS = 1_000_000    # past this the tag counts are pruned to the most frequent
KEEP_AFTER_PRUNE = 100_000
TOP_REASONS = 5          # judge reasons shown per kind (drops, flags)
MAX_REASON_CHARS = 100   # a reason is cut to this many characters, counted and shown
JUDGE_REJECTED, INCONSISTENT = "judge_rejected", "inconsistent_text"   # failure reasons
SCORE_STEPS = 1000       # consistency scores are counted in steps of 1/1000 (quantiles to 3 decimals)
PLOTS = {"caption_lengths": "plots/caption_lengths.png", "regions_per_image": "plots/regions_per_image.png",
         "top_tags": "plots/top_tags.png"}
WIDS_INDEX = "wids-index.json"
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                    (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                    (1_000_000_000, "100M<n<1B"))


# --------------------------------------------------------------------------- statistics


def _parquet_files(out: str, folder: str) -> list[str]:
    try:
        matched = FileSystems.match([FileSystems.join(out, *folder.split("/"), "*.parquet")])[0]
    except Exception:
        return []
    return sorted(m.path for m in matched.metadata_list)


def _batches(path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of those of ``columns`` that one parquet file has (a local path, or any
    Beam filesystem path: then the one file is read into memory). Files written before a column
    existed (``judge_keep``, ``consistency``, ...) give batches without it."""
    if "://" in path:
        with FileSystems.open(path) as handle:
            source: Any = io.BytesIO(handle.read())
    else:
        source = path
    file = pq.ParquetFile(source)
    present = [c for c in columns if c in file.schema_arrow.names]
    yield from file.iter_batches(batch_size=65_536, columns=present)


def _count_values(counter: Counter, array: pa.Array) -> None:
    if len(array):
        for item in pc.value_counts(array).to_pylist():
            if item["values"] is not None:
                counter[item["values"]] += item["counts"]


def _prune(counter: Counter) -> None:
    """Past ``MAX_DISTINCT_TAGS`` distinct values keep the ``KEEP_AFTER_PRUNE`` most frequent."""
    if len(counter) > MAX_DISTINCT_TAGS:
        kept = counter.most_common(KEEP_AFTER_PRUNE)
        counter.clear()
        counter.update(dict(kept))


def _count_tags(counter: Counter, tags: pa.Array) -> None:
    _count_values(counter, pc.list_flatten(tags))
    _prune(counter)


def short_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A judge's reason as one line of at most ``limit`` characters: whitespace (newlines
    included) collapsed, control characters dropped; reasons that agree that far count as one."""
    line = " ".join("".join(ch for ch in str(text) if ch.isprintable() or ch.isspace()).split())
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def _quantiles(counts: Counter, wanted: list[tuple[float, str]]) -> dict[str, Any]:
    """The smallest value with at least q of the total at or below it, for each (q, name)."""
    total, seen, out, wanted = sum(counts.values()), 0, {}, list(wanted)
    for value in sorted(counts):
        seen += counts[value]
        while wanted and seen >= wanted[0][0] * total:
            out[wanted.pop(0)[1]] = value
    return out


def distribution(lengths: Counter, bins: int = HIST_BINS) -> dict[str, Any]:
    """Count, mean, quantiles and an equal-width histogram of a {value: count} table."""
    total = sum(lengths.values())
    if not total:
        return {"count": 0}
    values = sorted(lengths)
    quantiles = _quantiles(lengths, [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")])
    low, high = values[0], values[-1]
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * (-(-(high - low + 1) // width))
    for value in values:
        counts[(value - low) // width] += lengths[value]
    return {"count": total, "mean": round(sum(v * n for v, n in lengths.items()) / total, 1),
            "min": low, **quantiles, "max": high,
            "bin_edges": [low + i * width for i in range(len(counts) + 1)], "bin_counts": counts}


def _ranked(counter: Counter, top: int) -> list[list[Any]]:
    return [[value, n] for value, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


class Verdicts:
    """Judge verdicts and consistency scores of a dataset, counted a record batch at a time:
    regions in the records (kept or flagged) from ``index/regions``, regions dropped
    (``judge_rejected``, ``inconsistent_text``) from ``failures/``. Index files without the
    columns (datasets built before them) add nothing."""

    REGION_COLUMNS = ["judge_keep", "judge_reason", "consistency", "consistency_flagged"]

    def __init__(self) -> None:
        self.judge_keep: Counter = Counter()            # True / False
        self.consistency_flagged: Counter = Counter()   # True / False
        self.scores: Counter = Counter()                # consistency, in 1/SCORE_STEPS
        self.flag_reasons: Counter = Counter()
        self.drop_reasons: Counter = Counter()
        self.dropped: Counter = Counter()               # (failure reason, "region" | "input")

    def add_regions(self, batch: pa.RecordBatch) -> None:
        """Count a batch of ``index/regions`` rows (any of ``REGION_COLUMNS`` may be missing)."""
        names = batch.schema.names
        if "judge_keep" in names:
            keep = batch.column("judge_keep")
            _count_values(self.judge_keep, keep)
            if "judge_reason" in names:
                reasons = batch.filter(pc.equal(keep, False)).column("judge_reason").to_pylist()
                self.flag_reasons.update(short_reason(r) for r in reasons if r is not None)
                _prune(self.flag_reasons)
        if "consistency" in names:
            scores = pc.drop_null(batch.column("consistency"))
            scores = scores.filter(pc.is_finite(scores))
            _count_values(self.scores, pc.cast(pc.round(pc.multiply(scores, SCORE_STEPS)), pa.int64()))
        if "consistency_flagged" in names:
            _count_values(self.consistency_flagged, batch.column("consistency_flagged"))

    def add_failures(self, batch: pa.RecordBatch) -> None:
        """Count a batch of ``failures`` rows: drops by the judge (with their reasons, the rows'
        ``detail``) and by the consistency filter."""
        for name in (JUDGE_REJECTED, INCONSISTENT):
            rows = batch.filter(pc.equal(batch.column("reason"), name))
            on_region = pc.is_valid(rows.column("region_id"))
            regions = pc.sum(on_region).as_py() or 0
            self.dropped[name, "region"] += regions
            self.dropped[name, "input"] += rows.num_rows - regions
            if name == JUDGE_REJECTED and regions:
                self.drop_reasons.update(short_reason(d) for d in rows.filter(on_region).column("detail")
                                         .to_pylist())
                _prune(self.drop_reasons)

    def summary(self, top: int = TOP_REASONS) -> dict[str, Any]:
        """Counts, the ``top`` reasons of drops and of flags, and consistency quantiles."""
        kept, flagged = self.judge_keep[True], self.judge_keep[False]
        dropped = self.dropped[JUDGE_REJECTED, "region"]
        judged = kept + flagged + dropped
        quantiles = _quantiles(self.scores, [(0.1, "p10"), (0.5, "p50"), (0.9, "p90")])
        return {
            "judge": {"judged": judged, "kept": kept, "flagged": flagged, "dropped": dropped,
                      "images_dropped": self.dropped[JUDGE_REJECTED, "input"],
                      "drop_reasons": _ranked(self.drop_reasons, top),
                      "flag_reasons": _ranked(self.flag_reasons, top)},
            "consistency": {"scored": sum(self.scores.values()),
                            **{name: step / SCORE_STEPS for name, step in quantiles.items()},
                            "flagged": self.consistency_flagged[True],
                            "dropped": self.dropped[INCONSISTENT, "region"],
                            "images_dropped": self.dropped[INCONSISTENT, "input"]},
        }


def dataset_stats(out: str, top: int = TOP_TAGS) -> dict[str, Any]:
    """Text and failure statistics of a built dataset, from its per-shard parquet files.

    Reads only the columns it needs, one file and one record batch at a time; tags are counted
    exactly up to ``MAX_DISTINCT_TAGS`` distinct values (past that the rarest are pruned).
    """
    lengths = {(level, field): Counter() for level in LEVELS for field in ("caption", "long_caption")}
    per_image = {"region": Counter(), "pixel": Counter()}
    tags = {level: Counter() for level in LEVELS}
    images = regions = 0
    verdicts = Verdicts()
    for path in _parquet_files(out, "index/images"):
        for batch in _batches(path, ["caption_chars", "long_caption_chars", "n_regions", "n_pixel", "tags"]):
            images += batch.num_rows
            _count_values(lengths["image", "caption"], batch.column("caption_chars"))
            _count_values(lengths["image", "long_caption"], batch.column("long_caption_chars"))
            _count_values(per_image["region"], batch.column("n_regions"))
            _count_values(per_image["pixel"], batch.column("n_pixel"))
            _count_tags(tags["image"], batch.column("tags"))
    for path in _parquet_files(out, "index/regions"):
        for batch in _batches(path, ["level", "caption_chars", "long_caption_chars", "tags",
                                     *Verdicts.REGION_COLUMNS]):
            regions += batch.num_rows
            verdicts.add_regions(batch)
            for level in ("region", "pixel"):
                rows = batch.filter(pc.equal(batch.column("level"), level))
                _count_values(lengths[level, "caption"], rows.column("caption_chars"))
                _count_values(lengths[level, "long_caption"], rows.column("long_caption_chars"))
                _count_tags(tags[level], rows.column("tags"))
    failures: Counter = Counter()
    for path in _parquet_files(out, "failures"):
        for batch in _batches(path, ["class", "stage", "reason", "region_id", "detail"]):
            verdicts.add_failures(batch)
            rows = zip(*(batch.column(c).to_pylist() for c in ("class", "stage", "reason", "region_id")))
            failures.update((cls, stage, reason, "region" if rid is not None else "input")
                            for cls, stage, reason, rid in rows)
    return {
        "images": images, "regions": regions,
        "text_chars": {level: {field: distribution(lengths[level, field])
                               for field in ("caption", "long_caption")} for level in LEVELS},
        "regions_per_image": {level: distribution(c) for level, c in per_image.items()},
        "top_tags": {level: [[tag, n] for tag, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
                     for level, c in tags.items()},
        "distinct_tags": {level: len(c) for level, c in tags.items()},
        "failures": [{"class": cls, "stage": stage, "reason": reason, "what": what, "count": n}
                     for (cls, stage, reason, what), n in sorted(failures.items(),
                                                                 key=lambda kv: (kv[0][0], -kv[1], kv[0]))],
        "verdicts": verdicts.summary(),
    }


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float, **margins: float) -> Any:
    """A matplotlib figure of its own (no pyplot state), fixed margins (no layout engine: it
    would triple the drawing time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=80)
    figure.subplots_adjust(**{"left": 0.07, "right": 0.98, "bottom": 0.08, "top": 0.93,
                              "wspace": 0.3, "hspace": 0.4, **margins})
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", metadata={"Software": None})   # same stats → same bytes
    return buf.getvalue()


def _hist(axes: Any, dist: dict[str, Any], title: str, colour: str) -> None:
    axes.set_title(title, fontsize=10)
    if not dist.get("count"):
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        return
    edges = dist["bin_edges"]
    axes.bar(edges[:-1], dist["bin_counts"], width=[b - a for a, b in zip(edges, edges[1:])],
             align="edge", color=colour, edgecolor="white", linewidth=0.5)
    axes.axvline(dist["p50"], color="black", linewidth=1, linestyle="--", label=f"median {dist['p50']}")
    axes.legend(fontsize=8, frameon=False)
    axes.set_ylabel("count", fontsize=8)
    axes.tick_params(labelsize=8)


_COLOURS = {"image": "#4c72b0", "region": "#dd8452", "pixel": "#55a868"}


def plots(stats: dict[str, Any]) -> dict[str, bytes]:
    """PNG plots of ``stats``: caption lengths, regions per image, top tags (by relative path)."""
    figure = _figure(10, 6.5)
    grid = figure.subplots(2, 3)
    for column, level in enumerate(LEVELS):
        for row, field in enumerate(("caption", "long_caption")):
            _hist(grid[row][column], stats["text_chars"][level][field],
                  f"{level}: {field.replace('_', ' ')} (chars)", _COLOURS[level])
    out = {PLOTS["caption_lengths"]: _png(figure)}

    figure = _figure(8, 3, bottom=0.12, top=0.88)
    for axes, level in zip(figure.subplots(1, 2), ("region", "pixel")):
        _hist(axes, stats["regions_per_image"][level],
              f"{'boxes' if level == 'region' else 'masks'} per image", _COLOURS[level])
    out[PLOTS["regions_per_image"]] = _png(figure)

    figure = _figure(12, 5, left=0.09, wspace=0.6)
    for axes, level in zip(figure.subplots(1, 3), LEVELS):
        top = stats["top_tags"][level][:15][::-1]
        axes.set_title(f"top {level} tags", fontsize=10)
        axes.tick_params(labelsize=8)
        if top:
            axes.barh([t for t, _ in top], [n for _, n in top], color=_COLOURS[level])
        else:
            axes.text(0.5, 0.5, "no tags", ha="center", va="center", transform=axes.transAxes)
    out[PLOTS["top_tags"]] = _png(figure)
    return out


# --------------------------------------------------------------------------- the card


_SHARD = re.compile(r"^(?P<split>.+)-\d{6}(?:-\d{3})?\.tar$")


def splits(manifest: dict[str, Any]) -> list[str]:
    """Split names of the complete shards (``{split}-NNNNNN[-GGG].tar``), else the setting."""
    found = sorted({m.group("split") for s in manifest.get("shards", [])
                    if (m := _SHARD.match(s["name"]))})
    return found or [manifest.get("settings", {}).get("shards", {}).get("split", "train")]


def size_category(n: int) -> str:
    """The Hugging Face ``size_categories`` value for ``n`` examples."""
    return next((label for limit, label in _SIZE_CATEGORIES if n < limit), "n>1B")


def header(manifest: dict[str, Any]) -> list[str]:
    """The YAML front matter: what the Hub and ``load_dataset(<folder>)`` read."""
    lines = [
        "---",
        "license: unknown   # set it: the license of the source images and of the generated text",
        f"pretty_name: {json.dumps(manifest['dataset_name'])}",
        "task_categories:",
        "- image-to-text",
        "- image-segmentation",
        "- object-detection",
        "task_ids:",
        "- image-captioning",
        "- instance-segmentation",
        "size_categories:",
        f"- {size_category(manifest['counts']['written'])}",
        "tags:",
        "- multi-granularity",
        "- region-captioning",
        "- referring-expressions",
        "- webdataset",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in splits(manifest):
        lines += [f"  - split: {split}", f"    path: shards/{split}-*.tar"]
    # One config only: `datasets` picks one builder (here webdataset) for every config of a
    # folder, so the parquet index is loaded with the "parquet" builder instead (see Loading).
    return lines + ["---", ""]


def _annotator_lines(manifest: dict[str, Any]) -> list[str]:
    seg = manifest["annotators"]["segmenter"]
    cap = manifest["annotators"]["captioner"]
    lines = [f"- input: `{manifest['input']}`",
             f"- segmenter: `{seg['name']}` version {seg['version']}"
             + "".join(f", {k} `{seg[k]}`" for k in ("model_type", "checkpoint", "checkpoint_sha256",
                                                       "device", "dtype") if seg.get(k))]
    lines.append(f"- captioner: `{cap['name']}` version {cap['version']}"
                 + (f", model `{cap['model']}`" if cap.get("model") else ""))
    program = cap.get("program")
    if program:
        lines.append(f"- caption program `{program['id']}` version {program['version']}, "
                     f"hash `{program['hash']}`")
    elif cap.get("prompt_id"):
        lines.append(f"- prompts `{cap['prompt_id']}`, hash `{cap.get('prompt_hash')}`")
    prompts = cap.get("visual_prompts") or {}
    shown = [f"{level}: " + ", ".join(f"`{p['name']}` ({p['kind']})" for p in specs)
             for level, specs in prompts.items() if specs]
    lines.append("- visual prompts: " + ("; ".join(shown) if shown else
                                         "none (the captioner reads pixels, not a rendered prompt)"))
    lines.append(f"- pipeline version {manifest['pipeline_version']}, record schema version "
                 f"{manifest['schema_version']}, settings hash `{manifest['settings_hash']}` "
                 f"(the full settings and library versions are in `manifest.json`)")
    weight_free = seg["name"] in ("classical", "given") and cap["name"] == "attributes"
    if weight_free:
        lines += ["", "Built with the weight-free annotators: regions come from colour segmentation and",
                  "text from measured attributes (colour, position, size, shape). It is a fallback",
                  "that runs anywhere, not object recognition or MLLM-written text."]
    return lines


def _count_lines(manifest: dict[str, Any]) -> list[str]:
    c = manifest["counts"]
    levels = c["regions_by_level"]
    written = max(c["written"], 1)
    rows = [("inputs", c["inputs"]), ("records (images)", c["written"]),
            ("failed inputs", c["failed"]), ("inputs waiting for a retry", c["awaiting_retry"]),
            ("shards", len(manifest["shards"])),
            ("regions (boxes, level `region`)", levels.get("region", 0)),
            ("masks (level `pixel`)", levels.get("pixel", 0)),
            ("boxes per image (mean)", f"{levels.get('region', 0) / written:.1f}"),
            ("masks per image (mean)", f"{levels.get('pixel', 0) / written:.1f}"),
            ("images without masks", c["images_without_masks"])]
    lines = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    dropped = c.get("regions_dropped_by_reason") or {}
    if dropped:
        lines += ["", "Candidate regions dropped by `SelectRegions`: "
                  + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "."]
    return lines


def _text_lines(stats: dict[str, Any]) -> list[str]:
    lines = ["| level | text | count | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        for field in ("caption", "long_caption"):
            d = stats["text_chars"][level][field]
            if d.get("count"):
                lines.append(f"| {level} | {field.replace('_', ' ')} | {d['count']} | {d['mean']} | "
                             f"{d['p50']} | {d['p90']} | {d['p99']} | {d['max']} |")
    lines += ["", "Lengths in characters.", "",
              f"![caption lengths]({PLOTS['caption_lengths']})", "",
              f"![regions per image]({PLOTS['regions_per_image']})", "", "Top tags:", "",
              "| level | distinct | most frequent |", "|---|---|---|"]
    for level in LEVELS:
        top = ", ".join(f"{tag} ({n})".replace("|", "\\|") for tag, n in stats["top_tags"][level][:10]) or "—"
        lines.append(f"| {level} | {stats['distinct_tags'][level]} | {top} |")
    return lines + ["", f"![top tags]({PLOTS['top_tags']})"]


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|~$])")


def markdown_cell(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Model text as the content of one Markdown table cell: one line, at most ``limit``
    characters, HTML escaped (``<script>`` shows as text) and the punctuation Markdown reads
    (``|`` ends a cell, ``*``, ``_``, ``[``, `` ` ``, ...) backslash-escaped."""
    line = short_reason(text, limit) or "(no reason)"
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(line, quote=False))


def _judge_lines(judge: dict[str, Any]) -> list[str]:
    judged = judge["judged"]
    rejected = judge["flagged"] + judge["dropped"]
    lines = ["The caption program's judge step checks each text against the pixels. A region it "
             "rejects is *dropped* (not in the record: a failure row with reason `judge_rejected`, "
             "the judge's reason in `detail`) or, with `on_reject: flag`, *flagged* (in the record "
             "with `judge.keep` false; `judge_keep` false in `index/regions`).", "",
             "| judge | regions |", "|---|---|",
             f"| judged | {judged} |", f"| kept | {judge['kept']} |",
             f"| flagged (in the records) | {judge['flagged']} |",
             f"| dropped (failure rows) | {judge['dropped']} |",
             f"| rejected (flagged + dropped) | {rejected}"
             + (f" ({rejected / judged:.1%})" if judged else "") + " |"]
    if judge["images_dropped"]:
        lines += ["", f"Images dropped because the judge rejected their image-level text: "
                  f"{judge['images_dropped']}."]
    reasons = [("dropped", r, n) for r, n in judge["drop_reasons"]] + \
              [("flagged", r, n) for r, n in judge["flag_reasons"]]
    if reasons:
        lines += ["", f"Most common reasons (up to {TOP_REASONS} each, cut to {MAX_REASON_CHARS} "
                  "characters):", "", "| verdict | reason | regions |", "|---|---|---|"]
        lines += [f"| {verdict} | {markdown_cell(r)} | {n} |" for verdict, r, n in reasons]
    return lines


def _consistency_lines(c: dict[str, Any]) -> list[str]:
    scores = " / ".join(f"{c[q]:.3f}" for q in ("p10", "p50", "p90")) if c["scored"] else "—"
    lines = ["The consistency filter scores each region's text against its pixels (cosine "
             "similarity: `scores.consistency`, column `consistency`); below its threshold a "
             "region is flagged (`consistency_flagged`) or dropped (failure rows with reason "
             "`inconsistent_text`). The quantiles are of the regions in the records.", "",
             "| consistency | regions |", "|---|---|",
             f"| scored (in the records) | {c['scored']} |",
             f"| score p10 / p50 / p90 | {scores} |",
             f"| flagged (below the threshold, kept) | {c['flagged']} |",
             f"| dropped (failure rows) | {c['dropped']} |"]
    if c["images_dropped"]:
        lines += ["", f"Images dropped by the consistency filter: {c['images_dropped']}."]
    return lines


def verdict_lines(stats: dict[str, Any]) -> list[str]:
    """The "Judge and consistency" section; [] for a dataset without judge verdicts or
    consistency scores (or stats computed before they were counted)."""
    verdicts = stats.get("verdicts")
    if not verdicts:
        return []
    judge, consistency = verdicts["judge"], verdicts["consistency"]
    lines: list[str] = []
    if judge["judged"] or judge["images_dropped"]:
        lines += _judge_lines(judge)
    if consistency["scored"] or consistency["dropped"] or consistency["images_dropped"]:
        lines += ([""] if lines else []) + _consistency_lines(consistency)
    return lines


def _failure_lines(manifest: dict[str, Any], stats: dict[str, Any] | None) -> list[str]:
    c = manifest["counts"]
    lines = ["*permanent*: the input or a model's answer is bad (final). *transient*: infrastructure "
             "(timeouts, 5xx, connection refused, out of memory): those images are not in the shards "
             "yet and the same build command redoes them."]
    if stats is not None and stats["failures"]:
        lines += ["", "| class | stage | reason | what | rows |", "|---|---|---|---|---|"]
        lines += [f"| {f['class']} | {f['stage']} | {f['reason']} | {f['what']} | {f['count']} |"
                  for f in stats["failures"]]
    elif c["failed_by_reason"] or c["region_failures_by_reason"]:
        lines += ["", f"- inputs by class: {json.dumps(c['failed_by_class'])}",
                  f"- inputs by reason: {json.dumps(c['failed_by_reason'])}",
                  f"- regions by reason: {json.dumps(c['region_failures_by_reason'])}"]
    else:
        lines += ["", "No failures."]
    return lines


def _num(value: float) -> str:
    """A count for a table: 1,234 / 12.3M / 4.56B."""
    for limit, suffix in ((1e9, "B"), (1e6, "M")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def _ms(seconds: float | None) -> str:
    """Seconds as milliseconds, 3 significant digits."""
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}" if ms else "0"


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cost_lines(manifest: dict[str, Any]) -> list[str]:
    """Per-image and per-region averages of what the build cost, and an extrapolation."""
    section = manifest.get("cost")
    if not section or not section.get("per_image"):
        return ["Nothing was measured (no image was processed)."]
    images, regions = section["images"], section["regions"]
    lines = [f"Measured while building: {images} images (inputs, failed ones included) and "
             f"{regions} regions written. Seconds are worker seconds summed over images (a batch's "
             "time shared over its images), not elapsed time; CPU seconds of the model stages count "
             "every thread of the worker process, GPU seconds are how long a stage held a GPU "
             "(not kernel time). Full figures: `manifest.json` → `cost`.", ""]
    kinds = ("wall_s", "cpu_s", "gpu_s") if section["total"]["gpu_s"] else ("wall_s", "cpu_s")
    names = [k[:-2].upper() if k != "wall_s" else "wall" for k in kinds]
    lines += ["| stage | " + " | ".join(f"{n} ms / image" for n in names) + " | "
              + " | ".join(f"{n} ms / region" for n in names) + " |",
              "|---" * (1 + 2 * len(kinds)) + "|"]
    rows = [(stage, section["stages"][stage]) for stage in STAGES   # pipeline order
            if stage in section["stages"] and (section["stages"][stage]["wall_s"]
                                               or section["stages"][stage]["cpu_s"])]
    for name, v in rows + [("**total**", section["total"])]:
        cells = [_ms(v[k] / images) for k in kinds]
        cells += [_ms(v[k] / regions if regions else None) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    overlapped = sum(v.get("cpu_overlapped", 0) for v in section["stages"].values())
    if overlapped:
        lines += ["", f"CPU seconds of {overlapped} image-stage measurements overlapped other work in "
                  "the same worker process (bundles run in parallel threads): upper bounds."]
    caption = section["caption"]
    if caption["calls"]:
        n_regions = regions or None
        lines += ["", "Captioning model calls (retries included) and what they moved:", "",
                  "| | total | per image | per region |", "|---|---|---|---|"]
        for key, label in (("requests", "requests"), ("calls", "model calls"),
                           ("failed_calls", "failed calls"), ("prompt_tokens", "prompt tokens"),
                           ("completion_tokens", "completion tokens"),
                           ("bytes_sent", "bytes sent (request bodies)"),
                           ("bytes_received", "bytes received (completions)")):
            total = caption[key]
            lines.append(f"| {label} | {total:,} | {_num(total / images)} | "
                         f"{_num(total / n_regions) if n_regions else '—'} |")
        if caption["calls_without_usage"]:
            lines += ["", f"{caption['calls_without_usage']} of {caption['calls']} calls got an "
                      "answer without token usage: the token figures are lower bounds."]
    else:
        lines += ["", "The captioner called no model."]
    lines += ["", f"Extrapolated linearly from these {images} images, at these settings (same "
              "annotators, program, image sizes and batch sizes):", "",
              "| images | CPU-hours | GPU-hours | worker wall-hours | model calls | prompt tokens | "
              "completion tokens |", "|---|---|---|---|---|---|---|"]
    for n in EXTRAPOLATE_TO:
        e = extrapolate(section, n)
        assert e is not None
        lines.append(f"| {_num(n)} | {_hours(e['cpu_hours'])} | {_hours(e['gpu_hours'])} | "
                     f"{_hours(e['wall_hours'])} | {_num(e['calls'])} | {_num(e['prompt_tokens'])} | "
                     f"{_num(e['completion_tokens'])} |")
    notes = []
    if not section["total"]["gpu_s"]:
        notes.append("No GPU was used by the pipeline's workers (GPU-hours 0).")
    if caption["bytes_sent"]:
        notes.append("The captioning model ran on a server outside the workers: its CPU and GPU "
                     "time is not in these seconds; its load is the model calls and tokens.")
    return lines + (["", " ".join(notes)] if notes else [])


LAYOUT = """```
shards/{split}-{NNNNNN}[-{GGG}].tar  WebDataset: {key}.json (the record) + {key}.jpg|png (stored image)
index/images/{shard}.parquet        one row per image
index/regions/{shard}.parquet       one row per region
failures/{shard}.parquet            one row per rejected input or region (stage, reason, class)
manifest.json                       counts, per-shard sha256 and size, settings, versions
wids-index.json                     shard list for indexed random access (wids)
plots/                              the plots of this card
```"""

LOADING = '''Run these from this folder (`root` is the dataset folder).

WebDataset, streaming (`pip install webdataset pycocotools`):

```python
import glob
import webdataset as wds
from pycocotools import mask as mask_utils

root = "."
ds = wds.WebDataset(sorted(glob.glob(f"{root}/shards/*.tar")), shardshuffle=False) \\
        .decode("pil").to_tuple("__key__", "jpg;png", "json")
for key, image, record in ds:
    masks = [mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
             for r in record["regions"] if r["mask"]]        # (H, W) uint8, same size as image
    print(key, image.size, record["image_level"]["caption"], len(masks), "masks")
    break
```

Random access by index with `wids` (`pip install wids`; it reads `wids-index.json`):

```python
import wids

root = "."
ds = wids.ShardListDataset(f"{root}/wids-index.json")
sample = ds[len(ds) - 1]          # {"__key__", ".json", ".jpg" or ".png", ...}, decoded
print(len(ds), sample["__key__"], sample[".json"]["image_level"]["caption"])
```

Hugging Face `datasets` (the folder loads through the `configs` of this card's header; the
index tables with the parquet builder):

```python
import os
from datasets import load_dataset

root = "."
ds = load_dataset(os.path.abspath(root), split="train")   # the shards: {"json": record, "jpg"/"png": image}
regions = load_dataset("parquet", data_files=f"{root}/index/regions/*.parquet", split="train")
print(ds, regions)
```

DuckDB over the index (no tar is opened):

```python
import duckdb

root = "."
print(duckdb.sql(f"""SELECT level, count(*) AS regions, round(avg(long_caption_chars)) AS long_chars
                     FROM '{root}/index/regions/*.parquet' GROUP BY level ORDER BY level"""))
print(duckdb.sql(f"""SELECT i.key, i.caption, count(r.region_id) AS masks
                     FROM '{root}/index/images/*.parquet' i
                     LEFT JOIN '{root}/index/regions/*.parquet' r ON r.key = i.key AND r.level = 'pixel'
                     GROUP BY ALL ORDER BY masks DESC LIMIT 5"""))
```

COCO (pycocotools, detectron2, FiftyOne, …): export once with the multigran project, then:

```bash
python -m pipelines.export_coco . --level pixel
```

```python
from pycocotools.coco import COCO

root = "."
coco = COCO(f"{root}/coco/train/instances_pixel.json")    # images beside it: coco/train/images/
ann = coco.loadAnns(coco.getAnnIds(imgIds=coco.getImgIds()[:1]))[0]
mask = coco.annToMask(ann)                                # the shard's mask, unchanged
print(ann["region_id"], ann["parent_region_id"], ann["caption"], ann["tags"], mask.sum())
```'''


def render(manifest: dict[str, Any]) -> str:
    """Markdown card from the manifest (whose counts the pipeline summed over the shards) and
    ``manifest["stats"]`` (``dataset_stats``), when present."""
    from schemas.record import RECORD
    from schemas.spec import markdown_rows

    stats = manifest.get("stats")
    lines = [
        *header(manifest),
        f"# {manifest['dataset_name']}",
        "",
        "Multi-granularity image–text dataset: every image has an image-level caption, long caption",
        "and tags; regions come as boxes (level `region`) and pixel masks (level `pixel`, COCO RLE)",
        "with captions, long captions and tags, linked by `parent` (whole → part → subpart).",
        "",
        "## How it was built",
        "",
        *_annotator_lines(manifest),
        "",
        "## Counts",
        "",
        *_count_lines(manifest),
        "",
    ]
    if stats is not None:
        lines += ["## Text", "", *_text_lines(stats), ""]
        verdicts = verdict_lines(stats)
        if verdicts:
            lines += ["## Judge and consistency", "", *verdicts, ""]
    lines += ["## Failures", "", *_failure_lines(manifest, stats), "",
              "## Cost", "", *_cost_lines(manifest), "",
              "## Layout", "", LAYOUT, "",
              "## Loading", "", LOADING, "",
              "## Record schema", "",
              "One JSON record per image (`{key}.json` in the shards), schema version "
              f"{manifest['schema_version']}:", "",
              "| field | type | required | description |", "|---|---|---|---|",
              *markdown_rows(RECORD), ""]
    return "\n".join(lines)


def wids_index(manifest: dict[str, Any]) -> dict[str, Any]:
    """The shard list ``wids.ShardListDataset`` reads (urls relative to the dataset folder)."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": manifest["dataset_name"],
            "shardlist": [{"url": f"shards/{s['name']}", "nsamples": s["samples"], "filesize": s["size"]}
                          for s in manifest["shards"]]}


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def write(out: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """README.md, ``plots/*.png`` and ``wids-index.json`` for the dataset at ``out``.

    Computes ``dataset_stats(out)`` unless ``manifest["stats"]`` holds them; returns the stats.
    """
    stats = manifest.get("stats")
    if stats is None:
        stats = dataset_stats(out)
        manifest = manifest | {"stats": stats}
    for name, data in plots(stats).items():
        _write(FileSystems.join(out, *name.split("/")), data)
    _write(FileSystems.join(out, WIDS_INDEX), json.dumps(wids_index(manifest), indent=1).encode())
    _write(FileSystems.join(out, "README.md"), render(manifest).encode())
    return stats
