"""Visual prompts: the images that show one region to a multimodal model.

Each kind is a pure function ``kind(image, mask, bbox, **params) -> PIL.Image``:

* ``image`` is the stored image, RGB uint8 of shape (H, W, 3); it is never modified;
* ``mask`` is a boolean (H, W) array, or None for a box-only region, in which case the
  mask-based kinds use the box rectangle as the mask;
* ``bbox`` is [x, y, w, h] in pixels; a pixel belongs to the box when the box overlaps it.

``render`` looks a kind up in ``VISUAL_PROMPTS`` and validates its parameters (an unknown kind
or parameter, or a bad value, raises ConfigError); ``spec_provenance`` says what was rendered,
defaults included, for the record. ``to_png`` encodes the result (a model backend then fits
it to its pixel budget: ``annotators.caption.backends.images``).
"""
from __future__ import annotations

import difflib
import inspect
import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageFilter
from scipy import ndimage

from settings import ConfigError

Color = tuple[int, int, int]
Offset = tuple[int, int]
Bounds = tuple[int, int, int, int]

VERSION = "1"
RED: Color = (255, 0, 0)
GREY: Color = (128, 128, 128)
MARGIN = 0.25
MIN_MARGIN = 16
_EPS = 1e-6   # tolerance for box edges that sit on a pixel edge up to float error


# --------------------------------------------------------------------------- geometry


def box_bounds(bbox: Sequence[float], height: int, width: int) -> Bounds:
    """Pixel bounds (x0, y0, x1, y1), ends exclusive, of ``bbox`` clipped to the image.

    Every pixel the box overlaps is included, and a box thinner than a pixel still gets one, so
    any region has pixels to show. Raises ValueError for a malformed box or one that misses the
    image entirely, since nothing sensible can be rendered for it.
    """
    x, y, w, h = _check_bbox(bbox)
    x0, y0 = math.floor(x + _EPS), math.floor(y + _EPS)
    x1 = max(math.ceil(x + w - _EPS), x0 + 1)
    y1 = max(math.ceil(y + h - _EPS), y0 + 1)
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"bbox {list(bbox)} lies outside the {width}x{height} image")
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def crop_box(bbox: Sequence[float], height: int, width: int,
             margin: float = MARGIN, min_margin: int = MIN_MARGIN) -> Bounds:
    """Bounds (x0, y0, x1, y1), ends exclusive, of the context crop around ``bbox``.

    Each side extends by ``margin`` times the box size along that axis, at least ``min_margin``
    pixels, so small regions keep some surroundings; the result is clipped to the image and
    always contains the whole (clipped) box.
    """
    x0, y0, x1, y1 = box_bounds(bbox, height, width)
    mx = max(margin * (x1 - x0), min_margin)
    my = max(margin * (y1 - y0), min_margin)
    return (max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my)),
            min(width, math.ceil(x1 + mx)), min(height, math.ceil(y1 + my)))


def region_mask(mask: np.ndarray | None, bbox: Sequence[float],
                height: int, width: int) -> np.ndarray:
    """The region as a boolean (H, W) mask: ``mask`` itself, or the box rectangle when None.

    This is the box-only fallback shared by all mask-based kinds.
    """
    if mask is None:
        x0, y0, x1, y1 = box_bounds(bbox, height, width)
        rect = np.zeros((height, width), dtype=bool)
        rect[y0:y1, x0:x1] = True
        return rect
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match the image ({height}, {width})")
    return mask.astype(bool, copy=False)


