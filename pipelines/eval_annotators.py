"""Score the configured segmenter and captioner against synthetic scenes with known answers.

    python -m pipelines.eval_annotators [--config X.yaml] [--n 200] [--json out.json] [--hard]
    make eval-annotators [CONFIG=X.yaml] [N=200] [HARD=1]

The scenes are ``synthetic://N`` (``pipelines.synthetic``; ``--hard``: textured, occluded,
nested two deep, photograph backgrounds). Each scene goes through what the pipeline runs on it,
in this process (no Beam): ``decode`` of the scene's bytes, the configured segmenter (given the
scene's ground truth masks as ``Segment`` gives them, so ``given`` is the perfect segmenter),
``select_regions`` with the config's ``regions`` section, the visual prompts the captioner asks
for, and the configured captioner. The pixel-level regions (what a record keeps as masks) are then
matched to the ground truth objects and their texts checked word by word. Every figure is defined
in ``DEFINITIONS``, which the JSON report carries.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from annotators.base import (AnnotatorFailure, CaptionInput, CaptionResult, Captioner,
                             RegionView, SegmentInput, Segmenter, TextOut)
from annotators.registry import build_captioner, build_segmenter
from annotators.segment import masks as rle
from annotators.segment.frame import InputFrame
from pipelines import decode as dec
from pipelines.config import PipelineConfig, load_config, mask_secrets
from pipelines.regions import select_regions
from pipelines.synthetic import scene_png
from settings import ConfigError

THRESHOLDS = (0.5, 0.75)
MATCH_IOU = 0.5   # a region scored for its texts and place in the tree matches its object this well
# Mask-size buckets by the object's share of the image. COCO's 32² / 96² pixel limits are
# 0.33% / 3% of a 640x480 photo; fractions keep the buckets the same at any scene size.
SIZE_BUCKETS = (("small", 0.0, 0.01), ("medium", 0.01, 0.05), ("large", 0.05, 1.0))
# Size words by area fraction: tiny < 1% <= small < 5% <= medium < 20% <= large < 50% <= very large.
SIZE_CLASSES = ((0.01, "tiny"), (0.05, "small"), (0.2, "medium"), (0.5, "large"), (1.01, "very large"))
SIZE_ALSO_TRUE = {"tiny": {"small"}, "very large": {"large"}}   # a tiny thing is also small
TEXT_FIELDS = ("caption", "long_caption", "tags")
ATTRIBUTES = ("colour", "position", "size", "shape")
CHECKED = ("colour", "shape")   # the attributes whose words can name something absent
STAGES = ("segment", "select_regions", "render_prompts", "caption")   # where an image can fail

DEFINITIONS: dict[str, str] = {
    "images": "'candidates': the segmenter's masks and boxes before select_regions. 'failed': scenes "
              "a stage failed on (a failure answer or an exception, which the pipeline writes as a "
              "failure row), by stage; they have no regions (or no texts) and their objects count "
              "as missed. 'failure_examples': the first five.",
    "objects": "Ground truth objects with a visible mask. An object smaller than "
               "regions.min_area_frac of the image is 'ignored' (no region that small reaches a "
               "record): it counts in no recall, and a prediction matching it in no precision.",
    "predicted": "The pixel-level regions select_regions keeps (the record's masks); box-only "
                 "regions are not scored as masks.",
    "recall@t / precision@t": "One-to-one greedy matching at mask IoU >= t (pairs taken highest "
                              "IoU first; ignored objects after all others): matched objects / "
                              "objects, matched predictions / predictions (null: no prediction).",
    "mean_best_iou": "Per object, its highest mask IoU with any prediction (0 if none), averaged.",
    "by_size": "Objects by area fraction of the image: small < 1%, medium 1-5%, large >= 5%.",
    "on_background": "Share of predictions with at least half of their pixels outside every "
                     "object (background segments: false positives by construction).",
    "hierarchy": "For each part (an object whose ground truth parent is scored) where both the part "
                 "and its whole are matched at IoU 0.5: 'under_whole' if the whole's region is a "
                 "pixel-level ancestor of the part's region, 'direct' if it is the nearest one; "
                 "'under_whole_of_all_parts': under_whole over all parts (unmatched ones count as "
                 "misses). 'wrong_ancestor': matched objects whose region has a pixel-level ancestor matched "
                 "to an object that is not one of their ground truth ancestors.",
    "texts": "Per object matched at IoU 0.5, the texts of its region (tags joined). 'mentioned': "
             "the text has a word of the attribute; 'right': it has a word true of the object's own "
             "colour (its painted colour; shade words such as 'dark red' count as red), position "
             "(3x3 grid cell of its box centre), size (tiny < 1% <= small < 5% <= medium < 20% <= "
             "large < 50% <= very large; a tiny object is also small, a very large one also large) "
             "or shape (circle: circle/round; ellipse: oval/round, also circle when its box is within "
             "15% of square; rectangle: rectangle/square; triangle). A word anywhere in the text "
             "counts, so long captions, which also describe parents and neighbours, score leniently. "
             "Rates are over matched objects with text. Word lists: COLOUR_WORDS, SHAPE_WORDS, "
             "SIZE_WORDS and the position patterns of pipelines/eval_annotators.py.",
    "absent": "A colour or shape word that names something absent from the region: true neither "
              "of its object nor of any of the object's parts (whose pixels its mask holds). "
              "'texts': share of texts with at least one such word; 'words': such words / all "
              "colour or shape words mentioned (distinct per text).",
    "absent_in_scene": "A colour or shape word true of nothing in the scene: of no object or part, "
                       "nor the background's colour; for image-level texts the image's own shape (a "
                       "rectangle or square) is true too. Evaluated on scenes with a plain background "
                       "only (a photograph's colours and shapes are unknown). The measure that fits "
                       "long captions, which also describe parents and neighbours, and image-level texts.",
}

# --------------------------------------------------------------------------- words

# word -> the colour it names (shades and synonyms name their base colour)
COLOUR_WORDS: dict[str, str] = {
    **{w: "red" for w in ("red", "reddish", "crimson", "scarlet", "maroon")},
    **{w: "green" for w in ("green", "greenish", "lime", "emerald")},
    **{w: "blue" for w in ("blue", "bluish", "navy", "azure", "cobalt")},
    **{w: "yellow" for w in ("yellow", "yellowish", "gold", "golden")},
    **{w: "orange" for w in ("orange", "orangish", "amber")},
    **{w: "purple" for w in ("purple", "purplish", "violet", "lilac", "lavender", "magenta")},
    **{w: "pink" for w in ("pink", "pinkish")},
    **{w: "cyan" for w in ("cyan", "turquoise", "teal", "aqua")},
    **{w: "brown" for w in ("brown", "brownish", "tan", "chocolate")},
    **{w: "white" for w in ("white", "ivory")},
    **{w: "black" for w in ("black",)},
    **{w: "grey" for w in ("grey", "gray", "greyish", "grayish", "silver")},
    **{w: "beige" for w in ("beige", "cream")},
    **{w: "olive" for w in ("olive", "khaki")},
}
SHAPE_WORDS: dict[str, str] = {
    **{w: "circle" for w in ("circle", "circles", "circular", "disc", "discs", "disk", "disks", "dot", "dots")},
    **{w: "oval" for w in ("oval", "ovals", "ellipse", "ellipses", "elliptical", "elliptic")},
    "round": "round",
    **{w: "rectangle" for w in ("rectangle", "rectangles", "rectangular", "square", "squares", "oblong")},
    **{w: "triangle" for w in ("triangle", "triangles", "triangular")},
}
SIZE_WORDS: dict[str, str] = {
    **{w: "very large" for w in ("very large", "very big", "huge", "enormous", "giant")},
    **{w: "tiny" for w in ("very small", "tiny")},
    **{w: "small" for w in ("small", "little")},
    **{w: "medium" for w in ("medium", "medium-sized", "mid-sized", "moderate")},
    **{w: "large" for w in ("large", "big")},
}
SHAPE_TRUE = {"circle": {"circle", "round"}, "ellipse": {"oval", "round"},
              "rectangle": {"rectangle"}, "triangle": {"triangle"}}
GRID = (("top left", "top", "top right"), ("left", "centre", "right"),
        ("bottom left", "bottom", "bottom right"))
# tried in order; a span found by one pattern is not read again by a later one
_POSITION_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"\b(top|upper|bottom|lower)[\s-]+(left|right)\b"),
     lambda m: f"{_VERTICAL[m.group(1)]} {m.group(2)}"),
    (re.compile(r"\b(top|upper|bottom|lower)[\s-]+(centre|center|middle)\b"), lambda m: _VERTICAL[m.group(1)]),
    (re.compile(r"\b(centre|center|middle)[\s-]+(left|right)\b"), lambda m: m.group(2)),
    (re.compile(r"\b(top|upper|bottom|lower)\b"), lambda m: _VERTICAL[m.group(1)]),
    (re.compile(r"\b(left|right)\b"), lambda m: m.group(1)),
    (re.compile(r"\b(centre|center|middle)\b"), lambda m: "centre"),
)
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}


def _word_pattern(words: dict[str, str]) -> re.Pattern[str]:
    alternatives = sorted(words, key=len, reverse=True)   # "very large" before "large"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alternatives) + r")\b")


_PATTERNS = {"colour": (_word_pattern(COLOUR_WORDS), COLOUR_WORDS),
             "shape": (_word_pattern(SHAPE_WORDS), SHAPE_WORDS),
             "size": (_word_pattern(SIZE_WORDS), SIZE_WORDS)}


def words(text: str, attribute: str) -> set[str]:
    """The classes of ``attribute`` (colour, position, size, shape) that ``text`` names."""
    text = text.lower()
    if attribute == "position":
        found: set[str] = set()
        for pattern, name in _POSITION_PATTERNS:
            found |= {name(m) for m in pattern.finditer(text)}
            text = pattern.sub(lambda m: " " * len(m.group(0)), text)
        return found
    pattern, table = _PATTERNS[attribute]
    return {table[m.group(1)] for m in pattern.finditer(text)}


def size_class(frac: float) -> str:
    """The size word true of an area fraction of the image (``SIZE_CLASSES``)."""
    return next(name for limit, name in SIZE_CLASSES if frac < limit)


def position_class(bbox: list[float], width: int, height: int) -> str:
    """The 3x3 grid cell of a box's centre."""
    cx, cy = bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2
    return GRID[min(2, int(3 * cy / max(height, 1)))][min(2, int(3 * cx / max(width, 1)))]


