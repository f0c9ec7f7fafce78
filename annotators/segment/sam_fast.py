"""A faster SAM automatic mask generator with the stock generator's filtering semantics.

``FastMaskGenerator`` subclasses ``segment_anything.SamAutomaticMaskGenerator`` and replaces only
the per-crop work, so crop layers, the crop NMS, small-region post-processing and the output
records stay the stock code. Per crop it:

1. runs the prompt encoder and mask decoder on many point prompts per call (large batches);
2. filters by predicted IoU *before* upscaling the low-resolution logits, so masks that would be
   dropped anyway are never upscaled to the image size;
3. upscales the survivors in bounded chunks, computes the stability score, thresholds them and
   takes their boxes on the model's device, dropping masks at crop edges as the stock code does;
4. runs box NMS (``torchvision.ops.batched_nms``) on those boxes, then re-upscales only the kept
   masks and run-length encodes them on the device in one vectorised pass.

The same math in the same order as the stock generator gives identical masks on CPU in float32.
On CUDA it can also run under bf16 autocast and swap the image encoder's attention for
``scaled_dot_product_attention`` (fused kernels); both change numerics slightly.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    calculate_stability_score,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms

logger = logging.getLogger(__name__)

#: Decoder batch for the fast path when ``points_per_batch`` is not set.
FAST_POINTS_PER_BATCH_CPU = 256
FAST_POINTS_PER_BATCH_MAX = 4096

#: Masks upscaled to the image size at once (bounds memory: chunk * H * W floats).
UPSCALE_CHUNK = 64
#: Masks run-length encoded at once (bounds memory: chunk * H * W bytes, twice).
RLE_CHUNK = 64


# --------------------------------------------------------------------------- run-length encoding


def masks_to_uncompressed_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Boolean (N, H, W) masks -> uncompressed COCO RLEs, on the masks' device.

    Same output as ``segment_anything.utils.amg.mask_to_rle_pytorch``, but the change points of
    all masks are found in one pass and copied to the host once per chunk instead of once per mask.
    """
    out: list[dict[str, Any]] = []
    for start in range(0, masks.shape[0], RLE_CHUNK):
        out.extend(_rle_chunk(masks[start:start + RLE_CHUNK]))
    return out


def _rle_chunk(masks: torch.Tensor) -> list[dict[str, Any]]:
    n, h, w = masks.shape
    flat = masks.permute(0, 2, 1).reshape(n, h * w)          # column-major, as COCO wants
    change = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()
    starts_on = flat[:, 0].cpu().numpy()
    per_mask = np.split(change[:, 1] + 1, np.searchsorted(change[:, 0], np.arange(1, n)))
    rles = []
    for i, cuts in enumerate(per_mask):
        counts = np.diff(np.concatenate(([0], cuts, [h * w]))).tolist()
        rles.append({"size": [h, w], "counts": ([0] if starts_on[i] else []) + counts})
    return rles


# --------------------------------------------------------------------------- encoder attention