def contour_mask(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its boundary (a band drawn inward).

    With ``width`` 1 this is the morphological boundary ``mask & ~erode(mask)`` (4-neighbour
    erosion, the image edge counting as outside), so a drawn contour never covers pixels
    outside the region and is closed even where the region meets the image border.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    depth = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    return (depth > 0) & (depth <= width)


def auto_line_width(height: int, width: int) -> int:
    """Default line width for outlines: 2 pixels, growing with the image's longest side.

    Lines must stay visible after the model's processor downsizes the image.
    """
    return max(2, round(max(height, width) / 256))


# --------------------------------------------------------------------------- kinds


def box(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
        color: Color | str = RED, width: int | None = None) -> Image.Image:
    """Whole image with the box outline drawn just inside its edges (the mask is ignored).

    ``width`` None scales the line with the image (``auto_line_width``).
    """
    p = _resolve("box", {"color": color, "width": width})
    rgb = _check_image(image)
    rect = region_mask(None, bbox, *rgb.shape[:2])
    return _paint(rgb, contour_mask(rect, _line_width(p["width"], rgb)), p["color"])


def contour(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
            color: Color | str = RED, width: int | None = None) -> Image.Image:
    """Whole image with the region's boundary drawn inward, ``width`` pixels thick.

    Every drawn pixel lies inside the mask, so the outline never hides the surroundings.
    ``width`` None scales the line with the image (``auto_line_width``).
    """
    p = _resolve("contour", {"color": color, "width": width})
    rgb = _check_image(image)
    region = region_mask(mask, bbox, *rgb.shape[:2])
    return _paint(rgb, contour_mask(region, _line_width(p["width"], rgb)), p["color"])


def crop_with_offset(image: np.ndarray, bbox: Sequence[float], *, margin: float = MARGIN,
                     min_margin: int = MIN_MARGIN) -> tuple[Image.Image, Offset]:
    """Context crop around ``bbox`` and its top-left corner (x0, y0) in the image.

    Image coordinates map into the crop by subtracting the offset.
    """
    p = _resolve("crop", {"margin": margin, "min_margin": min_margin})
    rgb = _check_image(image)
    x0, y0, x1, y1 = crop_box(bbox, *rgb.shape[:2], p["margin"], p["min_margin"])
    return Image.fromarray(rgb[y0:y1, x0:x1], "RGB"), (x0, y0)


def crop(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
         margin: float = MARGIN, min_margin: int = MIN_MARGIN) -> Image.Image:
    """Context crop around ``bbox`` (see ``crop_box``); the mask is ignored."""
    return crop_with_offset(image, bbox, margin=margin, min_margin=min_margin)[0]


def crop_masked(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
                margin: float = MARGIN, min_margin: int = MIN_MARGIN,
                fill: Color | str = GREY) -> Image.Image:
    """Context crop around ``bbox`` with every pixel outside the region set to ``fill``.

    Shows the region's shape and content without its surroundings.
    """
    p = _resolve("crop_masked", {"margin": margin, "min_margin": min_margin, "fill": fill})
    rgb = _check_image(image)
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = crop_box(bbox, height, width, p["margin"], p["min_margin"])
    inside = region_mask(mask, bbox, height, width)[y0:y1, x0:x1]
    out = rgb[y0:y1, x0:x1].copy()
    out[~inside] = p["fill"]
    return Image.fromarray(out, "RGB")


def highlight(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
              dim: float = 0.5, blur: float = 0.0) -> Image.Image:
    """Whole image with everything outside the region blurred and/or dimmed.

    Outside pixels are Gaussian-blurred with radius ``blur``, then scaled by ``1 - dim`` (and
    rounded down); pixels inside the region are left exactly as they are.
    """
    p = _resolve("highlight", {"dim": dim, "blur": blur})
    rgb = _check_image(image)
    inside = region_mask(mask, bbox, *rgb.shape[:2])
    source = rgb
    if p["blur"] > 0:
        source = np.asarray(Image.fromarray(rgb, "RGB").filter(ImageFilter.GaussianBlur(p["blur"])))
    faded = np.floor(source * (1.0 - p["dim"])).astype(np.uint8)
    return Image.fromarray(np.where(inside[..., None], rgb, faded), "RGB")


def alpha(image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float], *,
          crop: bool = True, margin: float = MARGIN,
          min_margin: int = MIN_MARGIN) -> Image.Image:
    """RGBA image whose alpha is the region (255 inside, 0 outside).

    With ``crop`` True it is the context crop of ``crop_box``, else the whole image.
    """
    p = _resolve("alpha", {"crop": crop, "margin": margin, "min_margin": min_margin})
    rgb = _check_image(image)
    inside = region_mask(mask, bbox, *rgb.shape[:2])
    rgba = np.dstack([rgb, np.where(inside, 255, 0).astype(np.uint8)])
    x0, y0, x1, y1 = _origin_bounds("alpha", p, rgb, bbox)
    return Image.fromarray(rgba[y0:y1, x0:x1], "RGBA")


VISUAL_PROMPTS: dict[str, Callable[..., Image.Image]] = {
    "box": box,
    "contour": contour,
    "crop": crop,
    "crop_masked": crop_masked,
    "highlight": highlight,
    "alpha": alpha,
}


# --------------------------------------------------------------------------- entry points


def render(kind: str, image: np.ndarray, mask: np.ndarray | None, bbox: Sequence[float],
           **params: Any) -> Image.Image:
    """Render visual prompt ``kind`` for one region after validating the kind and ``params``.

    Unknown kinds or parameters and bad values raise ConfigError naming them and the valid ones.
    """
    return render_with_offset(kind, image, mask, bbox, **params)[0]


def render_with_offset(kind: str, image: np.ndarray, mask: np.ndarray | None,
                       bbox: Sequence[float], **params: Any) -> tuple[Image.Image, Offset]:
    """Like ``render``, also returning where the prompt's top-left pixel sits in the image.

    The offset is (0, 0) for whole-image kinds; for crops it maps image coordinates into the
    prompt (subtract it), e.g. to point at things in the crop.
    """
    resolved = _resolve(kind, params)
    rendered = VISUAL_PROMPTS[kind](image, mask, bbox, **resolved)
    x0, y0, _, _ = _origin_bounds(kind, resolved, _check_image(image), bbox)
    return rendered, (x0, y0)