def shape_classes(shape: str, bbox: list[float]) -> set[str]:
    """Shape word classes true of a generator shape (a near-square ellipse is also a circle)."""
    true = set(SHAPE_TRUE[shape])
    if shape == "ellipse" and bbox[3] > 0 and 1 / 1.15 <= bbox[2] / bbox[3] <= 1.15:
        true.add("circle")
    return true


def bucket(frac: float) -> str:
    """The mask-size bucket of an area fraction (``SIZE_BUCKETS``)."""
    return next(name for name, low, high in SIZE_BUCKETS if frac < high or high >= 1.0)


# --------------------------------------------------------------------------- ground truth


@dataclass
class Truth:
    """One ground truth object as scored: its mask on the stored image and the words true of it."""

    id: str
    parent: str | None
    rle: dict
    frac: float
    ignored: bool
    colour: str                  # its own colour (a COLOUR_WORDS class)
    position: str
    size: set[str]
    shape: set[str]              # shape classes true of its own shape
    colours_present: set[str]    # its own colour and its parts' (their pixels are in its mask)
    shapes_present: set[str]


def truths(objects: list[dict[str, Any]], height: int, width: int, min_frac: float) -> list[Truth]:
    """The scene's objects (masks already on the stored image) with what is true of each."""
    by_id = {o["id"]: o for o in objects}
    out = []
    for obj in objects:
        family = [o for o in objects if o is obj or _is_ancestor(obj["id"], o, by_id)]
        frac = rle.area(obj["mask"]) / float(height * width)
        bbox = rle.bbox(obj["mask"])
        size = {size_class(frac)} | SIZE_ALSO_TRUE.get(size_class(frac), set())
        out.append(Truth(obj["id"], obj["parent"], obj["mask"], frac, frac < min_frac,
                         COLOUR_WORDS[obj["colour"]], position_class(bbox, width, height), size,
                         shape_classes(obj["shape"], bbox),
                         {COLOUR_WORDS[o["colour"]] for o in family},
                         set().union(*(shape_classes(o["shape"], rle.bbox(o["mask"])) for o in family))))
    return out


