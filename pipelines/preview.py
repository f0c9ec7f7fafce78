"""A preview of a built dataset to judge it in a minute: ``OUT/preview/index.html`` (one
self-contained page, no external assets) and PNG contact sheets.

    python -m pipelines.preview OUT [--n 48] [--seed 0]        (make preview OUTPUT=OUT N=48)

For a sample of images (those with failed or flagged regions first, up to a quarter of the
sample, the rest drawn by a seeded hash of the key) the page shows each image with its pixel
masks overlaid in distinct colours and its boxes outlined with their ids, the region hierarchy
(whole → part → subpart) as a collapsible tree, and per region its caption, long caption, tags,
scores, the judge's verdict with its reason and the consistency score (a flagged region is
marked and opened), and the visual prompts its captioner was shown — rendered again here by
``annotators.caption.visual_prompts``, the code the pipeline's RenderPrompts stage runs, with the
program step that used each one. Regions the judge or the consistency filter dropped are listed
under their image with the reason (failure rows ``judge_rejected``, ``inconsistent_text``).
The page filters by level (boxes or masks) and by failure (images with failed regions, with
flagged or rejected regions, inputs that failed), also from the address
(``index.html#level=pixel&fail=flags``); failures are read from ``failures/``, flagged regions
from ``index/regions``. Without JavaScript everything is shown; model text is HTML-escaped.

Files (relative to ``OUT/preview/``): ``index.html``; ``contact-NN.png`` (a grid of overlays
with keys); ``images/{key}.png`` (masks + boxes), ``images/{key}.pixel.png`` (masks only),
``images/{key}.region.png`` (boxes only); ``prompts/{key}/{region}.{prompt}.png``.
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import html
import io
import json
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from annotators.caption import visual_prompts as vp
from annotators.segment import masks as rle
from schemas import image_provenance, region_provenance

DEFAULT_N = 48
MAX_SIDE = 512           # preview images are downsized to this longest side
THUMB = 160              # prompt images: longest side in the page
SHEET_COLUMNS, SHEET_ROWS, SHEET_CELL = 4, 4, 256
MAX_FAILED_INPUTS = 200  # rows of the failed-inputs table
ALPHA = 0.5              # mask overlay opacity
# Distinct colours for the first regions (Kelly's list, readable on photographs); then hues
# spaced by the golden ratio.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128))


# --------------------------------------------------------------------------- drawing


def colour(index: int) -> tuple[int, int, int]:
    """The ``index``-th region colour: the fixed palette, then golden-ratio hues."""
    if index < len(PALETTE):
        return PALETTE[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def overlay_masks(rgb: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
                  alpha: float = ALPHA) -> np.ndarray:
    """``rgb`` with each (mask, colour) blended in at ``alpha``, in the order given (later ones on
    top: pass parents before children so parts stay visible), and each mask's boundary drawn
    inside it in its full colour. Pixels outside every mask are returned unchanged."""
    top = np.full(rgb.shape[:2], -1, dtype=np.int32)
    for i, (mask, _) in enumerate(masks):
        top[mask] = i
    out = rgb.copy()
    for i, (mask, rgb_colour) in enumerate(masks):
        where = top == i
        if where.any():
            blended = (1 - alpha) * rgb[where] + alpha * np.asarray(rgb_colour, dtype=np.float64)
            out[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    for mask, rgb_colour in masks:   # outlines, drawn inward: they never leave the mask
        out[vp.contour_mask(mask, 1) & mask] = rgb_colour
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:          # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[tuple[Sequence[float], tuple[int, int, int], str]],
               width: int = 2) -> Image.Image:
    """A copy of ``image`` with each (bbox [x, y, w, h], colour, label) outlined and labelled."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(out.size) // 28))
    for (x, y, w, h), rgb_colour, label in boxes:
        x1, y1 = max(x + w - 1, x), max(y + h - 1, y)
        draw.rectangle([x, y, x1, y1], outline=rgb_colour, width=width)
        left, top, right, bottom = draw.textbbox((x + width, y + width), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=rgb_colour)
        brightness = 0.299 * rgb_colour[0] + 0.587 * rgb_colour[1] + 0.114 * rgb_colour[2]
        draw.text((x + width, y + width), label, fill=(0, 0, 0) if brightness > 140 else (255, 255, 255),
                  font=font)
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------- reading