def spec_provenance(kind: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The kind, renderer version and every parameter (defaults filled in), JSON-ready.

    Goes into each record so a caption can be traced to exactly what the model saw; ``width``
    None means "scaled with the image" (``auto_line_width``).
    """
    resolved = _resolve(kind, dict(params or {}))
    plain = {name: list(value) if isinstance(value, tuple) else value
             for name, value in resolved.items()}
    return {"kind": kind, "version": VERSION, "params": plain}


def to_png(img: Image.Image) -> bytes:
    """PNG bytes of ``img``; the same pixels always give the same bytes.

    Metadata (text, ICC profile, EXIF, dpi) is dropped so that only pixels decide the encoding,
    which keeps record hashes and caches stable.
    """
    clean = img.copy()
    clean.info = {}
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------- internals


def _origin_bounds(kind: str, params: Mapping[str, Any], rgb: np.ndarray,
                   bbox: Sequence[float]) -> Bounds:
    height, width = rgb.shape[:2]
    if kind in ("crop", "crop_masked") or (kind == "alpha" and params["crop"]):
        return crop_box(bbox, height, width, params["margin"], params["min_margin"])
    return 0, 0, width, height


def _paint(rgb: np.ndarray, where: np.ndarray, color: Color) -> Image.Image:
    out = rgb.copy()
    out[where] = color
    return Image.fromarray(out, "RGB")


def _line_width(width: int | None, rgb: np.ndarray) -> int:
    return auto_line_width(*rgb.shape[:2]) if width is None else width


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image))
        raise ValueError(f"image must be an (H, W, 3) RGB array, got {got}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    values = list(bbox) if isinstance(bbox, (list, tuple, np.ndarray)) else []
    if len(values) != 4 or not all(_is_real(v) and math.isfinite(v) for v in values):
        raise ValueError(f"bbox must be [x, y, w, h] of 4 finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in values)
    if w < 0 or h < 0:
        raise ValueError(f"bbox width and height must be >= 0, got {bbox!r}")
    return x, y, w, h


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- parameters


def _resolve(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validated parameters of ``kind``: defaults filled in, colours as (r, g, b) tuples."""
    defaults = _defaults(_kind_function(kind))
    for name in params:
        if name not in defaults:
            raise ConfigError(_unknown(f"visual_prompt.{kind}.{name}", "parameter", name,
                                       list(defaults)))
    merged = {**defaults, **params}
    resolved = {name: _CHECKS[name](value, f"visual_prompt.{kind}.{name}")
                for name, value in merged.items()}
    if kind == "highlight" and resolved["dim"] == 0 and resolved["blur"] == 0:
        raise ConfigError("visual_prompt.highlight: dim and blur are both 0, which leaves the "
                          "image unchanged; set dim > 0 or blur > 0")
    return resolved


def _kind_function(kind: str) -> Callable[..., Image.Image]:
    if kind not in VISUAL_PROMPTS:
        raise ConfigError(_unknown("visual_prompt.kind", "visual prompt kind", kind,
                                   list(VISUAL_PROMPTS)))
    return VISUAL_PROMPTS[kind]


def _defaults(function: Callable[..., Image.Image]) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _unknown(where: str, what: str, name: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{where}: unknown {what} {name!r}; {hint}valid: {', '.join(valid)}"


def _check_color(value: Any, where: str) -> Color:
    if isinstance(value, str):
        try:
            r, g, b = ImageColor.getrgb(value)[:3]
            return r, g, b
        except ValueError:
            pass
    elif (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255
                  for c in value)):
        return int(value[0]), int(value[1]), int(value[2])
    raise ConfigError(f"{where}: expected a colour, got {value!r}; use [r, g, b] with values "
                      f"0-255 or a name such as 'red' or '#ff0000'")


def _check_width(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                         and value >= 1):
        return None if value is None else int(value)
    raise ConfigError(f"{where}: expected an integer >= 1 or null (scale with the image), "
                      f"got {value!r}")


def _check_unit(value: Any, where: str) -> float:
    if _is_real(value) and 0 <= value <= 1:
        return float(value)
    raise ConfigError(f"{where}: expected a number from 0 to 1, got {value!r}")


def _check_nonneg(value: Any, where: str) -> float:
    if _is_real(value) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")


def _check_count(value: Any, where: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise ConfigError(f"{where}: expected an integer >= 0 (pixels), got {value!r}")


def _check_flag(value: Any, where: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "color": _check_color,
    "fill": _check_color,
    "width": _check_width,
    "margin": _check_nonneg,
    "min_margin": _check_count,
    "dim": _check_unit,
    "blur": _check_nonneg,
    "crop": _check_flag,
}
