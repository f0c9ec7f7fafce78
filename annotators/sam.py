"""SAM segmenters: ``sam-auto`` (automatic masks) and ``sam-boxes`` (masks from given boxes).

Both wrap Meta's ``segment_anything`` package. Weights are the user's checkpoint, read through
Apache Beam's filesystems (local path, gs://, s3://, ...), or, for tests and benchmarks, a model with
random weights from a fixed seed — ``model_type: tiny`` builds a ~0.4M-parameter SAM that runs on
CPU in about a second per image. Nothing is ever downloaded.

Masks leave the segmenter as COCO RLE of the given image (``annotators.masks`` format); boxes and
areas are measured on that RLE so they agree exactly with the mask.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.amg import MaskData

from annotators import masks
from annotators.shared import SharedModel
from annotators.base import (
    AnnotatorFailure,
    Candidate,
    ConfigError,
    Segmenter,
    SegmentInput,
    SegmentOutput,
    require,
)
from annotators.sam_fast import (
    FastMaskGenerator,
    masks_to_uncompressed_rle,
    use_sdpa_attention,
)

logger = logging.getLogger(__name__)

ModelType = Literal["vit_h", "vit_l", "vit_b", "tiny"]
MODEL_TYPES: tuple[str, ...] = ("vit_h", "vit_l", "vit_b", "tiny")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: Decoder batch for the fast path when ``points_per_batch`` is not set.
FAST_POINTS_PER_BATCH_CPU = 256
FAST_POINTS_PER_BATCH_MAX = 4096
STOCK_POINTS_PER_BATCH = 64


# --------------------------------------------------------------------------- settings


@dataclass
class SamModelSettings:
    """Which SAM to load, where to run it and at what precision (shared by both segmenters)."""

    model_type: ModelType = "vit_h"
    checkpoint: str | None = None            # local path or any Beam filesystem path (gs://...)
    checkpoint_sha256: str | None = None     # if set: verified at setup, and provenance needs no read
    random_weights: bool = False             # benchmarks only: seeded random weights, no checkpoint
    init_seed: int = 0                       # seed of random weights (tiny / random_weights)
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    bf16: bool = False                       # bf16 autocast on CUDA (ignored on CPU)
    compile_encoder: bool = False            # torch.compile the image encoder
    # One loaded model per machine for all SDK processes (annotators.shared); worth it on a GPU.
    share_across_processes: bool = False

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"share_across_processes"})

    def check(self) -> None:
        """Validate values; raise ConfigError naming the field."""
        require(self.model_type in MODEL_TYPES, "model_type", f"use one of {', '.join(MODEL_TYPES)}")
        require(bool(_DEVICE.match(self.device)), "device", "use auto, cpu, cuda or cuda:N")
        require(self.init_seed >= 0, "init_seed", "must be 0 or more")
        require(not (self.random_weights and self.checkpoint), "random_weights",
                "cannot be true together with a checkpoint; drop one of them")
        require(self.checkpoint is not None or self.random_weights or self.model_type == "tiny",
                "checkpoint", f"model_type {self.model_type} needs a checkpoint path "
                "(local or gs://...); only 'tiny' or random_weights run without one")
        require(self.checkpoint is None or bool(self.checkpoint.strip()), "checkpoint",
                "is empty; give a path or leave it out")
        require(self.checkpoint_sha256 is None or bool(_SHA256.match(self.checkpoint_sha256)),
                "checkpoint_sha256", "must be 64 lowercase hex digits")
        require(self.checkpoint_sha256 is None or self.checkpoint is not None, "checkpoint_sha256",
                "is set but there is no checkpoint")


@dataclass
class SamAutoSettings(SamModelSettings):
    """Settings of ``sam-auto``: the model plus ``SamAutomaticMaskGenerator``'s parameters."""

    points_per_side: int = 32
    points_per_batch: int | None = None      # None: 64 (stock) / as memory allows (fast)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    fast: bool = False                       # the project's batched, device-side generator
    encoder_batch: int = 4                   # fast path: images per image-encoder call

    # points_per_batch and encoder_batch stay hashed: masks are computed per point and embeddings
    # per image, but batched kernels move scores and embeddings by ~1e-6, which can change bytes.

    def check(self) -> None:
        """Validate values; raise ConfigError naming the field."""
        super().check()
        require(self.points_per_side >= 1, "points_per_side", "must be 1 or more")
        require(self.points_per_batch is None or self.points_per_batch >= 1, "points_per_batch",
                "must be 1 or more (or left out)")
        for name in ("pred_iou_thresh", "stability_score_thresh"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "must be between 0 and 1")
        for name in ("box_nms_thresh", "crop_nms_thresh"):
            require(0.0 < getattr(self, name) <= 1.0, name, "must be above 0 and at most 1")
        require(self.stability_score_offset > 0, "stability_score_offset", "must be above 0")
        require(self.crop_n_layers >= 0, "crop_n_layers", "must be 0 or more")
        require(0.0 <= self.crop_overlap_ratio < 1.0, "crop_overlap_ratio", "must be in [0, 1)")
        require(self.crop_n_points_downscale_factor >= 1, "crop_n_points_downscale_factor",
                "must be 1 or more")
        require(self.min_mask_region_area >= 0, "min_mask_region_area", "must be 0 or more")
        require(self.encoder_batch >= 1, "encoder_batch", "must be 1 or more")


