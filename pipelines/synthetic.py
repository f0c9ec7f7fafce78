"""Deterministic synthetic scenes: simple shapes with known masks, colours and positions.

``synthetic://N`` inputs are rendered from (seed, index) when read, so nothing is stored. The
ground truth (shape, colour name, bbox, area, visible mask) travels with the record's source so
annotators and the trainer can be scored against it.

``scene(..., hard=True)`` (opt-in, used by ``pipelines.eval_annotators --hard``) renders harder
scenes from a separate random stream: textured shapes, objects placed over others (occlusion),
parts nested two deep (whole / part / subpart), and a crop of a bundled sample photograph or a
textured colour as the background. The default scenes do not change.
"""
from __future__ import annotations

import functools
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


def scene(seed: int, index: int, size: int = 256,
          hard: bool = False) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Render scene ``index`` of generator ``seed``: an RGB image and its objects.

    Objects are drawn in order (later ones occlude earlier ones); each object's mask is what is
    visible of it. Some objects carry a smaller object inside them (``parent`` = its index), to
    give the region hierarchy a known answer. ``hard``: see ``hard_scene``.
    """
    if hard:
        return hard_scene(seed, index, size)
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
        # A whole includes its parts: its mask is its own visible pixels plus its parts' (and
        # their parts', in hard scenes).
        members = [j + 1 for j in _with_descendants(objects, i)]
        mask = np.isin(label, members)
        if not mask.any():
            continue
        encoded = rle.encode(mask)
        out.append({"id": f"gt{i}", "shape": obj["shape"], "colour": obj["colour"],
                    "parent": f"gt{obj['parent']}" if obj["parent"] is not None else None,
                    "bbox": rle.bbox(encoded), "area": rle.area(encoded), "mask": encoded,
                    "background": bg, **({"texture": obj["texture"]} if "texture" in obj else {})})
    return out


def _with_descendants(objects: list[dict[str, Any]], i: int) -> list[int]:
    """Object ``i`` and every object nested in it, at any depth (parents come before parts)."""
    family = [i]
    for j in range(i + 1, len(objects)):
        if objects[j]["parent"] in family:
            family.append(j)
    return family


def scene_png(seed: int, index: int, size: int = 256,
              hard: bool = False) -> tuple[bytes, list[dict[str, Any]]]:
    """The scene encoded as PNG bytes (deterministic) plus its ground truth."""
    image, objects = scene(seed, index, size, hard)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), objects


# --------------------------------------------------------------------------- harder scenes (opt-in)

TEXTURES = ("plain", "stripes", "noise", "shade")
_HARD_STREAM = 1   # the hard scenes' own random stream: [seed, index, 1]; the default is [seed, index]


def hard_scene(seed: int, index: int, size: int = 256) -> tuple[Image.Image, list[dict[str, Any]]]:
    """A harder scene ``index`` of generator ``seed``, deterministic per (seed, index, size).

    Three to five wholes, half of them placed over an earlier one (occlusion); most carry a part
    and some parts a subpart (``parent`` chains two deep); shapes are textured (stripes of a
    darker shade, pixel noise, a lighting ramp) around their named colour; the background is a
    crop of a bundled sample photograph (``background`` = ``photo:<name>``) or a textured colour.
    An object's colour name is the colour it was painted with, before texture.
    """
    rng = np.random.default_rng([seed, index, _HARD_STREAM])
    pixels, bg_name = _hard_background(rng, size)
    colour_names = [str(c) for c in rng.permutation(list(COLOURS))]
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(3, 6))):
        if not colour_names:
            break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        wholes = [o for o in objects if o["parent"] is None]
        if wholes and rng.random() < 0.5:   # over an earlier whole: part of it is hidden
            box = _overlapping_box(rng, shape, wholes[int(rng.integers(len(wholes)))]["box"], size)
        else:
            box = _random_box(rng, shape, (4, 4, size - 4, size - 4), (0.2, 0.45))
        objects.append(_hard_object(rng, shape, colour_names.pop(), box, None))
        _add_parts(rng, objects, len(objects) - 1, colour_names, depth=1)
    label = np.zeros((size, size), dtype=np.int32)
    for i, obj in enumerate(objects):
        layer = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(layer), obj["shape"], obj["box"], 255)
        inside = np.asarray(layer) > 0
        pixels[inside] = _texture(rng, obj["texture"], COLOURS[obj["colour"]], size)[inside]
        label[inside] = i + 1
    return Image.fromarray(pixels), _ground_truth(objects, label, bg_name)


def _hard_object(rng: np.random.Generator, shape: str, colour: str, box: tuple[int, int, int, int],
                 parent: int | None) -> dict[str, Any]:
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    return {"shape": shape, "colour": colour, "box": box, "parent": parent, "texture": texture}


def _add_parts(rng: np.random.Generator, objects: list[dict[str, Any]], parent: int,
               colour_names: list[str], depth: int) -> None:
    """A part inside ``objects[parent]`` (likely for a whole, less so for a part), recursively
    down to subparts; each part lies inside its parent's drawn shape."""
    outer = objects[parent]
    x0, y0, x1, y1 = outer["box"]
    if depth > 2 or not colour_names or min(x1 - x0, y1 - y0) < 20 or rng.random() >= (0.75, 0.4)[depth - 1]:
        return
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    box = _random_box(rng, shape, _inscribed(outer["shape"], outer["box"]), (0.5, 0.85))
    if shape == "circle":   # the room left may be narrower than the circle: keep it round
        side = min(box[2] - box[0], box[3] - box[1])
        box = (box[0], box[1], box[0] + side, box[1] + side)
    objects.append(_hard_object(rng, shape, colour_names.pop(), box, parent))
    _add_parts(rng, objects, len(objects) - 1, colour_names, depth + 1)


