"""Benchmark ``sam-auto``: the stock SamAutomaticMaskGenerator against the fast path, ms/image.

Both paths run in the same process on the same weights (random weights cost the same as trained
ones) and the same synthetic images, through the segmenter itself, so the time includes RLE
encoding and building candidates. The report gives ms/image for each path, their ratio, masks per
image and how well the fast path's masks match the stock ones.

    python -m bench.sam_bench --model-type vit_h --images 8 --device cuda --json out.json
    python -m bench.sam_bench --smoke            # tiny SAM on CPU, 2 small images (used in tests)

Target on one H100 (ViT-H, 1024 px, points_per_side 32): fast >= 5x stock and <= 300 ms/image.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from annotators.base import SegmentInput, SegmentOutput
from annotators.devices import torch_device
from annotators.segment import masks
from annotators.segment.sam import SamAutoSegmenter
from annotators.segment.sam_model import build_random_sam, segment_anything_version

logger = logging.getLogger("bench.sam_bench")

TARGET = {"min_speedup": 5.0, "max_fast_ms_per_image": 300.0,
          "applies_to": "vit_h, 1024 px images, points_per_side 32, one H100"}
SMOKE = {"model_type": "tiny", "device": "cpu", "images": 2, "size": 160, "points_per_side": 8,
         "pred_iou_thresh": 0.7, "stability_score_thresh": 0.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; ``--smoke`` replaces model, device and sizes with a quick CPU run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_h", choices=["vit_h", "vit_l", "vit_b", "tiny"])
    parser.add_argument("--images", type=int, default=8, help="timed images per path")
    parser.add_argument("--batch", type=int, default=4,
                        help="images per segment_batch call on the fast path (encoder_batch)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--fast-points-per-batch", type=int, default=None,
                        help="decoder batch of the fast path (default: as memory allows)")
    parser.add_argument("--no-bf16", action="store_true", help="fast path in float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast encoder")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images per path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--smoke", action="store_true", help="tiny SAM on CPU, 2 small images")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Deterministic square RGB images: a gradient with coloured rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    images = []
    for _ in range(count):
        img = np.stack([xx * 200, yy * 200, (1 - xx) * 150], axis=-1)
        for _ in range(12):
            cx, cy, rx, ry = rng.uniform(0.05, 0.95, 2).tolist() + rng.uniform(0.03, 0.25, 2).tolist()
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            if rng.random() < 0.5:
                inside = (abs(xx - cx) < rx) & (abs(yy - cy) < ry)
            img[inside] = rng.integers(0, 256, 3)
        img += rng.normal(0, 4, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def segmenter_settings(args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    """Settings of one path: stock is the library's generator in float32, fast is ours."""
    settings: dict[str, Any] = {
        "model_type": args.model_type,
        "random_weights": args.model_type != "tiny",
        "init_seed": args.seed,
        "device": args.device,
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "fast": fast,
    }
    if fast:
        settings.update(encoder_batch=args.batch, bf16=not args.no_bf16,
                        compile_encoder=args.compile, points_per_batch=args.fast_points_per_batch)
    return settings


def time_path(segmenter: SamAutoSegmenter, images: list[np.ndarray], warmup: int,
              batch: int = 1) -> tuple[dict[str, Any], list[SegmentOutput]]:
    """Run ``segmenter`` on the images, ``batch`` per call (after ``warmup`` untimed calls);
    per-image timings (a call's time shared by its images) and outputs."""
    inputs = [SegmentInput(f"img{i}", img) for i, img in enumerate(images)]
    for _ in range(warmup):
        segmenter.segment_batch(inputs[:batch])
    cuda = segmenter.model is not None and segmenter.model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, outputs = [], []
    for start_index in range(0, len(inputs), batch):
        chunk = inputs[start_index:start_index + batch]
        start = time.perf_counter()
        outs = segmenter.segment_batch(chunk)
        if cuda:
            torch.cuda.synchronize()
        times += [(time.perf_counter() - start) * 1000.0 / len(chunk)] * len(chunk)
        for item, out in zip(chunk, outs, strict=True):
            if not isinstance(out, SegmentOutput):
                raise RuntimeError(f"segmenter failed on {item.key}: {out}")
            outputs.append(out)
    return _path_report(segmenter, times, outputs, cuda), outputs


def _path_report(segmenter: SamAutoSegmenter, times: list[float], outputs: list[SegmentOutput],
                 cuda: bool) -> dict[str, Any]:
    generator = segmenter.generator
    return {
        "ms_per_image": statistics.fmean(times),
        "ms_per_image_median": statistics.median(times),
        "masks_per_image": statistics.fmean(len(o.candidates) for o in outputs),
        "points_per_batch": getattr(generator, "points_per_batch", None),
        "bf16": segmenter.settings.bf16 and cuda,
        "compile_encoder": segmenter.settings.compile_encoder,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def mask_agreement(reference: list[SegmentOutput], other: list[SegmentOutput],
                   min_iou: float = 0.9) -> float | None:
    """Share of reference masks that have a mask with IoU >= ``min_iou`` in ``other``."""
    matched = total = 0
    for ref, out in zip(reference, other, strict=True):
        ref_rles = [c.rle for c in ref.candidates if c.rle]
        out_rles = [c.rle for c in out.candidates if c.rle]
        total += len(ref_rles)
        if ref_rles and out_rles:
            matched += int((masks.iou(ref_rles, out_rles).max(axis=1) >= min_iou).sum())
    return matched / total if total else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both paths on shared random weights, time them, and return the report."""
    device = torch_device(args.device)
    images = synthetic_images(args.images, args.size, args.seed)
    model = build_random_sam(args.model_type, args.seed)
    stock = SamAutoSegmenter(segmenter_settings(args, fast=False), where="bench.stock")
    fast = SamAutoSegmenter(segmenter_settings(args, fast=True), where="bench.fast")
    fast.attach_model(copy.deepcopy(model))      # the fast path adapts its model in place
    stock.attach_model(model)
    stock_report, stock_out = time_path(stock, images, args.warmup)
    fast_report, fast_out = time_path(fast, images, args.warmup, args.batch)
    return {
        "bench": "sam-auto", "smoke": args.smoke, "model_type": args.model_type,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "images": args.images, "size": args.size, "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_score_thresh,
        "stock": stock_report, "fast": fast_report,
        "speedup": stock_report["ms_per_image"] / fast_report["ms_per_image"],
        "mask_agreement": mask_agreement(stock_out, fast_out),
        "target": TARGET,
        "versions": {"torch": torch.__version__, "segment_anything": segment_anything_version()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, log a summary and write the JSON report (``--json`` or stdout)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = run(args)
    logger.info("%s on %s: stock %.1f ms/image, fast %.1f ms/image, speedup %.2fx, masks %.1f/%.1f",
                report["model_type"], report["device"], report["stock"]["ms_per_image"],
                report["fast"]["ms_per_image"], report["speedup"],
                report["stock"]["masks_per_image"], report["fast"]["masks_per_image"])
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
