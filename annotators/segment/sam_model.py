"""Which Segment Anything model the SAM segmenters run: their settings, and the model built
from random weights (``model_type: tiny`` for tests; ``random_weights`` for benchmarks) or from
the user's checkpoint, read through Apache Beam's filesystems (local path, gs://, s3://, ...).
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import ClassVar, Literal

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from annotators.devices import valid_device
from annotators.weights import file_sha256
from annotators.segment.frame import FRAMES
from settings import ConfigError, require

ModelType = Literal["vit_h", "vit_l", "vit_b", "tiny"]
MODEL_TYPES: tuple[str, ...] = ("vit_h", "vit_l", "vit_b", "tiny")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    # One loaded model per machine for all SDK processes (annotators.serving.shared); worth it on a GPU.
    share_across_processes: bool = False

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"share_across_processes"})

    def check(self) -> None:
        """Validate values; raise ConfigError naming the field."""
        require(self.model_type in MODEL_TYPES, "model_type", f"use one of {', '.join(MODEL_TYPES)}")
        require(valid_device(self.device), "device", "use auto, cpu, cuda or cuda:N")
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
    """Settings of ``sam-boxes``: the model; prompts are the boxes given with each image."""

    # which image the given boxes' pixels refer to (see annotators.segment.frame)
    frame: str = "displayed"
    # boxes per mask-decoder call: an image with thousands of boxes is decoded in slices, so the
    # decoder's memory is bounded (hashed, like points_per_batch: batch size moves logits ~1e-6)
    boxes_per_call: int = 64

    def check(self) -> None:
        super().check()
        require(self.frame in FRAMES, "frame", f"must be one of {', '.join(FRAMES)}")
        require(self.boxes_per_call >= 1, "boxes_per_call", "must be 1 or more")


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
    return file_sha256(path)


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


def segment_anything_version() -> str:
    """Installed version of the segment-anything distribution ('unknown' if not from a wheel)."""
    try:
        return metadata.version("segment-anything")
    except metadata.PackageNotFoundError:
        return "unknown"