@dataclass
class SamBoxesSettings(SamModelSettings):
    """Settings of ``sam-boxes``: only the model; prompts are the boxes given with each image."""


# --------------------------------------------------------------------------- models


def build_tiny_sam(seed: int = 0) -> Sam:
    """A ~0.4M-parameter SAM with random weights from ``seed`` (for tests; CPU friendly).

    img_size 256, a 2-block ViT (one windowed, one global block, relative positions), a 32-wide
    prompt encoder and mask decoder. The mask logits and IoU head are scaled so that random masks
    have a spread of stability and predicted-IoU scores, so the generator's filters have work to do.
    The global RNG is left untouched.
    """
    embed = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=256, patch_size=16, embed_dim=96, depth=2, num_heads=3, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                use_rel_pos=True, global_attn_indexes=(1,), window_size=8, out_chans=embed),
            prompt_encoder=PromptEncoder(embed_dim=embed, image_embedding_size=(16, 16),
                                         input_image_size=(256, 256), mask_in_chans=8),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=64, num_heads=2),
                transformer_dim=embed, iou_head_depth=3, iou_head_hidden_dim=32),
        )
        _spread_scores(sam)
    return sam.eval()


def _spread_scores(sam: Sam) -> None:
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(50.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.8)


def build_random_sam(model_type: str, seed: int) -> Sam:
    """SAM of ``model_type`` with random weights from ``seed`` (same cost as trained weights)."""
    if model_type == "tiny":
        return build_tiny_sam(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sam_model_registry[model_type](checkpoint=None).eval()


def read_checkpoint(path: str) -> tuple[bytes, str]:
    """Bytes and sha256 of a checkpoint at a local or Beam filesystem path."""
    from apache_beam.io.filesystems import FileSystems  # only needed for checkpoints

    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:  # Beam: BeamIOError per filesystem, ValueError per scheme
        raise ConfigError(f"checkpoint: cannot read {path!r} ({exc}); fix the path") from exc
    return data, hashlib.sha256(data).hexdigest()


def hash_checkpoint(path: str) -> str:
    """sha256 of a checkpoint, streamed (for provenance without loading the model)."""
    from apache_beam.io.filesystems import FileSystems

    digest = hashlib.sha256()
    try:
        with FileSystems.open(path) as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint: cannot read {path!r} ({exc}); fix the path") from exc
    return digest.hexdigest()


def load_state_dict(sam: Sam, data: bytes, path: str) -> None:
    """Load checkpoint bytes (a state dict, or {"model": state dict}) into ``sam``."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise ConfigError(f"checkpoint: {path!r} does not fit the model_type ({' '.join(first)}); "
                          "set model_type to the checkpoint's architecture") from exc


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; cuda requested without CUDA is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was requested but is not available; use auto or cpu")
    return torch.device(name)


def segment_anything_version() -> str:
    """Installed version of the segment-anything distribution ('unknown' if not from a wheel)."""
    try:
        return metadata.version("segment-anything")
    except metadata.PackageNotFoundError:
        return "unknown"


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
        device = resolve_device(self.settings.device)
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
        return {
            "name": self.name,
            "version": self.version,
            "model_type": s.model_type,
            "checkpoint": checkpoint,
            "checkpoint_sha256": self._checkpoint_digest(),
            "weights": self._weights(),
            "segment_anything_version": segment_anything_version(),
            "device": self._device_name(),
            "dtype": ("bfloat16" if s.bf16 and self._device_name().startswith("cuda")
                      else "float32"),
            "settings": dataclasses.asdict(s),
        }

    def _device_name(self) -> str:
        """The configured device with 'auto' resolved (same before and after setup)."""
        if self.settings.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.settings.device

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


def fast_points_per_batch(model: Sam, bf16: bool, n_points: int) -> int:
    """Point prompts per decoder call that fit in about half the free GPU memory (256 on CPU)."""
    if model.device.type != "cuda":
        return min(FAST_POINTS_PER_BATCH_CPU, n_points)
    free, _ = torch.cuda.mem_get_info(model.device)
    per_point = _decoder_bytes_per_point(model, 2 if bf16 else 4)
    fits = max(1, min(int(0.5 * free // per_point), FAST_POINTS_PER_BATCH_MAX))
    calls = -(-n_points // fits)
    return -(-n_points // calls)          # same number of calls, evenly sized


def _decoder_bytes_per_point(model: Sam, item_size: int) -> int:
    """Peak decoder memory per point prompt, erring high: embedding copies plus mask upscaling.

    For SAM's decoder (256 channels, 64x64) this gives ~73 MB in float32; ~34 MB was measured.
    """
    channels = model.mask_decoder.transformer_dim
    h, w = model.prompt_encoder.image_embedding_size
    embedding = channels * h * w
    upscaling = (channels // 4) * 4 * h * w + (channels // 8) * 16 * h * w
    logits = 3 * 16 * h * w * 4          # three low-res masks, kept as float32
    return 12 * embedding * item_size + 2 * upscaling * item_size + logits


class SamBoxesSegmenter(_SamSegmenter):
    """``sam-boxes``: one SAM mask per box given with the image (GRIT / LongGRIT style)."""

    name: ClassVar[str] = "sam-boxes"
    Settings: ClassVar[type] = SamBoxesSettings

    def _segment(self, item: SegmentInput) -> SegmentOutput:
        given = (item.given or {}).get("boxes") or []
        if not given:
            return SegmentOutput([], {"no_boxes": 1})
        height, width = item.rgb.shape[:2]
        boxes = [(i, _clip_box(box, width, height)) for i, box in enumerate(given)]
        valid = [(i, box) for i, box in boxes if box is not None]
        dropped = {"bad_box": len(boxes) - len(valid)} if len(valid) < len(boxes) else {}
        if not valid:
            return SegmentOutput([], dropped)
        rles, ious = self._predict(item.rgb, [box for _, box in valid])
        candidates = [_box_candidate(index, box, rle, iou)
                      for (index, box), rle, iou in zip(valid, rles, ious, strict=True)]
        empty = sum(1 for c in candidates if c.rle is None)
        if empty:
            dropped["empty_mask"] = empty
        return SegmentOutput(candidates, dropped)

    def _predict(self, rgb: np.ndarray, boxes: list[list[float]]) -> tuple[list[dict], list[float]]:
        """All boxes of one image in one batched decoder call -> (COCO RLEs, predicted IoUs)."""
        assert self.predictor is not None
        predictor = self.predictor
        predictor.set_image(rgb)
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes],
                            dtype=torch.float, device=predictor.device)
        prompts = predictor.transform.apply_boxes_torch(xyxy, rgb.shape[:2])
        mask_batch, iou, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
        uncompressed = masks_to_uncompressed_rle(mask_batch[:, 0])
        predictor.reset_image()
        rles = [masks.from_uncompressed(rle) for rle in uncompressed]
        return rles, iou[:, 0].float().cpu().tolist()


def _clip_box(box: Any, width: int, height: int) -> list[float] | None:
    """[x, y, w, h] clipped to the image, or None if it is malformed or empty after clipping."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite([x, y, w, h])):
        return None
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def _box_candidate(index: int, box: list[float], rle: dict, iou: float) -> Candidate:
    """Candidate for given box ``index``; an empty mask falls back to the box alone (rle None)."""
    scores = {"predicted_iou": float(iou), "given_box": index}
    area = masks.area(rle)
    if area == 0:
        return Candidate(bbox=box, area=box[2] * box[3], rle=None, scores=scores, source="sam-boxes")
    return Candidate(bbox=masks.bbox(rle), area=float(area), rle=rle, scores=scores,
                     source="sam-boxes")
