"""SAM segmenters: ``sam-auto`` (automatic masks) and ``sam-boxes`` (masks from given boxes).

Both wrap Meta's ``segment_anything`` package; their settings and the model they load (the
user's checkpoint, or random weights from a fixed seed — ``model_type: tiny`` builds a
~0.4M-parameter SAM that runs on CPU in about a second per image) are in ``sam_model``.

Masks leave the segmenter as COCO RLE of the given image (``annotators.segment.masks``
format); boxes and areas are measured on that RLE so they agree exactly with the mask.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import MaskData

from annotators.base import AnnotatorFailure, Candidate, Segmenter, SegmentInput, SegmentOutput
from annotators.devices import device_name, torch_device
from annotators.segment import masks
from annotators.segment.frame import InputFrame
from annotators.segment.sam_fast import (
    FastMaskGenerator,
    fast_points_per_batch,
    masks_to_uncompressed_rle,
    use_sdpa_attention,
)
from annotators.segment.sam_model import (
    SamAutoSettings,
    SamBoxesSettings,
    build_random_sam,
    hash_checkpoint,
    load_state_dict,
    read_checkpoint,
    segment_anything_version,
)
from annotators.serving.shared import SharedModel
from settings import ConfigError

logger = logging.getLogger(__name__)

STOCK_POINTS_PER_BATCH = 64


# --------------------------------------------------------------------------- segmenters


class _SamSegmenter(Segmenter):
    """Model loading, device, precision and provenance shared by the SAM segmenters."""

    version: ClassVar[str] = "1"

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        super().__init__(settings, where)
        self.where = where or self.role
        self.model: Sam | None = None
        self.predictor: SamPredictor | None = None
        self._sha256: str | None = self.settings.checkpoint_sha256
        self.shared_model: SharedModel | None = None   # share_across_processes: the owner's

    # -- loading

    def setup(self) -> None:
        """Load the model once (per worker, or per machine with share_across_processes) onto the
        configured device."""
        if self.settings.share_across_processes:
            if self.shared_model is None:
                self.shared_model = SharedModel(self, self.where).open()
            return
        if self.model is not None:
            return
        try:
            self.attach_model(self._load_model())
        except ConfigError as exc:
            raise ConfigError(f"{self.where}.{exc}") from None

    def attach_model(self, model: Sam) -> None:
        """Use an already built ``model`` (moved to the device); for sharing weights in benchmarks."""
        device = torch_device(self.settings.device)
        self.model = model.to(device).eval()
        self._adapt_model(self.model)
        if self.settings.compile_encoder:
            self.model.image_encoder.compile()
        if self.settings.bf16 and device.type != "cuda":
            logger.info("%s: bf16 applies on CUDA only; running float32 on %s", self.name, device)
        self.predictor = SamPredictor(self.model)
        self._after_model()
        logger.info("%s: %s on %s (%s)", self.name, self.settings.model_type, device, self._weights())

    def _adapt_model(self, model: Sam) -> None:
        """Hook for subclasses to change the model in place before it is compiled."""

    def _after_model(self) -> None:
        """Hook for subclasses to build what sits on top of the model."""

    def _load_model(self) -> Sam:
        s = self.settings
        if s.checkpoint is None:
            return build_random_sam(s.model_type, s.init_seed)
        data, digest = read_checkpoint(s.checkpoint)
        if s.checkpoint_sha256 is not None and digest != s.checkpoint_sha256:
            raise ConfigError(f"checkpoint_sha256: {s.checkpoint!r} has sha256 {digest}, not the "
                              "configured value; fix the path or the hash")
        self._sha256 = digest
        sam = build_random_sam(s.model_type, s.init_seed)
        load_state_dict(sam, data, s.checkpoint)
        return sam.eval()

    def teardown(self) -> None:
        """Drop the model and free GPU memory."""
        shared_model, self.shared_model = self.shared_model, None
        if shared_model is not None:
            shared_model.close()
        self.model = None
        self.predictor = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- provenance

    def provenance(self) -> dict[str, Any]:
        """Name, version, model, weights (file name + sha256, or seed), library, device, the dtype
        the model runs at (bfloat16 only with ``bf16`` on CUDA, else float32), settings."""
        s = self.settings
        checkpoint = os.path.basename(s.checkpoint.rstrip("/")) if s.checkpoint else None
        device = device_name(s.device)
        return {
            "name": self.name,
            "version": self.version,
            "model_type": s.model_type,
            "checkpoint": checkpoint,
            "checkpoint_sha256": self._checkpoint_digest(),
            "weights": self._weights(),
            "segment_anything_version": segment_anything_version(),
            "device": device,
            "dtype": "bfloat16" if s.bf16 and device.startswith("cuda") else "float32",
            "settings": dataclasses.asdict(s),
        }

    def _checkpoint_digest(self) -> str | None:
        if self.settings.checkpoint is None:
            return None
        if self._sha256 is None:
            self._sha256 = hash_checkpoint(self.settings.checkpoint)
        return self._sha256

    def _weights(self) -> str:
        if self.settings.checkpoint is None:
            return f"random-init seed {self.settings.init_seed}"
        return f"sha256:{self._checkpoint_digest()}"

    # -- running

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.bf16 and self.model is not None and self.model.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        """One SegmentOutput (or AnnotatorFailure) per image, same order."""
        self.setup()
        if self.shared_model is not None:
            return self.shared_model.call("segment_batch", images)
        return [self._segment_safely(item) for item in images]

    def _segment_safely(self, item: SegmentInput) -> SegmentOutput | AnnotatorFailure:
        problem = _image_problem(item.rgb)
        if problem:
            return AnnotatorFailure("bad_image", problem)
        try:
            with torch.inference_mode(), self._autocast():
                return self._segment(item)
        except Exception as exc:  # one image's failure must not lose the batch
            logger.warning("%s failed on %s: %s", self.name, item.key, exc, exc_info=True)
            return AnnotatorFailure("segmenter_error", f"{type(exc).__name__}: {exc}")

    def _segment(self, item: SegmentInput) -> SegmentOutput:
        raise NotImplementedError


def _image_problem(rgb: Any) -> str:
    """Why ``rgb`` is not an (H, W, 3) uint8 image, or '' if it is."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        return f"expected a uint8 numpy array, got {type(rgb).__name__} {getattr(rgb, 'dtype', '')}"
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        return f"expected shape (H, W, 3), got {rgb.shape}"
    return ""