@dataclass
class Sample:
    """One previewed image: its record, stored image and failure rows."""

    key: str
    shard: str
    record: dict[str, Any] = field(default_factory=dict)
    image: bytes = b""
    failures: list[dict[str, Any]] = field(default_factory=list)


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _table(folder: Path, columns: list[str]) -> Iterable[dict[str, Any]]:
    """Rows of the parquet files in ``folder`` with those of ``columns`` each file has (files
    written before a column existed have rows without it)."""
    for path in sorted(folder.glob("*.parquet")):
        file = pq.ParquetFile(path)
        present = [c for c in columns if c in file.schema_arrow.names]
        for batch in file.iter_batches(batch_size=65_536, columns=present):
            yield from batch.to_pylist()


def read_failures(out: Path) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], int]:
    """Region failure rows by key, the first ``MAX_FAILED_INPUTS`` failed inputs (by key), and
    how many inputs failed in all."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    inputs: list[dict[str, Any]] = []
    failed = 0
    for row in _table(out / "failures", ["key", "source", "stage", "reason", "class", "detail",
                                         "region_id", "shard"]):
        if row["region_id"] is None:
            failed += 1
            inputs.append(row)
            if len(inputs) > 4 * MAX_FAILED_INPUTS:
                inputs = sorted(inputs, key=lambda r: r["key"])[:MAX_FAILED_INPUTS]
        else:
            by_key.setdefault(row["key"], []).append(row)
    return by_key, sorted(inputs, key=lambda r: r["key"])[:MAX_FAILED_INPUTS], failed


def read_flagged(out: Path) -> dict[str, int]:
    """Regions kept but flagged (the judge's ``judge_keep`` false, or ``consistency_flagged``),
    counted by key, from ``index/regions`` (an index without those columns has none)."""
    flagged: dict[str, int] = {}
    for row in _table(out / "index" / "regions", ["key", "judge_keep", "consistency_flagged"]):
        if row.get("judge_keep") is False or row.get("consistency_flagged"):
            flagged[row["key"]] = flagged.get(row["key"], 0) + 1
    return flagged


def choose(out: Path, n: int, seed: int, failing: Iterable[str]) -> list[Sample]:
    """``n`` images: up to n/4 of ``failing`` (keys with failed or flagged regions), the rest by
    seeded hash of the key."""
    shards: dict[str, str] = {}
    for path in sorted((out / "index" / "images").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "shard"])
        shards.update(zip(table.column("key").to_pylist(), table.column("shard").to_pylist()))
    with_failures = sorted((k for k in set(failing) if k in shards), key=lambda k: _rank(k, seed))
    chosen = with_failures[:max(1, n // 4)] if n else []
    rest = sorted((k for k in shards if k not in set(chosen)), key=lambda k: _rank(k, seed))
    chosen += rest[:max(0, n - len(chosen))]
    return [Sample(k, shards[k]) for k in sorted(chosen)]


def load(out: Path, samples: list[Sample]) -> None:
    """Fill in each sample's record and image bytes, reading each needed shard once in order."""
    by_shard: dict[str, dict[str, Sample]] = {}
    for s in samples:
        by_shard.setdefault(s.shard, {})[s.key] = s
    for shard, wanted in sorted(by_shard.items()):
        with tarfile.open(out / "shards" / shard, mode="r|") as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                if key in wanted and info.isfile():
                    data = tar.extractfile(info).read()
                    if ext == "json":
                        wanted[key].record = json.loads(data)
                    else:
                        wanted[key].image = data


# --------------------------------------------------------------------------- one image


def _scale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    height, width = rgb.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    if factor == 1.0:
        return rgb, 1.0
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)), factor


def _scaled_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if mask.shape == shape[:2]:
        return mask
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(small) > 127


