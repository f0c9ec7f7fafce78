"""`given`: masks and boxes that come with the input, no model.

Sources (per input, from the manifest or the generator): ``boxes`` ([[x, y, w, h], ...]),
``masks`` (COCO RLE, compressed or not), ``sa1b`` (a per-image SA-1B json with RLE annotations),
``coco`` (a COCO instances json, with ``image_id``), and the ground truth of synthetic scenes.
Annotations refer to the input's original size; they are rescaled to the stored image.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems

from annotators.base import AnnotatorFailure, Candidate, SegmentInput, SegmentOutput, Segmenter
from annotators.segment import masks as rle
from annotators.segment.frame import FRAMES, InputFrame
from settings import require


@dataclass
class GivenSettings:
    """Settings of the given segmenter."""

    use_boxes: bool = True
    use_masks: bool = True
    boxes_from_masks: bool = False   # also keep the mask-less box of every given mask
    # which image the annotations' pixels refer to: "displayed" (EXIF orientation applied, as
    # viewers show it) or "raw" (the file's pixel rows, as loaders that ignore EXIF read it)
    frame: str = "displayed"
    # an annotation file (sa1b / coco json) larger than this is refused, not read: a COCO json is
    # indexed whole in each worker process (convert a huge one to a manifest with per-row masks)
    max_json_bytes: int = 1024 * 1024 * 1024

    def check(self) -> None:
        require(self.frame in FRAMES, "frame", f"must be one of {', '.join(FRAMES)}")
        require(self.max_json_bytes >= 1, "max_json_bytes", "must be a positive byte count")


def _read_json(path: str, max_bytes: int) -> Any:
    size = FileSystems.match([path], limits=[1])[0].metadata_list
    if size and size[0].size_in_bytes > max_bytes:
        raise ValueError(f"{path}: {size[0].size_in_bytes} bytes > given.max_json_bytes={max_bytes}; "
                         "raise it or split the annotations into per-image files")
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


@functools.lru_cache(maxsize=2)
def _coco_index(path: str, max_bytes: int) -> dict[Any, list[tuple[Any, tuple[int, int] | None, str | None]]]:
    """image id → its annotations as (segmentation, (height, width), category name); the parsed
    file itself is not kept."""
    data = _read_json(path, max_bytes)
    index: dict[Any, list[tuple[Any, tuple[int, int] | None, str | None]]] = {}
    sizes = {img["id"]: (img["height"], img["width"]) for img in data.get("images", [])}
    names = {cat["id"]: cat.get("name") for cat in data.get("categories", [])}
    for ann in data.get("annotations", []):
        entry = (ann.get("segmentation"), sizes.get(ann["image_id"]), names.get(ann.get("category_id")))
        index.setdefault(ann["image_id"], []).append(entry)
        if not isinstance(ann["image_id"], str):
            index.setdefault(str(ann["image_id"]), []).append(entry)
    del data
    return index


def _sa1b_masks(path: str, max_bytes: int) -> list[tuple[dict, dict[str, float], str | None]]:
    data = _read_json(path, max_bytes)   # one file per image: nothing to cache
    out = []
    for ann in data.get("annotations", []):
        scores = {k: float(ann[v]) for k, v in (("predicted_iou", "predicted_iou"),
                                                 ("stability", "stability_score")) if v in ann}
        out.append((ann["segmentation"], scores, None))
    return out


def _coco_masks(path: str, image_id: Any, max_bytes: int) -> list[tuple[dict, dict[str, float], str | None]]:
    out = []
    for seg, size, name in _coco_index(path, max_bytes).get(image_id, []):
        height, width = size or (None, None)
        if isinstance(seg, list) and seg and height:
            out.append((rle.from_polygons(seg, height, width), {}, name))
        elif isinstance(seg, dict):
            out.append((rle.normalize(seg), {}, name))
    return out


class GivenSegmenter(Segmenter):
    """Imports masks/boxes given with each input."""

    name = "given"
    needs_pixels = False   # annotations only: the stored image is not decoded for this segmenter
    version = "2"          # 2: labels (manifest labels / mask_labels, COCO category names)
    Settings = GivenSettings

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        return self.each_image(images, self._one, "bad_annotations")

    def _one(self, item: SegmentInput) -> SegmentOutput:
        given = item.given or {}
        height, width = item.hw()
        frame = InputFrame.of(given, height, width)
        candidates: list[Candidate] = []
        masks: list[tuple[dict, dict[str, float], str | None, str]] = []
        limit = self.settings.max_json_bytes
        if self.settings.use_masks:
            labels = given.get("mask_labels") or [None] * len(given.get("masks", []))
            masks += [(m, {}, label, "given:masks") for m, label in zip(given.get("masks", []), labels)]
            if given.get("sa1b"):
                masks += [(m, s, label, "given:sa1b") for m, s, label in _sa1b_masks(given["sa1b"], limit)]
            if given.get("coco"):
                masks += [(m, s, label, "given:coco")
                          for m, s, label in _coco_masks(given["coco"], given.get("image_id"), limit)]
        dropped: dict[str, int] = {}
        stored = frame.masks([m[0] for m in masks], self.settings.frame)
        areas, boxes = rle.areas(stored), rle.bboxes(stored)
        for encoded, area, box, (_, scores, label, source) in zip(stored, areas, boxes, masks, strict=True):
            if area == 0:
                dropped["empty_mask"] = dropped.get("empty_mask", 0) + 1
                continue
            candidates.append(Candidate(box, float(area), encoded, scores, source, label))
            if self.settings.boxes_from_masks:
                candidates.append(Candidate(list(box), box[2] * box[3], None, scores, source + ":box", label))
        if self.settings.use_boxes:
            labels = given.get("labels") or [None] * len(given.get("boxes", []))
            for box, label in zip(given.get("boxes", []), labels):
                scaled = frame.box(box, self.settings.frame)
                if scaled is None:
                    dropped["empty_box"] = dropped.get("empty_box", 0) + 1
                    continue
                candidates.append(Candidate(scaled, scaled[2] * scaled[3], None, {}, "given:boxes", label))
        return SegmentOutput(candidates=candidates, dropped=dropped)