class SamAutoSegmenter(_SamSegmenter):
    """``sam-auto``: SAM's automatic mask generator over a point grid (stock or fast path)."""

    name: ClassVar[str] = "sam-auto"
    Settings: ClassVar[type] = SamAutoSettings

    def __init__(self, settings: Mapping[str, Any] | None = None, where: str = "") -> None:
        super().__init__(settings, where)
        self.generator: SamAutomaticMaskGenerator | None = None
        self._features: Any = None   # the current image's batched embedding (fast path)

    def _after_model(self) -> None:
        assert self.model is not None
        s = self.settings
        kwargs = dict(
            points_per_side=s.points_per_side,
            points_per_batch=self._points_per_batch(),
            pred_iou_thresh=s.pred_iou_thresh,
            stability_score_thresh=s.stability_score_thresh,
            stability_score_offset=s.stability_score_offset,
            box_nms_thresh=s.box_nms_thresh,
            crop_n_layers=s.crop_n_layers,
            crop_nms_thresh=s.crop_nms_thresh,
            crop_overlap_ratio=s.crop_overlap_ratio,
            crop_n_points_downscale_factor=s.crop_n_points_downscale_factor,
            min_mask_region_area=s.min_mask_region_area,
            output_mode="coco_rle",
        )
        generator = FastMaskGenerator if s.fast else StockMaskGenerator
        try:
            self.generator = generator(self.model, **kwargs)
        except ImportError as exc:   # cv2, imported by the generator when min_mask_region_area > 0
            raise ConfigError(f"min_mask_region_area: needs a package that is not installed ({exc}); "
                              "install opencv-python-headless or set it to 0") from exc

    def _adapt_model(self, model: Sam) -> None:
        """Fast path on CUDA: fused attention in the image encoder (same weights)."""
        if self.settings.fast and model.device.type == "cuda":
            use_sdpa_attention(model)

    def _points_per_batch(self) -> int:
        s = self.settings
        if s.points_per_batch is not None:
            return s.points_per_batch
        if not s.fast:
            return STOCK_POINTS_PER_BATCH
        assert self.model is not None
        return fast_points_per_batch(self.model, s.bf16, s.points_per_side ** 2)

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | AnnotatorFailure]:
        """Fast path: the image encoder runs on ``encoder_batch`` images at a time; the point
        prompts of each image then reuse its embedding. Stock path: one image at a time."""
        self.setup()
        if self.shared_model is not None:
            return self.shared_model.call("segment_batch", images)
        if not self.settings.fast:
            return super().segment_batch(images)
        out: list[SegmentOutput | AnnotatorFailure] = []
        step = self.settings.encoder_batch
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            features = self._embed_safely(chunk)
            for i, item in enumerate(chunk):
                self._features = features[i:i + 1] if features is not None else None
                try:
                    out.append(self._segment_safely(item))
                finally:
                    self._features = None
        return out

    def _embed_safely(self, chunk: list[SegmentInput]) -> Any:
        """Batched embeddings, or None (each image is then encoded on its own) when a chunk holds
        a bad image or the batched call fails (e.g. out of memory)."""
        assert isinstance(self.generator, FastMaskGenerator)
        if any(_image_problem(item.rgb) for item in chunk):
            return None
        try:
            with torch.inference_mode(), self._autocast():
                return self.generator.embed([item.rgb for item in chunk])
        except Exception as exc:
            logger.warning("batched image encoding failed (%s); encoding images one by one", exc)
            return None

    def _segment(self, item: SegmentInput) -> SegmentOutput:
        assert self.generator is not None
        if self._features is not None:
            records = self.generator.generate(item.rgb, features=self._features)
        else:
            records = self.generator.generate(item.rgb)
        candidates, empty = [], 0
        for record in records:
            candidate = _auto_candidate(record)
            if candidate is None:
                empty += 1
            else:
                candidates.append(candidate)
        return SegmentOutput(candidates, {"empty_mask": empty} if empty else {})