def _is_ancestor(ancestor: str, obj: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> bool:
    parent = obj["parent"]
    while parent is not None and parent in by_id:
        if parent == ancestor:
            return True
        parent = by_id[parent]["parent"]
    return False


def scene_words(objects: list[dict[str, Any]]) -> dict[str, set[str]] | None:
    """Colour and shape classes true of something in the scene; None on a photograph background."""
    background = objects[0]["background"] if objects else ""
    if background.startswith("photo:"):
        return None
    colours = {COLOUR_WORDS[o["colour"]] for o in objects} | ({COLOUR_WORDS[background]} if background else set())
    shapes = set().union(*(shape_classes(o["shape"], o["bbox"]) for o in objects)) if objects else set()
    return {"colour": colours, "shape": shapes}


# --------------------------------------------------------------------------- running the annotators


@dataclass
class Annotated:
    """One scene after the annotators: its regions and their texts (or why there are none)."""

    key: str
    width: int
    height: int
    objects: list[dict[str, Any]]          # ground truth, masks on the stored image
    views: list[RegionView]
    texts: CaptionResult | None
    failure: tuple[str, str] | None = None   # (stage, detail) of the stage that failed on it
    candidates: int = 0


def scenes(n: int, seed: int, size: int, hard: bool) -> Iterator[tuple[str, bytes, list[dict[str, Any]]]]:
    """(key, PNG bytes, ground truth) of scenes 0..n-1, as ``synthetic://n`` reads them."""
    for index in range(n):
        data, objects = scene_png(seed, index, size, hard)
        yield f"synthetic-{seed}-{index:06d}{'-hard' if hard else ''}", data, objects


def _prepare(key: str, data: bytes, objects: list[dict[str, Any]],
             config: PipelineConfig) -> tuple[dec.Decoded, np.ndarray, SegmentInput, list[dict[str, Any]]]:
    """Decode as DecodeImages does; the segmenter's input as Segment builds it (ground truth masks
    in ``given``); the ground truth mapped onto the stored image."""
    decoded = dec.decode(data, config.decode)
    rgb = decoded.pixels if decoded.pixels is not None else \
        np.asarray(Image.open(io.BytesIO(decoded.data)).convert("RGB"))
    info = decoded.info
    original = (info.get("original_height", decoded.height), info.get("original_width", decoded.width))
    given = {"original_size": original, "orientation": info.get("exif_orientation", 1),
             "masks": [o["mask"] for o in objects]}
    frame = InputFrame.of(given, decoded.height, decoded.width)
    stored = [{**o, "mask": frame.mask(o["mask"])} for o in objects]
    stored = [{**o, "bbox": rle.bbox(o["mask"])} for o in stored]
    return decoded, rgb, SegmentInput(key, rgb, given, size=(decoded.height, decoded.width)), stored


def _prompts(captioner: Captioner, rgb: np.ndarray, views: list[RegionView]) -> dict[str, dict[str, bytes]]:
    """The visual prompts the captioner asks for, rendered as RenderPrompts does."""
    specs = captioner.prompt_specs()
    if not specs:
        return {}
    from annotators.caption import visual_prompts as vp

    return vp.render_specs(specs, rgb, views)


def annotate(batch: list[tuple[str, bytes, list[dict[str, Any]]]], config: PipelineConfig,
             segmenter: Segmenter, captioner: Captioner, seconds: dict[str, float]) -> list[Annotated]:
    """One batch of scenes through decode, segment, select_regions, prompts and caption. A stage
    that fails on an image (an answer or an exception, as the pipeline's failure rows) leaves the
    image without regions or texts, with ``failure`` naming the stage."""
    prepared = [_prepare(key, data, objects, config) for key, data, objects in batch]
    done = [Annotated(item.key, decoded.width, decoded.height, objects, [], None)
            for decoded, _, item, objects in prepared]
    start = time.perf_counter()
    step = config.batch.segment
    outputs: list[Any] = []
    for lo in range(0, len(prepared), step):
        chunk = [p[2] if segmenter.needs_pixels else dataclasses.replace(p[2], rgb=None)
                 for p in prepared[lo:lo + step]]
        outputs += _guard(lambda: segmenter.segment_batch(chunk), len(chunk))
    seconds["segment"] += time.perf_counter() - start
    inputs: list[CaptionInput] = []
    captioned: list[Annotated] = []
    for (decoded, rgb, item, _), out, scene in zip(prepared, outputs, done, strict=True):
        if isinstance(out, AnnotatorFailure):
            scene.failure = ("segment", f"{out.reason}: {out.detail}")
            continue
        scene.candidates = len(out.candidates)
        stage = "select_regions"
        try:   # an exception here is an internal_error row in the pipeline
            views, _ = select_regions(out.candidates, (decoded.height, decoded.width), config.regions)
            stage = "render_prompts"
            prompts = _prompts(captioner, rgb, views)
        except Exception as exc:
            scene.failure = (stage, f"{type(exc).__name__}: {exc}")
            continue
        scene.views = views
        inputs.append(CaptionInput(item.key, decoded.width, decoded.height, decoded.data, views, prompts))
        captioned.append(scene)
    start = time.perf_counter()
    results = _guard(lambda: captioner.caption_batch(inputs), len(inputs)) if inputs else []
    seconds["caption"] += time.perf_counter() - start
    for scene, result in zip(captioned, results, strict=True):
        if isinstance(result, AnnotatorFailure):
            scene.failure = ("caption", f"{result.reason}: {result.detail}")
        else:
            scene.texts = result
    return done


def _guard(call: Callable[[], list[Any]], n: int) -> list[Any]:
    """``call()``'s answers, or one failure per input when it raises or answers the wrong count."""
    try:
        answers = list(call())
    except Exception as exc:
        return [AnnotatorFailure("internal_error", f"{type(exc).__name__}: {exc}")] * n
    if len(answers) != n:
        return [AnnotatorFailure("internal_error", f"{len(answers)} answers for {n} inputs")] * n
    return answers


# --------------------------------------------------------------------------- scoring


def match(iou: np.ndarray, ignored: np.ndarray, threshold: float) -> tuple[dict[int, int], set[int]]:
    """One-to-one greedy matching at ``iou`` (predictions x objects) >= ``threshold``.

    Pairs are taken highest IoU first (ties: lower object, then lower prediction index), scored
    objects before ignored ones. Returns object index -> prediction index for scored objects, and
    the predictions matched to ignored objects (left out of precision)."""
    matched: dict[int, int] = {}
    used: set[int] = set()
    left_out: set[int] = set()
    for want_ignored in (False, True):
        pairs = [(-iou[p, g], g, p) for p, g in zip(*np.nonzero(iou >= threshold))
                 if ignored[g] == want_ignored]
        taken: set[int] = set()
        for _, g, p in sorted(pairs):
            if p in used or g in taken:
                continue
            used.add(p)
            taken.add(g)
            if want_ignored:
                left_out.add(int(p))
            else:
                matched[int(g)] = int(p)
    return matched, left_out


class Tally:
    """Counts summed over scenes; turned into rates by ``report``."""

    def __init__(self) -> None:
        self.n: dict[str, float] = {}
        self.examples: list[str] = []   # the first few failures, "key stage: detail"

    def add(self, name: str, value: float = 1.0) -> None:
        """Add ``value`` to counter ``name``."""
        self.n[name] = self.n.get(name, 0.0) + value

    def get(self, name: str) -> float:
        """Counter ``name`` (0 if never added)."""
        return self.n.get(name, 0.0)

    def rate(self, part: str, whole: str) -> float | None:
        """``part`` / ``whole``; None when ``whole`` is 0."""
        return self.get(part) / self.get(whole) if self.get(whole) else None


def score_scene(scene: Annotated, config: PipelineConfig, tally: Tally) -> None:
    """Add one annotated scene's counts to ``tally``."""
    truth = truths(scene.objects, scene.height, scene.width, config.regions.min_area_frac)
    preds = [v for v in scene.views if v.rle is not None]
    ignored = np.array([t.ignored for t in truth], bool)
    iou = rle.iou([v.rle for v in preds], [t.rle for t in truth])
    tally.add("images")
    if scene.failure is not None:
        tally.add(f"failed.{scene.failure[0]}")
        if len(tally.examples) < 5:
            tally.examples.append(f"{scene.key} {scene.failure[0]}: {scene.failure[1][:300]}")
    tally.add("candidates", scene.candidates)
    tally.add("objects_total", len(truth))
    tally.add("objects_ignored", int(ignored.sum()))
    _score_masks(truth, preds, iou, ignored, tally)
    matched, _ = match(iou, ignored, MATCH_IOU)
    region_of = {truth[g].id: preds[p] for g, p in matched.items()}
    _score_hierarchy(truth, region_of, scene.views, tally)
    _score_texts(scene, truth, region_of, tally)


def _score_masks(truth: list[Truth], preds: list[RegionView], iou: np.ndarray, ignored: np.ndarray,
                 tally: Tally) -> None:
    best = iou.max(axis=0) if len(preds) else np.zeros(len(truth))
    for g, t in enumerate(truth):
        if t.ignored:
            continue
        for group in ("all", bucket(t.frac)):
            tally.add(f"masks.{group}.objects")
            tally.add(f"masks.{group}.iou_sum", float(best[g]))
    for threshold in THRESHOLDS:
        matched, left_out = match(iou, ignored, threshold)
        tally.add(f"masks.predicted@{threshold}", len(preds) - len(left_out))
        tally.add(f"masks.all.matched@{threshold}", len(matched))
        for g in matched:
            tally.add(f"masks.{bucket(truth[g].frac)}.matched@{threshold}")
    tally.add("masks.predicted", len(preds))
    if preds and truth:
        union = np.logical_or.reduce([rle.decode(t.rle) for t in truth])
        for view in preds:
            mask = rle.decode(view.rle)
            tally.add("masks.on_background", float((mask & union).sum()) < 0.5 * float(mask.sum()))
    else:
        tally.add("masks.on_background", len(preds))


def _pixel_ancestors(view: RegionView, by_id: dict[str, RegionView]) -> list[str]:
    """Ids of the pixel-level regions above ``view``, nearest first (box regions are skipped)."""
    out, parent = [], view.parent
    while parent is not None and parent in by_id:
        if by_id[parent].level == "pixel":
            out.append(parent)
        parent = by_id[parent].parent
    return out


def _score_hierarchy(truth: list[Truth], region_of: dict[str, RegionView], views: list[RegionView],
                     tally: Tally) -> None:
    by_id = {v.id: v for v in views}
    scored = {t.id: t for t in truth if not t.ignored}
    object_of = {view.id: gid for gid, view in region_of.items()}
    for t in scored.values():
        if t.parent in scored:
            tally.add("hierarchy.parts")
        if t.id not in region_of:
            continue
        above = _pixel_ancestors(region_of[t.id], by_id)
        tally.add("hierarchy.matched_objects")
        true_ancestors = set()
        parent = t.parent
        while parent is not None and parent in scored:
            true_ancestors.add(parent)
            parent = scored[parent].parent
        if any(object_of.get(a) not in (None, *true_ancestors) for a in above):
            tally.add("hierarchy.wrong_ancestor")
        if t.parent in scored and t.parent in region_of:
            tally.add("hierarchy.pairs_matched")
            whole = region_of[t.parent].id
            tally.add("hierarchy.under_whole", whole in above)
            tally.add("hierarchy.direct", bool(above) and above[0] == whole)


def _text_of(out: TextOut, field: str) -> str:
    return "; ".join(out.tags) if field == "tags" else getattr(out, field)


def _score_texts(scene: Annotated, truth: list[Truth], region_of: dict[str, RegionView], tally: Tally) -> None:
    in_scene = scene_words(scene.objects)
    texts = scene.texts
    tally.add("texts.region_failures", len(texts.failures) if texts else 0)
    for t in truth:
        if t.id not in region_of:
            continue
        tally.add("texts.matched_objects")
        out = texts.regions.get(region_of[t.id].id) if texts else None
        if out is None:
            tally.add("texts.without_text")
            continue
        tally.add("texts.with_text")
        true = {"colour": {t.colour}, "position": {t.position}, "size": t.size, "shape": t.shape}
        present = {"colour": t.colours_present, "shape": t.shapes_present}
        for field in TEXT_FIELDS:
            text = _text_of(out, field)
            for attribute in ATTRIBUTES:
                found = words(text, attribute)
                tally.add(f"texts.{field}.{attribute}.mentioned", bool(found))
                tally.add(f"texts.{field}.{attribute}.right", bool(found & true[attribute]))
                if attribute in CHECKED:
                    _absent(tally, f"texts.{field}.absent.{attribute}", found, present[attribute])
                    if in_scene is not None:
                        _absent(tally, f"texts.{field}.absent_in_scene.{attribute}", found, in_scene[attribute])
    if texts is not None and texts.image_level is not None and in_scene is not None:
        # the image itself is a rectangle: "a square image" names nothing absent
        true = {"colour": in_scene["colour"], "shape": in_scene["shape"] | {"rectangle"}}
        for field in TEXT_FIELDS:
            for attribute in CHECKED:
                _absent(tally, f"image.{field}.absent_in_scene.{attribute}",
                        words(_text_of(texts.image_level, field), attribute), true[attribute])


def _absent(tally: Tally, name: str, found: set[str], true: set[str]) -> None:
    absent = found - true
    tally.add(f"{name}.evaluated")
    tally.add(f"{name}.texts", bool(absent))
    tally.add(f"{name}.words", len(absent))
    tally.add(f"{name}.mentioned", len(found))


# --------------------------------------------------------------------------- report


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _absent_report(tally: Tally, name: str) -> dict[str, Any]:
    return {"texts": _r(tally.rate(f"{name}.texts", f"{name}.evaluated")),
            "words": _r(tally.rate(f"{name}.words", f"{name}.mentioned")),
            "evaluated": int(tally.get(f"{name}.evaluated"))}


def _mask_group(tally: Tally, group: str, precision: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"objects": int(tally.get(f"masks.{group}.objects"))}
    for threshold in THRESHOLDS:
        out[f"recall@{threshold}"] = _r(tally.rate(f"masks.{group}.matched@{threshold}", f"masks.{group}.objects"))
        if precision:
            out[f"precision@{threshold}"] = _r(tally.rate(f"masks.all.matched@{threshold}",
                                                          f"masks.predicted@{threshold}"))
    out["mean_best_iou"] = _r(tally.rate(f"masks.{group}.iou_sum", f"masks.{group}.objects"))
    return out


def report(tally: Tally) -> dict[str, Any]:
    """The figures (without run facts) from the summed counts; see ``DEFINITIONS``."""
    g = tally.get
    masks = {"predicted": int(g("masks.predicted")),
             "on_background": _r(tally.rate("masks.on_background", "masks.predicted")),
             "all": _mask_group(tally, "all", precision=True),
             "by_size": {name: {"area_frac": [low, high], **_mask_group(tally, name, precision=False)}
                         for name, low, high in SIZE_BUCKETS}}
    hierarchy = {"parts": int(g("hierarchy.parts")), "pairs_matched": int(g("hierarchy.pairs_matched")),
                 "under_whole": _r(tally.rate("hierarchy.under_whole", "hierarchy.pairs_matched")),
                 "direct": _r(tally.rate("hierarchy.direct", "hierarchy.pairs_matched")),
                 "under_whole_of_all_parts": _r(tally.rate("hierarchy.under_whole", "hierarchy.parts")),
                 "wrong_ancestor": _r(tally.rate("hierarchy.wrong_ancestor", "hierarchy.matched_objects"))}
    regions: dict[str, Any] = {}
    for field in TEXT_FIELDS:
        regions[field] = {a: {k: _r(tally.rate(f"texts.{field}.{a}.{k}", "texts.with_text"))
                              for k in ("mentioned", "right")} for a in ATTRIBUTES}
        regions[field]["absent"] = {a: _absent_report(tally, f"texts.{field}.absent.{a}") for a in CHECKED}
        regions[field]["absent_in_scene"] = {a: _absent_report(tally, f"texts.{field}.absent_in_scene.{a}")
                                             for a in CHECKED}
    image = {field: {"absent_in_scene": {a: _absent_report(tally, f"image.{field}.absent_in_scene.{a}")
                                         for a in CHECKED}} for field in TEXT_FIELDS}
    return {"images": {"scored": int(g("images")), "candidates": int(g("candidates")),
                       "failed": {stage: int(g(f"failed.{stage}")) for stage in STAGES},
                       "failure_examples": tally.examples},
            "objects": {"total": int(g("objects_total")), "ignored": int(g("objects_ignored")),
                        "scored": int(g("masks.all.objects"))},
            "masks": masks, "hierarchy": hierarchy,
            "texts": {"matched_objects": int(g("texts.matched_objects")),
                      "with_text": int(g("texts.with_text")),
                      "region_failures": int(g("texts.region_failures")),
                      "regions": regions, "image": image}}


def evaluate(config: PipelineConfig, n: int, seed: int = 0, size: int = 256, hard: bool = False) -> dict[str, Any]:
    """Annotate ``n`` scenes with the config's annotators and score them: the report's figures
    plus what was run (annotators, region settings, scenes, seconds)."""
    segmenter, captioner = build_segmenter(config.segmenter), build_captioner(config.captioner)
    seconds = {"segment": 0.0, "caption": 0.0}
    tally = Tally()
    start = time.perf_counter()
    segmenter.setup()
    try:
        captioner.setup()
        try:
            batch: list[tuple[str, bytes, list[dict[str, Any]]]] = []
            for item in scenes(n, seed, size, hard):
                batch.append(item)
                if len(batch) == config.batch.caption:
                    _score_batch(batch, config, segmenter, captioner, seconds, tally)
                    batch = []
            if batch:
                _score_batch(batch, config, segmenter, captioner, seconds, tally)
        finally:
            captioner.teardown()
    finally:
        segmenter.teardown()
    seconds["total"] = time.perf_counter() - start
    return {"segmenter": mask_secrets(segmenter.hash_view()), "captioner": mask_secrets(captioner.hash_view()),
            "regions": dataclasses.asdict(config.regions),
            "scenes": {"n": n, "seed": seed, "size": size, "hard": hard},
            **report(tally), "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "definitions": DEFINITIONS}


def _score_batch(batch: list[tuple[str, bytes, list[dict[str, Any]]]], config: PipelineConfig,
                 segmenter: Segmenter, captioner: Captioner, seconds: dict[str, float], tally: Tally) -> None:
    for scene in annotate(batch, config, segmenter, captioner, seconds):
        score_scene(scene, config, tally)


def _f(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.3f}"


def _span(low: float, high: float) -> str:
    return f"< {high:.0%}" if low == 0 else (f">= {low:.0%}" if high >= 1 else f"{low:.0%}-{high:.0%}")


def _pair(a: float | None, b: float | None) -> str:
    return f"{_f(a).strip()}/{_f(b).strip()}"


def table(result: dict[str, Any]) -> str:
    """The report as text."""
    m, h, t = result["masks"], result["hierarchy"], result["texts"]
    s = result["scenes"]
    lines = [f"{result['config_name']}: segmenter {result['segmenter']['name']}, captioner "
             f"{result['captioner']['name']}; {s['n']} {'hard ' if s['hard'] else ''}synthetic scenes "
             f"(seed {s['seed']}, {s['size']} px); {result['objects']['scored']} objects scored, "
             f"{result['objects']['ignored']} ignored (< regions.min_area_frac)",
             "", f"{'masks':<22}{'objects':>8}{'R@0.5':>8}{'P@0.5':>8}{'R@0.75':>8}{'P@0.75':>8}{'mIoU':>8}"]
    rows = [("all", m["all"])] + [(f"{k} ({_span(*v['area_frac'])})", v) for k, v in m["by_size"].items()]
    for name, row in rows:
        lines.append(f"{name:<22}{row['objects']:>8}  " + "  ".join(
            _f(row.get(k)) for k in ("recall@0.5", "precision@0.5", "recall@0.75", "precision@0.75",
                                     "mean_best_iou")))
    lines.append(f"predicted masks {m['predicted']}, on background {_f(m['on_background']).strip()}")
    failed = {stage: n for stage, n in result["images"]["failed"].items() if n}
    if failed:
        lines.append("FAILED scenes: " + ", ".join(f"{stage} {n}" for stage, n in failed.items())
                     + "; first: " + result["images"]["failure_examples"][0])
    lines += ["", f"hierarchy: {h['parts']} parts, {h['pairs_matched']} with part and whole matched; "
                  f"under the right whole {_f(h['under_whole']).strip()}, directly {_f(h['direct']).strip()}, "
                  f"of all parts {_f(h['under_whole_of_all_parts']).strip()}; "
                  f"wrong ancestor {_f(h['wrong_ancestor']).strip()}"]
    lines += ["", f"texts of the {t['with_text']} matched regions with text: right/mentioned per "
                  f"attribute; texts naming an absent colour/shape (of the region's object; of the scene)",
              f"{'':<20}" + "".join(f"{a:>14}" for a in ATTRIBUTES) + f"{'absent':>16}{'absent in scene':>18}"]
    for field, row in t["regions"].items():
        cells = "".join(f"{_pair(row[a]['right'], row[a]['mentioned']):>14}" for a in ATTRIBUTES)
        absent = _pair(row["absent"]["colour"]["texts"], row["absent"]["shape"]["texts"])
        scene = _pair(row["absent_in_scene"]["colour"]["texts"], row["absent_in_scene"]["shape"]["texts"])
        lines.append(f"{field:<20}{cells}{absent:>16}{scene:>18}")
    for field, row in t["image"].items():
        scene = _pair(row["absent_in_scene"]["colour"]["texts"], row["absent_in_scene"]["shape"]["texts"])
        lines.append(f"{'image ' + field:<20}{'':>56}{'':>16}{scene:>18}")
    lines.append(f"\nseconds: segment {result['seconds']['segment']}, caption {result['seconds']['caption']}, "
                 f"total {result['seconds']['total']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.eval_annotators",
                                     description="Score the configured segmenter and captioner on "
                                                 "synthetic scenes with known answers.")
    parser.add_argument("--config", default=None, help="pipeline YAML (as for build_dataset; default: embedded)")
    parser.add_argument("--n", type=int, default=200, help="scenes (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (synthetic://N?seed=S)")
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels (default 256)")
    parser.add_argument("--hard", action="store_true",
                        help="harder scenes: textures, occlusion, parts two deep, photo backgrounds")
    parser.add_argument("--json", dest="json_out", default=None,
                        help="report path (default out/eval/<config name>[-hard].json)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 32:
        parser.error("--n must be at least 1 and --size at least 32")
    name = Path(args.config).stem if args.config else "default"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scores = evaluate(config, args.n, args.seed, args.size, args.hard)
    result = {"config": args.config, "config_name": name, **scores}
    path = Path(args.json_out or f"out/eval/{name}{'-hard' if args.hard else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