def region_colours(record: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """A colour per region id, in record order (parents before children)."""
    return {r["id"]: colour(i) for i, r in enumerate(record["regions"])}


def overlays(rgb: np.ndarray, record: dict[str, Any], max_side: int = MAX_SIDE) -> dict[str, Image.Image]:
    """The three overlay images of one record: "pixel" (masks), "region" (boxes), "all" (both)."""
    small, factor = _scale(rgb, max_side)
    colours = region_colours(record)
    masks = [(_scaled_mask(rle.decode(r["mask"]), small.shape), colours[r["id"]])
             for r in record["regions"] if r["level"] == "pixel" and r.get("mask")]
    boxes = [([v * factor for v in r["bbox"]], colours[r["id"]], r["id"])
             for r in record["regions"] if r["level"] == "region"]
    masked = overlay_masks(small, masks)
    width = max(2, round(max(small.shape[:2]) / 200))
    return {"pixel": Image.fromarray(masked),
            "region": draw_boxes(Image.fromarray(small), boxes, width),
            "all": draw_boxes(Image.fromarray(masked), boxes, width)}


def program_steps(provenance: dict[str, Any]) -> dict[str, list[tuple[str, list[str]]]]:
    """Per level, (step name, images it was shown) of the caption program named in a captioner's
    provenance, when that program ships with the project and its hash matches; else {}."""
    program = provenance.get("program") or {}
    if not program.get("id"):
        return {}
    try:
        from annotators.caption.program import load_program

        loaded = load_program(program["id"])
    except Exception:
        return {}
    if loaded.hash != program.get("hash"):
        return {}
    return {level: [(s.name, list(s.images)) for s in steps] for level, steps in loaded.steps.items()}


def render_prompts(rgb: np.ndarray, record: dict[str, Any], target: dict[str, Any] | None,
                   provenance: dict[str, Any]) -> list[tuple[dict[str, Any], Image.Image]]:
    """The visual prompts ``provenance`` lists for the target's level (the image when ``target``
    is None), rendered as the pipeline's RenderPrompts stage renders them."""
    level = "image" if target is None else target["level"]
    height, width = rgb.shape[:2]
    bbox = [0.0, 0.0, float(width), float(height)] if target is None else target["bbox"]
    mask = rle.decode(target["mask"]) if target is not None and target.get("mask") else None
    out = []
    for spec in (provenance.get("visual_prompts") or {}).get(level, []):
        image = vp.render(spec["kind"], rgb, mask, bbox, **spec.get("params", {}))
        out.append((spec, image))
    return out


# --------------------------------------------------------------------------- HTML


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _hex(rgb_colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb_colour


def _tags(tags: Sequence[str]) -> str:
    return "".join(f'<span class="tag">{_e(t)}</span>' for t in tags) or '<span class="none">no tags</span>'


def _prompt_html(prompts: list[tuple[dict[str, Any], str]], steps: list[tuple[str, list[str]]],
                 provenance: dict[str, Any], image_level: bool) -> str:
    if not prompts:
        if not image_level:
            return ""
        name = provenance.get("name", "?")
        return (f'<div class="prompts none">visual prompts: none at this level — captioner '
                f'<code>{_e(name)}</code>{" reads the pixels itself" if name == "attributes" else ""}</div>')
    used = {name: [s for s, images in steps if name in images] for name in
            {spec["name"] for spec, _ in prompts} | {"image"}}
    cells = []
    for spec, src in prompts:
        params = ", ".join(f"{k}={v}" for k, v in spec.get("params", {}).items())
        by = ", ".join(used.get(spec["name"], [])) or "—"
        cells.append(f'<figure class="prompt"><img src="{_e(src)}" alt="{_e(spec["name"])}" loading="lazy">'
                     f'<figcaption><b>{_e(spec["name"])}</b> = {_e(spec["kind"])}({_e(params)})'
                     f'<br>used by: {_e(by)}</figcaption></figure>')
    if used.get("image"):
        cells.append(f'<div class="prompt-note">whole image: used by {_e(", ".join(used["image"]))}</div>')
    return '<div class="prompts">' + "".join(cells) + "</div>"


REJECTED = {"judge_rejected": "judge", "inconsistent_text": "consistency"}   # failure reason → by what


def flagged(text: dict[str, Any]) -> bool:
    """Whether a region (or the image-level text) was kept but flagged: the judge's verdict
    keep=false (``on_reject: flag``) or below the consistency threshold (``consistency_flag``)."""
    judged_false = (text.get("judge") or {}).get("keep") is False
    return judged_false or bool(text.get("scores", {}).get("consistency_flag"))


def _verdict_html(text: dict[str, Any]) -> str:
    """The judge's verdict with its reason and the consistency score, when the text has them."""
    out = ""
    judge = text.get("judge")
    if judge is not None:
        state = "kept" if judge.get("keep") else "flagged"
        out += (f'<p class="verdict {state}">judge: <b>{state}</b> — '
                f'<span class="reason">{_e(judge.get("reason") or "no reason")}</span></p>')
    score = text.get("scores", {}).get("consistency")
    if score is not None:
        low = bool(text["scores"].get("consistency_flag"))
        out += (f'<p class="verdict {"flagged" if low else "kept"}">consistency {score:.3f}'
                f'{" — <b>flagged</b>: below the threshold" if low else ""}</p>')
    return out


def _flag_below(region: dict[str, Any], children: dict[str | None, list[dict[str, Any]]]) -> bool:
    """Whether the region or one of its descendants is flagged (its node opens to show it)."""
    return flagged(region) or any(_flag_below(c, children) for c in children.get(region["id"], []))


def _node_html(region: dict[str, Any], children: dict[str | None, list[dict[str, Any]]],
               colours: dict[str, tuple[int, int, int]], prompt_html: dict[str, str], depth: int) -> str:
    scores = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in sorted(region.get("scores", {}).items())) or "—"
    x, y, w, h = region["bbox"]
    kids = "".join(_node_html(c, children, colours, prompt_html, depth + 1)
                   for c in children.get(region["id"], []))
    sub = f'<ul>{kids}</ul>' if kids else ""
    flag = flagged(region)
    label = '<span class="flag">flagged</span> ' if flag else ""
    opened = depth == 0 or _flag_below(region, children)
    return (f'<li class="node lv-{_e(region["level"])}{" flagged" if flag else ""}">'
            f'<details{" open" if opened else ""}>'
            f'<summary><span class="sw" style="background:{_hex(colours[region["id"]])}"></span>'
            f'<b>{_e(region["id"])}</b> <span class="lv">{_e(region["level"])}</span> '
            f'{label}'
            f'{_e(region["caption"]) or "<i>no caption</i>"}'
            f'<span class="kids">{len(children.get(region["id"], []))} parts</span></summary>'
            f'<div class="body">{_verdict_html(region)}<p class="long">{_e(region["long_caption"])}</p>'
            f'<p>{_tags(region["tags"])}</p>'
            f'<p class="meta">bbox [{x:.0f}, {y:.0f}, {w:.0f}, {h:.0f}] · area {region["area"]:.0f} px · '
            f'parent {_e(region["parent"] or "—")} · scores: {_e(scores)}</p>'
            f'{prompt_html.get(region["id"], "")}</div>{sub}</details></li>')


def _tree_html(record: dict[str, Any], colours: dict[str, tuple[int, int, int]],
               prompt_html: dict[str, str]) -> str:
    ids = {r["id"] for r in record["regions"]}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for region in record["regions"]:
        parent = region["parent"] if region["parent"] in ids else None
        children.setdefault(parent, []).append(region)
    nodes = "".join(_node_html(r, children, colours, prompt_html, 0) for r in children.get(None, []))
    return f'<ul class="tree">{nodes}</ul>' if nodes else '<p class="none">no regions</p>'


def _failure_rows(rows: list[dict[str, Any]], with_source: bool) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in
                            (["key", "source"] if with_source else ["region"]) +
                            ["stage", "reason", "class", "detail"]) + "</tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in
                         ([r["key"], r["source"]] if with_source else [r["region_id"]]) +
                         [r["stage"], r["reason"], r["class"], r["detail"][:300]]) + "</tr>"
        for r in rows)
    return f'<table class="failures">{head}{body}</table>'