class StockMaskGenerator(SamAutomaticMaskGenerator):
    """The library's generator, unchanged except that a crop without masks keeps its
    ``crop_boxes`` shaped (0, 4); upstream, an image where no crop finds a mask makes the
    cross-crop NMS fail when ``crop_n_layers`` > 0.
    """

    def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int,
                      orig_size: tuple[int, ...]) -> MaskData:
        data = super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
        data["crop_boxes"] = data["crop_boxes"].reshape(-1, 4)
        return data


def _auto_candidate(record: dict[str, Any]) -> Candidate | None:
    """Generator record -> Candidate measured on its RLE; None for an empty mask."""
    rle = masks.normalize(record["segmentation"])
    area = masks.area(rle)
    if area == 0:
        return None
    scores = {"predicted_iou": float(record["predicted_iou"]),
              "stability": float(record["stability_score"])}
    return Candidate(bbox=masks.bbox(rle), area=float(area), rle=rle, scores=scores, source="sam-auto")


class SamBoxesSegmenter(_SamSegmenter):
    """``sam-boxes``: one SAM mask per box given with the image (GRIT / LongGRIT style)."""

    name: ClassVar[str] = "sam-boxes"
    version: ClassVar[str] = "2"   # 2: the given box is a region-level candidate, SAM's mask under it
    Settings: ClassVar[type] = SamBoxesSettings

    def _segment(self, item: SegmentInput) -> SegmentOutput:
        """Each given box (mapped to the stored image) is a ``region``-level candidate with its
        label; SAM's mask for it is a ``pixel``-level candidate under it (``within``)."""
        given = (item.given or {}).get("boxes") or []
        if not given:
            return SegmentOutput([], {"no_boxes": 1})
        labels = (item.given or {}).get("labels") or [None] * len(given)
        height, width = item.rgb.shape[:2]
        frame = InputFrame.of(item.given, height, width)
        boxes = [(i, frame.box(box, self.settings.frame), label) for i, (box, label) in enumerate(zip(given, labels))]
        valid = [(i, box, label) for i, box, label in boxes if box is not None]
        dropped = {"bad_box": len(boxes) - len(valid)} if len(valid) < len(boxes) else {}
        if not valid:
            return SegmentOutput([], dropped)
        rles, ious = self._predict(item.rgb, [box for _, box, _ in valid], self.settings.boxes_per_call)
        candidates = []
        empty = 0
        for (index, box, label), rle, iou in zip(valid, rles, ious, strict=True):
            region = Candidate(bbox=box, area=box[2] * box[3], rle=None, scores={"given_box": index},
                               source="given:boxes", label=label)
            candidates.append(region)
            area = masks.area(rle)
            if area == 0:
                empty += 1
                continue
            candidates.append(Candidate(bbox=masks.bbox(rle), area=float(area), rle=rle,
                                        scores={"predicted_iou": float(iou), "given_box": index},
                                        source="sam-boxes", label=label, within=region))
        if empty:
            dropped["empty_mask"] = empty
        return SegmentOutput(candidates, dropped)

    def _predict(self, rgb: np.ndarray, boxes: list[list[float]],
                 per_call: int) -> tuple[list[dict], list[float]]:
        """The image encoded once, its boxes decoded ``per_call`` at a time -> (COCO RLEs,
        predicted IoUs)."""
        assert self.predictor is not None
        predictor = self.predictor
        predictor.set_image(rgb)
        rles: list[dict] = []
        ious: list[float] = []
        try:
            for start in range(0, len(boxes), per_call):
                xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes[start:start + per_call]],
                                    dtype=torch.float, device=predictor.device)
                prompts = predictor.transform.apply_boxes_torch(xyxy, rgb.shape[:2])
                mask_batch, iou, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
                rles += [masks.from_uncompressed(rle) for rle in masks_to_uncompressed_rle(mask_batch[:, 0])]
                ious += iou[:, 0].float().cpu().tolist()
                del mask_batch, iou
        finally:
            predictor.reset_image()
        return rles, ious
