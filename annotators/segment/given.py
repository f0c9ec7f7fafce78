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

    def check(self) -> None:
        require(self.frame in FRAMES, "frame", f"must be one of {', '.join(FRAMES)}")


@functools.lru_cache(maxsize=4)
def _load_json(path: str) -> Any:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


@functools.lru_cache(maxsize=4)
def _coco_index(path: str) -> dict[Any, list[dict]]:
    data = _load_json(path)
    index: dict[Any, list[dict]] = {}
    sizes = {img["id"]: (img["height"], img["width"]) for img in data.get("images", [])}
    for ann in data.get("annotations", []):
        ann = dict(ann, _size=sizes.get(ann["image_id"]))
        index.setdefault(ann["image_id"], []).append(ann)
        index.setdefault(str(ann["image_id"]), []).append(ann)
    return index


def _sa1b_masks(path: str) -> list[tuple[dict, dict[str, float]]]:
    data = _load_json(path)
    out = []
    for ann in data.get("annotations", []):
        scores = {k: float(ann[v]) for k, v in (("predicted_iou", "predicted_iou"),
                                                 ("stability", "stability_score")) if v in ann}
        out.append((ann["segmentation"], scores))
    return out


def _coco_masks(path: str, image_id: Any) -> list[tuple[dict, dict[str, float]]]:
    out = []
    for ann in _coco_index(path).get(image_id, []):
        seg = ann.get("segmentation")
        height, width = ann["_size"] or (None, None)
        if isinstance(seg, list) and seg and height:
            out.append((rle.from_polygons(seg, height, width), {}))
        elif isinstance(seg, dict):
            out.append((rle.normalize(seg), {}))
    return out


class GivenSegmenter(Segmenter):
    """Imports masks/boxes given with each input."""

    name = "given"
    needs_pixels = False   # annotations only: the stored image is not decoded for this segmenter
    version = "1"
    Settings = GivenSettings

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        return self.each_image(images, self._one, "bad_annotations")

    def _one(self, item: SegmentInput) -> SegmentOutput:
        given = item.given or {}
        height, width = item.hw()
        frame = InputFrame.of(given, height, width)
        candidates: list[Candidate] = []
        masks: list[tuple[dict, dict[str, float], str]] = []
        if self.settings.use_masks:
            masks += [(m, {}, "given:masks") for m in given.get("masks", [])]
            if given.get("sa1b"):
                masks += [(m, s, "given:sa1b") for m, s in _sa1b_masks(given["sa1b"])]
            if given.get("coco"):
                masks += [(m, s, "given:coco") for m, s in _coco_masks(given["coco"], given.get("image_id"))]
        dropped: dict[str, int] = {}
        for encoded, scores, source in masks:
            encoded = frame.mask(encoded, self.settings.frame)
            area = rle.area(encoded)
            if area == 0:
                dropped["empty_mask"] = dropped.get("empty_mask", 0) + 1
                continue
            candidates.append(Candidate(rle.bbox(encoded), float(area), encoded, scores, source))
            if self.settings.boxes_from_masks:
                box = rle.bbox(encoded)
                candidates.append(Candidate(box, box[2] * box[3], None, scores, source + ":box"))
        if self.settings.use_boxes:
            for box in given.get("boxes", []):
                scaled = frame.box(box, self.settings.frame)
                if scaled is None:
                    dropped["empty_box"] = dropped.get("empty_box", 0) + 1
                    continue
                candidates.append(Candidate(scaled, scaled[2] * scaled[3], None, {}, "given:boxes"))
        return SegmentOutput(candidates=candidates, dropped=dropped)