def _rejected_html(rows: list[dict[str, Any]]) -> str:
    """The image's regions the judge or the consistency filter dropped (failure rows), with the
    reason (the rows' ``detail``)."""
    if not rows:
        return ""
    items = "".join(f'<li><b>{_e(r["region_id"])}</b> <span class="flag">dropped by the '
                    f'{REJECTED[r["reason"]]}</span> <code>{_e(r["reason"])}</code>: '
                    f'<span class="reason">{_e(r["detail"][:300])}</span></li>'
                    for r in sorted(rows, key=lambda r: (r["region_id"], r["reason"])))
    return (f'<div class="rejected"><h3>{len(rows)} rejected region(s) (not in the record)</h3>'
            f'<ul>{items}</ul></div>')


def _sample_html(s: Sample, files: dict[str, str], prompt_html: dict[str, str]) -> str:
    record = s.record
    colours = region_colours(record)
    level = record["image_level"]
    n_box = sum(r["level"] == "region" for r in record["regions"])
    n_mask = sum(r["level"] == "pixel" for r in record["regions"])
    images = "".join(f'<img class="ov ov-{name}" src="{_e(src)}" alt="{_e(s.key)} {name}">'
                     for name, src in files.items())
    rejected = [f for f in s.failures if f["reason"] in REJECTED]
    failed = [f for f in s.failures if f["reason"] not in REJECTED]
    n_flagged = sum(flagged(r) for r in record["regions"]) + flagged(level)
    failures = _rejected_html(rejected)
    if failed:
        failures += (f'<div class="region-failures"><h3>{len(failed)} failed region(s) (not in the '
                     f'record)</h3>{_failure_rows(failed, False)}</div>')
    counts = "".join(f" · {n} {what}" for n, what in ((n_flagged, "flagged"), (len(rejected), "rejected"),
                                                       (len(failed), "failed regions")) if n)
    classes = (" has-failures" if s.failures else "") + (" has-flags" if n_flagged or rejected else "")
    return (f'<article class="sample{classes}" id="{_e(s.key)}">'
            f'<h2>{_e(s.key)} <small>{_e(s.shard)} · {record["image"]["width"]}×{record["image"]["height"]} · '
            f'{n_box} boxes · {n_mask} masks{counts}'
            f'</small></h2><div class="row"><figure class="overlay">{images}</figure>'
            f'<div class="text"><p class="caption">{_e(level["caption"])}</p>{_verdict_html(level)}'
            f'<p class="long">{_e(level["long_caption"])}</p><p>{_tags(level["tags"])}</p>'
            f'{prompt_html.get("", "")}</div></div>'
            f'<details class="hierarchy" open><summary>regions: whole → part → subpart</summary>'
            f'{_tree_html(record, colours, prompt_html)}</details>{failures}</article>')


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{position:sticky;top:0;background:#1f2937;color:#eee;padding:8px 16px;z-index:2}
header h1{font-size:18px;margin:0 0 4px}header .stats{font-size:12px;color:#cbd5e1}
.controls label{margin-right:10px}.controls b{margin:0 6px 0 14px}
main{padding:12px 16px}section h2.sec{font-size:16px;border-bottom:1px solid #ccc}
.sheets img{width:300px;margin:4px;border:1px solid #ccc}
article{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:10px 14px}
article.has-failures{border-left:5px solid #d97706}
article h2{font-size:15px;margin:0 0 8px}article h2 small{font-weight:normal;color:#666}
.row{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.overlay{margin:0}.overlay img{width:400px;max-width:100%;border:1px solid #ccc}
.text{flex:1;min-width:280px}.caption{font-weight:600}.long{color:#333}
.tag{display:inline-block;background:#e0e7ff;color:#1e3a8a;border-radius:10px;padding:0 8px;margin:1px;font-size:12px}
.none{color:#999}.meta{font-size:12px;color:#555}
ul.tree,ul.tree ul{list-style:none;padding-left:18px;margin:2px 0}
summary{cursor:pointer}.sw{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:6px;vertical-align:-1px}
.lv{font-size:11px;background:#eee;border-radius:3px;padding:0 4px;color:#555}
.kids{font-size:11px;color:#888;margin-left:8px}
.body{margin:4px 0 6px 20px;padding-left:8px;border-left:2px solid #eee}
.prompts{display:flex;flex-wrap:wrap;gap:8px;font-size:11px;color:#555}
.prompt{margin:0}.prompt img{max-width:160px;max-height:160px;border:1px solid #ccc;display:block;
background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/12px 12px}
table.failures{border-collapse:collapse;font-size:12px}table.failures td,table.failures th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.verdict{font-size:12px;margin:2px 0}.verdict.kept{color:#166534}.verdict.flagged{color:#b45309}
.reason{white-space:pre-wrap}
.flag{font-size:11px;background:#d97706;color:#fff;border-radius:3px;padding:0 4px}
li.flagged>details>summary{background:#fef3c7}
.rejected ul{margin:4px 0;padding-left:18px;font-size:12px}
.ov-pixel,.ov-region{display:none}
body.level-region .ov-all,body.level-pixel .ov-all{display:none}
body.level-region .ov-region,body.level-pixel .ov-pixel{display:block}
body.level-region li.lv-pixel{display:none}
body.level-pixel li.lv-region>details>summary,body.level-pixel li.lv-region>details>.body{display:none}
body.level-pixel li.lv-region>details>ul{padding-left:0}
body.fail-images article.sample:not(.has-failures){display:none}
body.fail-flags article.sample:not(.has-flags){display:none}
body.fail-inputs #samples,body.fail-inputs #sheets{display:none}
"""

SCRIPT = """
function apply(){
  var level=document.querySelector('input[name=level]:checked').value;
  var fail=document.querySelector('input[name=fail]:checked').value;
  document.body.className='level-'+level+' fail-'+fail;
  if(level==='pixel'){document.querySelectorAll('li.lv-region>details').forEach(function(d){d.open=true;});}
}
document.querySelectorAll('.controls input').forEach(function(i){i.addEventListener('change',apply);});
location.hash.slice(1).split('&').forEach(function(kv){  // e.g. index.html#level=pixel&fail=images
  var p=kv.split('='),i=document.querySelector('input[name="'+p[0]+'"][value="'+p[1]+'"]');
  if(i){i.checked=true;}
});
apply();
"""


def page(title: str, stats: str, sheets: list[str], articles: list[str], failed_inputs: list[dict[str, Any]],
         failed_total: int) -> str:
    """The whole HTML page (inline style and script only)."""
    radios = ('<b>level</b>' + "".join(
        f'<label><input type="radio" name="level" value="{v}"{" checked" if v == "all" else ""}> {t}</label>'
        for v, t in (("all", "all"), ("region", "boxes (region)"), ("pixel", "masks (pixel)"))) +
        '<b>show</b>' + "".join(
        f'<label><input type="radio" name="fail" value="{v}"{" checked" if v == "all" else ""}> {t}</label>'
        for v, t in (("all", "all images"), ("images", "images with failed regions"),
                     ("flags", "images with flagged or rejected regions"), ("inputs", "failed inputs"))))
    sheet_html = "".join(f'<a href="{_e(s)}"><img src="{_e(s)}" alt="contact sheet"></a>' for s in sheets)
    failed = (_failure_rows(failed_inputs, True) if failed_inputs else '<p class="none">no failed inputs</p>')
    more = (f"<p>first {len(failed_inputs)} of {failed_total} (all in <code>failures/</code>)</p>"
            if failed_total > len(failed_inputs) else "")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<style>{STYLE}</style></head><body class="level-all fail-all"><header><h1>{_e(title)}</h1>'
            f'<div class="stats">{stats}</div><div class="controls">{radios}</div></header><main>'
            f'<section id="sheets"><h2 class="sec">contact sheets</h2><div class="sheets">{sheet_html}</div></section>'
            f'<section id="samples"><h2 class="sec">{len(articles)} sampled images</h2>{"".join(articles)}</section>'
            f'<section id="failed"><h2 class="sec">failed inputs ({failed_total})</h2>{more}{failed}</section>'
            f'</main><script>{SCRIPT}</script></body></html>')


# --------------------------------------------------------------------------- contact sheets


def contact_sheets(tiles: list[tuple[str, Image.Image]]) -> list[Image.Image]:
    """Grids of ``SHEET_COLUMNS`` × ``SHEET_ROWS`` overlays, each cell labelled with its key."""
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    font = _font(13)
    sheets = []
    for start in range(0, len(tiles), per_sheet):
        chunk = tiles[start:start + per_sheet]
        rows = -(-len(chunk) // SHEET_COLUMNS)
        label_h = 18
        sheet = Image.new("RGB", (SHEET_COLUMNS * SHEET_CELL, rows * (SHEET_CELL + label_h)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, (key, tile) in enumerate(chunk):
            factor = (SHEET_CELL - 4) / max(tile.size)     # small images are scaled up too
            thumb = tile.resize((max(1, round(tile.width * factor)), max(1, round(tile.height * factor))),
                                Image.Resampling.LANCZOS)
            x, y = (i % SHEET_COLUMNS) * SHEET_CELL, (i // SHEET_COLUMNS) * (SHEET_CELL + label_h)
            sheet.paste(thumb, (x + (SHEET_CELL - thumb.width) // 2, y + 2))
            draw.text((x + 4, y + SHEET_CELL + 1), key[:36], fill=(0, 0, 0), font=font)
        sheets.append(sheet)
    return sheets


# --------------------------------------------------------------------------- entry point


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_posix()


def _prompt_files(root: Path, s: Sample, rgb: np.ndarray) -> dict[str, str]:
    """Prompt images of the image ("") and of each region, written; HTML per target."""
    out: dict[str, str] = {}
    targets = [("", None, image_provenance(s.record))] + [
        (r["id"], r, region_provenance(s.record, r)["captioner"]) for r in s.record["regions"]]
    steps_cache: dict[str, dict[str, list[tuple[str, list[str]]]]] = {}
    for target_id, region, provenance in targets:
        rendered = render_prompts(rgb, s.record, region, provenance)
        files = []
        for spec, image in rendered:
            image.thumbnail((THUMB * 2, THUMB * 2))
            name = f"prompts/{s.key}/{target_id or 'image'}.{spec['name']}.png"
            _write(root / name, _png(image))
            files.append((spec, name))
        cache_key = json.dumps(provenance.get("program"), sort_keys=True)
        if cache_key not in steps_cache:
            steps_cache[cache_key] = program_steps(provenance)
        level = "image" if region is None else region["level"]
        out[target_id] = _prompt_html(files, steps_cache[cache_key].get(level, []), provenance,
                                       region is None)
    return out


def _stats_line(out: Path, samples: list[Sample], failed_total: int, flagged_total: int = 0,
                rejected_total: int = 0) -> str:
    verdicts = (f"{flagged_total} regions flagged, {rejected_total} rejected (judge, consistency); "
                if flagged_total or rejected_total else "")
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        c = manifest["counts"]
        levels = c.get("regions_by_level", {})
        return _e(f"{manifest.get('dataset_name', '')}: {c['written']} images, {levels.get('region', 0)} boxes, "
                  f"{levels.get('pixel', 0)} masks; {verdicts}{failed_total} failed inputs; "
                  f"segmenter {manifest['annotators']['segmenter']['name']}, captioner "
                  f"{manifest['annotators']['captioner']['name']}; showing {len(samples)} images")
    except (OSError, KeyError, ValueError):
        return _e(f"showing {len(samples)} images")


def build_preview(out: str | Path, n: int = DEFAULT_N, seed: int = 0, max_side: int = MAX_SIDE) -> Path:
    """Write ``OUT/preview/`` for the dataset at ``out`` (a local folder); returns index.html."""
    out = Path(out)
    root = out / "preview"
    failures, failed_inputs, failed_total = read_failures(out)
    flagged_by_key = read_flagged(out)
    samples = choose(out, n, seed, set(failures) | set(flagged_by_key))
    load(out, samples)
    articles, tiles = [], []
    for s in samples:
        s.failures = failures.get(s.key, [])
        rgb = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"))
        files = {}
        for name, image in overlays(rgb, s.record, max_side).items():
            suffix = "" if name == "all" else f".{name}"
            files[name] = f"images/{s.key}{suffix}.png"
            _write(root / files[name], _png(image))
            if name == "all":
                tiles.append((s.key, image))
        articles.append(_sample_html(s, files, _prompt_files(root, s, rgb)))
    sheets = []
    for i, sheet in enumerate(contact_sheets(tiles)):
        sheets.append(f"contact-{i:02d}.png")
        _write(root / sheets[-1], _png(sheet))
    title = f"Preview: {out.resolve().name}"
    index = root / "index.html"
    rejected = sum(f["reason"] in REJECTED for rows in failures.values() for f in rows)
    stats = _stats_line(out, samples, failed_total, sum(flagged_by_key.values()), rejected)
    index.write_text(page(title, stats, sheets, articles, failed_inputs, failed_total), encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m pipelines.preview OUT [--n N] [--seed S] [--max-side PX]``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.preview", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m pipelines.preview out/dataset --n 48")
    parser.add_argument("output", help="a built dataset folder (local)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"images to show (default {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=0, help="which images are drawn (default 0)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE,
                        help=f"longest side of the preview images (default {MAX_SIDE})")
    args = parser.parse_args(argv)
    if not (Path(args.output) / "index" / "images").is_dir():
        print(f"error: {args.output}: not a built dataset (no index/images/)", file=sys.stderr)
        return 2
    index = build_preview(args.output, args.n, args.seed, args.max_side)
    print(f"preview written: {index}  (open it in a browser: file://{index.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
