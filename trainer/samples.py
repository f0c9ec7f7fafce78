"""One shard sample (image bytes + record JSON) → model inputs, and batches of them.

Per image: the whole image letterboxed to the model's square input; up to ``regions_per_image``
regions sampled (seeded by key and epoch, so the choice does not depend on which worker reads
the sample); per region its mask over the letterboxed image, and a square crop around its box
with the mask cropped the same way. A box-level region (no mask) uses its box as the mask.
Everything stays uint8 (numpy in the workers, torch after collation) until the training
device normalises it.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from trainer.text import Tokenizer

FILL = (124, 116, 104)   # ~ the CLIP mean colour: padding that normalises to about zero
# Large downscales first box-reduce by an integer factor (cheap, antialiased), then resample the
# rest: ~2x faster than one resample of the full image, and masks keep their soft edges.
REDUCING_GAP = 1.0


@dataclass(frozen=True)
class SampleOptions:
    """How regions are chosen and rendered."""

    image_size: int
    regions_per_image: int
    levels: tuple[str, ...] = ("pixel", "region")
    min_region_frac: float = 0.0
    crop_context: float = 0.1
    seed: int = 0
    image_tags: bool = True


def text_id(text: str) -> int:
    """Stable 63-bit id of a text: equal texts are the same target in the contrastive losses."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def region_mask(region: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The region's mask as uint8 {0,1} [H, W]: its RLE, or its box for box-level regions."""
    if region.get("mask"):
        rle = region["mask"]
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"region {region.get('id')}: mask size {rle['size']} != image {[height, width]}")
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    x, y, w, h = region["bbox"]
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = 1
    return mask


def choose_regions(record: dict[str, Any], opts: SampleOptions, epoch: int) -> list[dict[str, Any]]:
    """Usable regions (level, size, text), then a seeded sample of at most the cap."""
    area = record["image"]["width"] * record["image"]["height"]
    usable = [r for r in record["regions"]
              if r["level"] in opts.levels and r["area"] >= opts.min_region_frac * area
              and r.get("long_caption") and r.get("caption")]
    if len(usable) <= opts.regions_per_image:
        return usable
    return random.Random(_seed(opts.seed, epoch, record["key"])).sample(usable, opts.regions_per_image)


def _array(image: Image.Image) -> np.ndarray:
    """PIL → uint8 [C, H, W] (numpy: no torch thread pool on the loader's hot path)."""
    array = np.asarray(image, dtype=np.uint8)
    return array.transpose(2, 0, 1) if array.ndim == 3 else array[None]


def _square_box(bbox: list[float], context: float) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    side = max(w, h, 4.0) * (1 + 2 * context)
    cx, cy = x + w / 2, y + h / 2
    return (int(round(cx - side / 2)), int(round(cy - side / 2)),
            int(round(cx + side / 2)), int(round(cy + side / 2)))


def _letterbox(image: Image.Image, size: int, resample: Image.Resampling, fill: Any) -> Image.Image:
    """Fit inside size×size keeping the aspect ratio, centred on ``fill`` (ImageOps.pad's layout)."""
    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new(image.mode, (size, size), fill)
    resized = image.resize(new, resample, reducing_gap=REDUCING_GAP)
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def _crop(image: Image.Image, box: tuple[int, int, int, int], size: int, resample: Image.Resampling,
          fill: Any) -> Image.Image:
    """Crop (padding outside the image with ``fill``) and resize to size×size."""
    x0, y0, x1, y1 = box
    canvas = Image.new(image.mode, (x1 - x0, y1 - y0), fill)
    canvas.paste(image, (-x0, -y0))
    return canvas.resize((size, size), resample, reducing_gap=REDUCING_GAP)


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image member (jpg or png), fully decoded to RGB."""
    data = sample.get("jpg") or sample.get("png") or sample.get("jpeg")
    if data is None:
        raise KeyError(f"{sample.get('__key__')}: no jpg/png member")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def build_example(sample: dict[str, Any], opts: SampleOptions, epoch: int = 0) -> dict[str, Any]:
    """Shard sample → one image's model inputs (uint8 [C, S, S] arrays) and texts."""
    record = json.loads(sample["json"])
    image = decode_image(sample)
    width, height = image.size
    if (record["image"]["width"], record["image"]["height"]) != (width, height):
        raise ValueError(f"{record['key']}: record size {record['image']['width']}x"
                         f"{record['image']['height']} != image {width}x{height}")
    size = opts.image_size
    regions = choose_regions(record, opts, epoch)
    masks = np.zeros((len(regions), 1, size, size), np.uint8)
    crops = np.zeros((len(regions), 3, size, size), np.uint8)
    crop_masks = np.zeros((len(regions), 1, size, size), np.uint8)
    for i, region in enumerate(regions):
        mask = Image.fromarray(region_mask(region, height, width) * 255)
        masks[i] = _array(_letterbox(mask, size, Image.Resampling.BOX, 0))      # BOX: soft coverage at edges
        box = _square_box(region["bbox"], opts.crop_context)
        crops[i] = _array(_crop(image, box, size, Image.Resampling.BILINEAR, FILL))
        crop_masks[i] = _array(_crop(mask, box, size, Image.Resampling.BOX, 0))
    level = record["image_level"]
    image_text = level["long_caption"]
    if opts.image_tags and level.get("tags"):
        image_text = f"{image_text} Tags: {', '.join(level['tags'])}."
    return {
        "key": record["key"],
        "image": _array(_letterbox(image, size, Image.Resampling.BILINEAR, FILL)),
        "region_masks": masks, "crops": crops, "crop_masks": crop_masks,
        "long": [r["long_caption"] for r in regions],
        "short": [r["caption"] for r in regions],
        "levels": [r["level"] for r in regions],
        "image_text": image_text,
    }


def collate(examples: list[dict[str, Any]], tokenizer: Tokenizer) -> dict[str, Any]:
    """Examples → one batch: images [B,...], regions flattened [N,...], tokens, text ids."""
    long = [t for e in examples for t in e["long"]]
    short = [t for e in examples for t in e["short"]]
    image_text = [e["image_text"] for e in examples]
    counts = [len(e["long"]) for e in examples]

    def cat(key: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([e[key] for e in examples]))

    return {
        "keys": [e["key"] for e in examples],
        "images": torch.from_numpy(np.stack([e["image"] for e in examples])),
        "region_image": torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(counts)),
        "region_masks": cat("region_masks"),
        "crops": cat("crops"),
        "crop_masks": cat("crop_masks"),
        "long_text": tokenizer(long),
        "short_text": tokenizer(short),
        "image_text": tokenizer(image_text),
        "groups": {"long": torch.tensor([text_id(t) for t in long], dtype=torch.long),
                   "short": torch.tensor([text_id(t) for t in short], dtype=torch.long),
                   "image_text": torch.tensor([text_id(t) for t in image_text], dtype=torch.long)},
        "texts": {"long": long, "short": short, "image_text": image_text},
        "n_pixel": sum(lv == "pixel" for e in examples for lv in e["levels"]),
        "n_box": sum(lv == "region" for e in examples for lv in e["levels"]),
    }