def _inscribed(shape: str, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A box inside ``shape`` drawn in ``box``: any shape drawn within it stays inside."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "triangle":   # the widest box under the apex whose top corners touch the sides
        return x0 + w // 4 + 1, y0 + h // 2, x1 - w // 4 - 1, y1 - 1
    frac = 0.16 if shape in ("circle", "ellipse") else 0.06   # a box inside an ellipse: 1/sqrt(2)
    return x0 + int(w * frac) + 1, y0 + int(h * frac) + 1, x1 - int(w * frac) - 1, y1 - int(h * frac) - 1


def _overlapping_box(rng: np.random.Generator, shape: str, under: tuple[int, int, int, int],
                     size: int) -> tuple[int, int, int, int]:
    """A box centred on a random point of ``under``, so the new shape hides part of it."""
    cx, cy = rng.uniform(under[0], under[2]), rng.uniform(under[1], under[3])
    w = int(size * rng.uniform(0.15, 0.35))
    h = w if shape == "circle" else int(size * rng.uniform(0.15, 0.35))
    x0 = int(np.clip(cx - w / 2, 4, size - 4 - w))
    y0 = int(np.clip(cy - h / 2, 4, size - 4 - h))
    return x0, y0, x0 + w, y0 + h


def _texture(rng: np.random.Generator, kind: str, rgb: tuple[int, int, int], size: int) -> np.ndarray:
    """(size, size, 3) uint8 paint of ``kind`` around colour ``rgb``."""
    base = np.broadcast_to(np.asarray(rgb, np.float64), (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":   # darker stripes, horizontal, vertical or diagonal
        period = int(rng.integers(6, 15))
        along = (xx, yy, xx + yy)[int(rng.integers(3))]
        base[(along // (period // 2)) % 2 == 1] *= 0.72
    elif kind == "noise":
        base += rng.normal(0.0, 14.0, base.shape)
    elif kind == "shade":   # a lighting ramp across the image
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
        base *= (0.8 + 0.35 * ramp)[..., None]
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def _hard_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A square crop of a bundled sample photograph (half the scenes), else a textured colour."""
    photos = _sample_photos()
    if photos and rng.random() < 0.5:
        name = sorted(photos)[int(rng.integers(len(photos)))]
        photo = photos[name]
        side = int(min(photo.shape[:2]) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        return np.array(crop.resize((size, size), Image.Resampling.BILINEAR)), f"photo:{name}"
    bg_name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    kind = ("plain", "noise", "shade")[int(rng.integers(3))]
    return _texture(rng, kind, BACKGROUNDS[bg_name], size), bg_name


@functools.lru_cache(maxsize=1)
def _sample_photos() -> dict[str, np.ndarray]:
    """The bundled sample photographs (``samples`` input) as RGB pixels, by key."""
    from pipelines.sources import sample_refs   # late: the default scenes need no Beam import

    photos = {}
    for ref in sample_refs():
        with Image.open(ref.loader["path"]) as image:
            photos[ref.key] = np.array(image.convert("RGB"))
    return photos