class SdpaAttention(Attention):
    """SAM's image-encoder attention computed with ``F.scaled_dot_product_attention``.

    The decomposed relative-position term is passed as an additive attention mask, which is the
    same math as the stock module; on CUDA the fused kernels avoid its separate softmax pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) tokens -> (B, H, W, C), as ``Attention.forward``."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                 # (B, heads, HW, head_dim)
        bias = None
        if self.use_rel_pos:
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """Decomposed relative-position term of SAM's attention as a (B, heads, HW, HW) bias."""
    b, heads, _, dim = q.shape
    qh, qw = size
    r_q = q.reshape(b * heads, qh, qw, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(qh, qh, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(qw, qw, rel_pos_w).to(q.dtype))
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(b, heads, qh * qw, qh * qw).to(q.dtype)


def use_sdpa_attention(model: Sam) -> int:
    """Switch every attention module of ``model.image_encoder`` to ``SdpaAttention`` in place.

    Parameters and the state dict are unchanged. Returns the number of modules switched.
    """
    switched = 0
    for module in model.image_encoder.modules():
        if type(module) is Attention:
            module.__class__ = SdpaAttention
            switched += 1
    return switched


# --------------------------------------------------------------------------- decoder batch


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


# --------------------------------------------------------------------------- generator


class FastMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` with batched decoding and device-side filtering and RLE.

    Takes the stock constructor's arguments plus ``autocast_dtype`` (e.g. ``torch.bfloat16``:
    autocast on CUDA; ignored elsewhere). ``points_per_batch`` should be large (hundreds); on a
    CUDA out-of-memory error the batch is halved and retried.
    """

    def __init__(self, model: Sam, autocast_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.autocast_dtype = autocast_dtype
        self._features: torch.Tensor | None = None

    @torch.no_grad()
    def generate(self, image: np.ndarray, features: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Mask records for ``image`` (HWC uint8), in the stock generator's format.

        ``features``: the image's embedding from ``embed`` (1, C, h, w), used for the whole-image
        crop instead of running the encoder again.
        """
        self._features = features
        try:
            with self._autocast():
                return super().generate(image)
        finally:
            self._features = None

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """Image-encoder embeddings of several images in one batched call (N, C, h, w).

        Each image is resized and padded exactly as ``SamPredictor.set_image`` does, so the result
        equals per-image encoding up to floating-point batching effects.
        """
        predictor = self.predictor
        batch = []
        for image in images:
            resized = predictor.transform.apply_image(image)
            tensor = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()
            batch.append(predictor.model.preprocess(tensor[None, :, :, :]))
        with self._autocast():
            return predictor.model.image_encoder(torch.cat(batch))

    def _set_image(self, cropped: np.ndarray, whole: bool) -> None:
        """Point the predictor at ``cropped``; reuse the precomputed embedding for the whole image."""
        predictor = self.predictor
        if not whole or self._features is None:
            predictor.set_image(cropped)
            return
        predictor.reset_image()
        predictor.original_size = cropped.shape[:2]
        predictor.input_size = predictor.transform.get_preprocess_shape(
            cropped.shape[0], cropped.shape[1], predictor.transform.target_length)
        predictor.features = self._features
        predictor.is_image_set = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.predictor.device
        if self.autocast_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int,
                      orig_size: tuple[int, ...]) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = cropped.shape[:2]
        self._set_image(cropped, whole=tuple(crop_size) == tuple(orig_size[:2]))
        points = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]

        parts = [self._filter_batch(batch, crop_box, orig_size)
                 for batch in self._decoded_batches(points, crop_size)]
        data = _concat(parts)
        keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                           torch.zeros_like(data["iou_preds"]), iou_threshold=self.box_nms_thresh)
        data.filter(keep)
        data["rles"] = self._encode(data["low_res"], crop_box, orig_size)
        self.predictor.reset_image()
        del data["low_res"]

        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.long).repeat(len(data["rles"]), 1)
        return data

    # -- decoding

    def _decoded_batches(self, points: np.ndarray,
                         crop_size: tuple[int, ...]) -> Iterator[MaskData]:
        """Low-res logits of all point prompts, decoded ``points_per_batch`` at a time."""
        for (batch,) in batch_iterator(self.points_per_batch, points):
            yield from self._decode_or_split(batch, crop_size)

    def _decode_or_split(self, points: np.ndarray, crop_size: tuple[int, ...]) -> Iterator[MaskData]:
        try:
            decoded = self._decode(points, crop_size)
        except torch.cuda.OutOfMemoryError:
            if len(points) < 2:
                raise
            torch.cuda.empty_cache()
            half = len(points) // 2
            self.points_per_batch = half
            logger.warning("decoder out of memory; points_per_batch lowered to %d", half)
            yield from self._decode_or_split(points[:half], crop_size)
            yield from self._decode_or_split(points[half:], crop_size)
            return
        yield decoded

    def _decode(self, points: np.ndarray, crop_size: tuple[int, ...]) -> MaskData:
        model = self.predictor.model
        coords = torch.as_tensor(self.predictor.transform.apply_coords(points, crop_size),
                                 device=self.predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]),
                                             boxes=None, masks=None)
        low_res, iou_preds = model.mask_decoder(
            image_embeddings=self.predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        per_point = low_res.shape[1]
        return MaskData(
            low_res=low_res.flatten(0, 1).float(),
            iou_preds=iou_preds.flatten(0, 1).float(),
            points=torch.as_tensor(points.repeat(per_point, axis=0)),
        )

    # -- filtering (same order and tests as SamAutomaticMaskGenerator._process_batch)

    def _filter_batch(self, data: MaskData, crop_box: list[int],
                      orig_size: tuple[int, ...]) -> MaskData:
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        parts = []
        for start in range(0, len(data["iou_preds"]), UPSCALE_CHUNK):
            chunk = MaskData(**{k: v[start:start + UPSCALE_CHUNK] for k, v in data.items()})
            parts.append(self._filter_chunk(chunk, crop_box, orig_size))
        return _concat(parts, like=data)

    def _filter_chunk(self, data: MaskData, crop_box: list[int],
                      orig_size: tuple[int, ...]) -> MaskData:
        threshold = self.predictor.model.mask_threshold
        logits = self._upscale(data["low_res"])
        data["stability_score"] = calculate_stability_score(
            logits, threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = data["stability_score"] >= self.stability_score_thresh
            data.filter(keep)
            logits = logits[keep]
        data["boxes"] = batched_mask_to_box(logits > threshold)
        del logits
        orig_h, orig_w = orig_size
        near_edge = is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if torch.any(near_edge):
            data.filter(~near_edge)
        return data

    def _upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, h, w) low-res logits -> (N, H, W) logits at the crop size (``Sam.postprocess_masks``)."""
        model = self.predictor.model
        size = model.image_encoder.img_size
        masks = F.interpolate(low_res[:, None], (size, size), mode="bilinear", align_corners=False)
        in_h, in_w = self.predictor.input_size
        masks = masks[..., :in_h, :in_w]
        if tuple(self.predictor.original_size) != (in_h, in_w):
            masks = F.interpolate(masks, self.predictor.original_size, mode="bilinear",
                                  align_corners=False)
        return masks[:, 0]

    def _encode(self, low_res: torch.Tensor, crop_box: list[int],
                orig_size: tuple[int, ...]) -> list[dict[str, Any]]:
        """Kept masks -> uncompressed RLE in the original image frame."""
        orig_h, orig_w = orig_size
        threshold = self.predictor.model.mask_threshold
        rles: list[dict[str, Any]] = []
        for start in range(0, low_res.shape[0], UPSCALE_CHUNK):
            masks = self._upscale(low_res[start:start + UPSCALE_CHUNK]) > threshold
            rles.extend(masks_to_uncompressed_rle(uncrop_masks(masks, crop_box, orig_h, orig_w)))
        return rles


def _concat(parts: list[MaskData], like: MaskData | None = None) -> MaskData:
    """Concatenate MaskData parts holding tensors; with no parts, an empty one shaped like ``like``."""
    if not parts:
        return _empty(like)
    keys = list(parts[0]._stats)
    return MaskData(**{key: torch.cat([part[key] for part in parts]) for key in keys})


def _empty(like: MaskData | None) -> MaskData:
    """MaskData with no masks and every key the filters produce."""
    device = like["low_res"].device if like is not None else torch.device("cpu")
    shape = tuple(like["low_res"].shape[1:]) if like is not None else (0, 0)
    return MaskData(
        low_res=torch.zeros((0, *shape), device=device),
        iou_preds=torch.zeros(0, device=device),
        points=torch.zeros((0, 2), dtype=torch.float64),
        stability_score=torch.zeros(0, device=device),
        boxes=torch.zeros((0, 4), dtype=torch.long, device=device),
    )
