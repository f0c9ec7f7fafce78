"""Inputs shared by the captioner tests."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from annotators.base import CaptionInput, RegionView
from annotators.caption import visual_prompts as vp
from annotators.segment import masks as rle


def make_item(key: str, specs: dict[str, list[dict[str, Any]]], width: int = 64,
              height: int = 48) -> CaptionInput:
    """A small gradient image with one box region and two mask regions, visual prompts rendered
    as the pipeline's RenderPrompts does. Key "failing" gets a tiny box; keys ending in "1" a
    different blue level."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 3
    rgb[..., 2] = 120 if key.endswith("1") else 30
    mask_a = np.zeros((height, width), bool)
    mask_a[10:30, 10:30] = True
    mask_b = np.zeros((height, width), bool)
    mask_b[30:38, 40:50] = True
    regions = [RegionView("r0", "region", None, [1.0, 1.0, 7.0, 7.0] if key == "failing" else
                          [5.0, 5.0, 30.0, 30.0], 900.0, None),
               RegionView("p0", "pixel", "r0", [10.0, 10.0, 20.0, 20.0], 400.0, rle.encode(mask_a)),
               RegionView("p1", "pixel", None, [40.0, 30.0, 10.0, 8.0], 80.0, rle.encode(mask_b))]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    item = CaptionInput(key, width, height, buf.getvalue(), regions)
    whole = [0.0, 0.0, float(width), float(height)]
    for target, region, bbox in [("image", None, whole)] + [(r.id, r, r.bbox) for r in regions]:
        level = "image" if region is None else region.level
        mask = rle.decode(region.rle) if region is not None and region.rle else None
        for spec in specs.get(level, []):
            params = {k: v for k, v in spec.items() if k not in ("name", "kind")}
            image = vp.render(spec["kind"], rgb, mask, bbox, **params)
            item.prompts.setdefault(target, {})[spec["name"]] = vp.to_png(image)
    return item
