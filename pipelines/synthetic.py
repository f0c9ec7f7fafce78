"""Deterministic synthetic scenes: simple shapes with known masks, colours and positions.

``synthetic://N`` inputs are rendered from (seed, index) when read, so nothing is stored. The
ground truth (shape, colour name, bbox, area, visible mask) travels with the record's source so
annotators and the trainer can be scored against it.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from annotators.segment import masks as rle

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "orange": (240, 140, 30), "purple": (140, 60, 180), "white": (245, 245, 245),
    "black": (20, 20, 20), "pink": (240, 130, 190), "cyan": (40, 200, 210), "brown": (130, 80, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "beige": (225, 210, 180), "navy": (30, 40, 90), "olive": (110, 120, 50),
}
SHAPES = ("circle", "rectangle", "triangle", "ellipse")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle" or shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _random_box(rng: np.random.Generator, shape: str, outer: tuple[int, int, int, int],
                frac: tuple[float, float]) -> tuple[int, int, int, int]:
    ox0, oy0, ox1, oy1 = outer
    ow, oh = ox1 - ox0, oy1 - oy0
    w = int(ow * rng.uniform(*frac))
    h = w if shape == "circle" else int(oh * rng.uniform(*frac))
    h = min(h, oh - 2)
    x0 = int(rng.integers(ox0, max(ox0 + 1, ox1 - w)))
    y0 = int(rng.integers(oy0, max(oy0 + 1, oy1 - h)))
    return x0, y0, x0 + max(w, 4), y0 + max(h, 4)


def scene(seed: int, index: int, size: int = 256) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Render scene ``index`` of generator ``seed``: an RGB image and its objects.

    Objects are drawn in order (later ones occlude earlier ones); each object's mask is what is
    visible of it. Some objects carry a smaller object inside them (``parent`` = its index), to
    give the region hierarchy a known answer.
    """
    rng = np.random.default_rng([seed, index])
    bg_name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    label = np.zeros((size, size), dtype=np.int32)   # 0 = background, i+1 = object i
    objects: list[dict[str, Any]] = []
    n_objects = int(rng.integers(2, 5))
    colour_names = [str(c) for c in rng.permutation(list(COLOURS))]
    for _ in range(n_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        box = _random_box(rng, shape, (4, 4, size - 4, size - 4), (0.18, 0.42))
        objects.append({"shape": shape, "colour": colour_names.pop(), "box": box, "parent": None})
        if rng.random() < 0.5:
            inner_shape = SHAPES[int(rng.integers(len(SHAPES)))]
            pad = max(3, (box[2] - box[0]) // 8)
            inner_outer = (box[0] + pad, box[1] + pad, box[2] - pad, box[3] - pad)
            if shape == "triangle":   # keep the part inside the triangle's lower middle
                cx, cy = (box[0] + box[2]) // 2, (box[1] + 2 * box[3]) // 3
                r = max(4, (box[2] - box[0]) // 6)
                inner_outer = (cx - r, cy - r, cx + r, cy + r)
            inner = _random_box(rng, inner_shape, inner_outer, (0.45, 0.7))
            objects.append({"shape": inner_shape, "colour": colour_names.pop(), "box": inner,
                            "parent": len(objects) - 1})
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(objects):
        _draw(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
        layer = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(layer), obj["shape"], obj["box"], 255)
        label[np.asarray(layer) > 0] = i + 1
    return image, _ground_truth(objects, label, bg_name)


def _ground_truth(objects: list[dict[str, Any]], label: np.ndarray, bg: str) -> list[dict[str, Any]]:
    out = []
    for i, obj in enumerate(objects):
        # A whole includes its parts: its mask is its own visible pixels plus its children's.
        members = [i + 1] + [j + 1 for j, o in enumerate(objects) if o["parent"] == i]
        mask = np.isin(label, members)
        if not mask.any():
            continue
        encoded = rle.encode(mask)
        out.append({"id": f"gt{i}", "shape": obj["shape"], "colour": obj["colour"],
                    "parent": f"gt{obj['parent']}" if obj["parent"] is not None else None,
                    "bbox": rle.bbox(encoded), "area": rle.area(encoded), "mask": encoded,
                    "background": bg})
    return out


def scene_png(seed: int, index: int, size: int = 256) -> tuple[bytes, list[dict[str, Any]]]:
    """The scene encoded as PNG bytes (deterministic) plus its ground truth."""
    image, objects = scene(seed, index, size)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), objects
