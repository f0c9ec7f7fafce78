"""Visual prompts: the images that show one region to a multimodal model.

A kind draws one region of one image: ``kind(canvas, mask, bbox, **params) -> (image, offset)``.

* ``canvas`` (``Canvas``) holds the stored image, RGB uint8 of shape (H, W, 3), never modified,
  and gives the pixels to draw on: the whole image or a part of it, fit to a pixel budget
  (``Canvas.frame``), plus what all regions of the image share (a dimmed copy, ...);
* ``mask`` is the region as a ``MaskCrop``, or None for a box-only region, in which case the
  mask-based kinds use the box rectangle;
* ``bbox`` is [x, y, w, h] in pixels of the stored image; a pixel belongs to the box when the box
  overlaps it;
* the result is a PIL image (RGB, or RGBA for the alpha kind) and where its top-left corner
  sits in the stored image (x0, y0).

Geometry (boxes, margins, line widths, blur radii) is in pixels of the stored image, so a prompt
drawn under a pixel budget looks like the stored-size one shrunk. Whole-image kinds draw on the
whole image fit to the budget; crop kinds on their crop fit to it, so a crop keeps the stored
image's detail. Masks are sampled at the drawn pixels' centres (nearest neighbour).

Two ways in:

* ``render(kind, image, mask, bbox, **params)``: drawn at the stored size, as a PIL image
  (previews, tests); ``mask`` is a boolean (H, W) array or None;
* ``ImagePrompts(image, options)``: one image as a model backend gets it: the whole image
  prepared once, each region's prompts drawn at the backend's pixel budget and encoded
  (JPEG at a set quality; the alpha kind as WebP at a quarter of the budget:
  ``backends.images.ImageOptions``), each once. The caption engine sends these.

Kinds and parameters are validated on use (an unknown kind or parameter, or a bad value, raises
ConfigError); ``spec_provenance`` says what was drawn, defaults included, for the record.
"""
from __future__ import annotations

import difflib
import inspect
import io
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageFilter

from annotators.caption.backends.base import Encoded
from annotators.caption.backends.images import (
    ImageOptions,
    decode_rgb,
    encode_pixels,
    fit_to_pixels,
    prepare_image,
)
from settings import ConfigError

Color = tuple[int, int, int]
Offset = tuple[int, int]
Bounds = tuple[int, int, int, int]
Drawn = tuple[Image.Image, Offset]

# 2: drawn at the model's input size (not drawn at the stored size and shrunk by the backend)
# and sent as JPEG / WebP instead of PNG. 3: an alpha prompt sent as WebP keeps the colour
# under its transparent pixels (the context), at a sixth of the pixel budget.
VERSION = "3"
RED: Color = (255, 0, 0)
GREY: Color = (128, 128, 128)
MARGIN = 0.25
MIN_MARGIN = 16
_EPS = 1e-6   # tolerance for box edges that sit on a pixel edge up to float error
_EMPTY: Bounds = (0, 0, 0, 0)


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

    A pixel is in the band when a pixel outside the mask (the image edge counting as outside)
    lies within Euclidean distance ``width`` of it. With ``width`` 1 this is the morphological
    boundary ``mask & ~erode(mask)`` (4-neighbour erosion), so a drawn contour never covers
    pixels outside the region and is closed even where the region meets the image border.
    """
    inside = np.asarray(mask, dtype=bool)
    pad = width + 1
    padded = np.pad(inside, pad)
    # The outside pixel nearest to a region pixel always touches the region (a step from it
    # towards that pixel would be nearer), so the band is the region within ``width`` of this
    # ring: work proportional to the outline, not the area.
    touching = np.zeros_like(padded)
    touching[1:] |= padded[:-1]
    touching[:-1] |= padded[1:]
    touching[:, 1:] |= padded[:, :-1]
    touching[:, :-1] |= padded[:, 1:]
    ys, xs = np.nonzero(touching & ~padded)
    near = np.zeros_like(padded)
    for dy, dx in _disk(width):
        near[ys + dy, xs + dx] = True
    return (near & padded)[pad:-pad, pad:-pad]


def auto_line_width(height: int, width: int) -> int:
    """Default line width for outlines: 2 pixels, growing with the image's longest side.

    Lines must stay visible after the model's processor downsizes the image.
    """
    return max(2, round(max(height, width) / 256))


@dataclass(frozen=True)
class MaskCrop:
    """A region mask given by the part of the image that holds its pixels: ``pixels`` (bool,
    h x w) with its top-left corner at (x0, y0) of an image of ``shape`` (H, W); every pixel
    outside it is outside the region. Saves handling full-image masks for small regions."""

    pixels: np.ndarray
    x0: int
    y0: int
    shape: tuple[int, int]

    @classmethod
    def of(cls, mask: np.ndarray) -> MaskCrop:
        """The crop of a boolean (H, W) mask to its pixels' bounds (a view, not a copy)."""
        full = np.asarray(mask).astype(bool, copy=False)
        rows = np.flatnonzero(full.any(axis=1))
        if rows.size == 0:
            return cls(np.zeros((0, 0), bool), 0, 0, (full.shape[0], full.shape[1]))
        cols = np.flatnonzero(full[rows[0]:rows[-1] + 1].any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return cls(full[y0:y1, x0:x1], x0, y0, (full.shape[0], full.shape[1]))

    @property
    def bounds(self) -> Bounds:
        """(x0, y0, x1, y1), ends exclusive, in the image."""
        h, w = self.pixels.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h


@dataclass(frozen=True)
class Frame:
    """Pixels to draw on: the stored image's ``window`` (x0, y0, x1, y1) as ``image`` (RGB),
    scaled by ``scale`` (drawn pixels per stored pixel, along x and y). Never modified: copy to
    draw. Pillow composites (paste with a mask) several times faster than numpy boolean
    indexing on RGB pixels, so drawing works on the PIL image."""

    image: Image.Image
    window: Bounds
    scale: tuple[float, float]

    @cached_property
    def rgb(self) -> np.ndarray:
        """The pixels as a read-only (h, w, 3) array."""
        return np.asarray(self.image)

    def box(self, bbox: Sequence[float]) -> Bounds:
        """Frame-pixel bounds (x0, y0, x1, y1), ends exclusive, of the pixels ``bbox`` (stored
        pixels) overlaps (``box_bounds`` of the scaled box)."""
        x, y, w, h = _check_bbox(bbox)
        (sx, sy), (wx, wy) = self.scale, self.window[:2]
        width, height = self.image.size
        return box_bounds([(x - wx) * sx, (y - wy) * sy, w * sx, h * sy], height, width)

    def region(self, mask: MaskCrop | None, bbox: Sequence[float]) -> tuple[Bounds, np.ndarray]:
        """The region in frame pixels: bounds enclosing it and a boolean array of their shape,
        True inside. A box-only region (``mask`` None) is the box (``box``)."""
        if mask is None:
            x0, y0, x1, y1 = self.box(bbox)
            return (x0, y0, x1, y1), np.ones((y1 - y0, x1 - x0), dtype=bool)
        wx0, wy0, wx1, wy1 = self.window
        mx0, my0, mx1, my1 = mask.bounds
        x0, y0, x1, y1 = max(mx0, wx0), max(my0, wy0), min(mx1, wx1), min(my1, wy1)
        if x0 >= x1 or y0 >= y1:
            return _EMPTY, np.zeros((0, 0), dtype=bool)
        if self.scale == (1.0, 1.0):
            inside = mask.pixels[y0 - my0:y1 - my0, x0 - mx0:x1 - mx0]
            return (x0 - wx0, y0 - wy0, x1 - wx0, y1 - wy0), inside
        width, height = self.image.size
        fx0, fx1, cols = _samples(x0 - wx0, x1 - wx0, self.scale[0], width)
        fy0, fy1, rows = _samples(y0 - wy0, y1 - wy0, self.scale[1], height)
        # stored pixels sampled (window coordinates) -> mask pixels; samples off the mask are
        # outside (clipped to its edge, then cleared)
        keep_c = (cols >= x0 - wx0) & (cols < x1 - wx0)
        keep_r = (rows >= y0 - wy0) & (rows < y1 - wy0)
        picked_c = np.clip(cols + wx0 - mx0, 0, mx1 - mx0 - 1)
        picked_r = np.clip(rows + wy0 - my0, 0, my1 - my0 - 1)
        inside = np.take(np.take(mask.pixels, picked_r, axis=0), picked_c, axis=1)
        inside &= keep_r[:, None]
        inside &= keep_c[None, :]
        return (fx0, fy0, fx1, fy1), inside

    def line(self, width: int) -> int:
        """A line ``width`` stored pixels wide, in frame pixels (at least 1)."""
        return max(1, round(width * (self.scale[0] + self.scale[1]) / 2))

    def length(self, value: float) -> float:
        """A length in stored pixels, in frame pixels."""
        return value * (self.scale[0] + self.scale[1]) / 2


class Canvas:
    """One stored image, ready to draw its regions' prompts under a pixel budget
    (``max_pixels``; None keeps the stored size).

    Keeps what every region of the image shares: the whole image fit to the budget
    (``frame()``) and per-image derivatives (``shared``), so a prompt only draws what changes.
    """

    def __init__(self, image: np.ndarray, max_pixels: int | None = None) -> None:
        self.image = _check_image(image)
        self.height, self.width = image.shape[:2]
        if max_pixels is not None and (isinstance(max_pixels, bool) or
                                       not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
        self.max_pixels = max_pixels
        self._whole: Frame | None = None
        self._shared: dict[Hashable, Any] = {}

    def frame(self, window: Bounds | None = None) -> Frame:
        """The whole image (``window`` None or the whole image; made once) or its part
        ``window``, fit to the budget."""
        if window is not None and window != (0, 0, self.width, self.height):
            return self._fit(window)
        if self._whole is None:
            self._whole = self._fit(None)
        return self._whole

    def shared(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, made once per canvas and ``key`` (read-only to callers: copy to draw)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def line_width(self, width: int | None) -> int:
        """A line width in stored pixels: ``width``, or ``auto_line_width`` when None."""
        return auto_line_width(self.height, self.width) if width is None else width

    def draw(self, kind: str, mask: np.ndarray | MaskCrop | None, bbox: Sequence[float],
             **params: Any) -> Drawn:
        """Visual prompt ``kind`` of one region (a PIL image: RGB, or RGBA for the alpha kind)
        and its top-left corner in the stored image, after validating the kind and ``params``
        (ConfigError) and the region (ValueError)."""
        resolved = _resolve(kind, params)
        _check_bbox(bbox)
        return VISUAL_PROMPTS[kind](self, self._mask(mask), bbox, **resolved)

    @cached_property
    def source(self) -> Image.Image:
        """The stored image as a PIL image (made once; never modified)."""
        return Image.fromarray(np.ascontiguousarray(self.image), "RGB")

    def _fit(self, window: Bounds | None) -> Frame:
        x0, y0, x1, y1 = window or (0, 0, self.width, self.height)
        width, height = x1 - x0, y1 - y0
        size = (width, height) if self.max_pixels is None else \
            fit_to_pixels(width, height, self.max_pixels)
        if size != (width, height):    # area averaging, as the pipeline stores images
            image = self.source.resize(size, Image.Resampling.BOX, box=(x0, y0, x1, y1))
        elif window is None:
            image = self.source        # shared: kinds copy before drawing
        else:
            image = self.source.crop(window)
        return Frame(image, (x0, y0, x1, y1), (size[0] / width, size[1] / height))

    def _mask(self, mask: np.ndarray | MaskCrop | None) -> MaskCrop | None:
        if mask is None:
            return None
        shape = mask.shape if isinstance(mask, MaskCrop) else np.shape(mask)
        if tuple(shape) != (self.height, self.width):
            raise ValueError(f"mask shape {tuple(shape)} does not match the image "
                             f"({self.height}, {self.width})")
        return mask if isinstance(mask, MaskCrop) else MaskCrop.of(mask)


# --------------------------------------------------------------------------- kinds


def box(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
        color: Color | str = RED, width: int | None = None) -> Drawn:
    """Whole image with the box outline drawn just inside its edges (the mask is ignored).

    ``width`` None scales the line with the image (``auto_line_width``).
    """
    frame = canvas.frame()
    out = frame.image.copy()
    x0, y0, x1, y1 = frame.box(bbox)
    line = frame.line(canvas.line_width(width))
    for edge in ((x0, y0, x1, min(y0 + line, y1)), (x0, max(y1 - line, y0), x1, y1),
                 (x0, y0, min(x0 + line, x1), y1), (max(x1 - line, x0), y0, x1, y1)):
        out.paste(color, edge)
    return out, (0, 0)


def contour(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
            color: Color | str = RED, width: int | None = None) -> Drawn:
    """Whole image with the region's boundary drawn inward, ``width`` pixels thick.

    Every drawn pixel lies inside the mask, so the outline never hides the surroundings.
    ``width`` None scales the line with the image (``auto_line_width``).
    """
    frame = canvas.frame()
    out = frame.image.copy()
    bounds, inside = frame.region(mask, bbox)
    if inside.size:
        band = contour_mask(inside, frame.line(canvas.line_width(width)))
        out.paste(color, bounds, _stencil(band))
    return out, (0, 0)


def crop(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
         margin: float = MARGIN, min_margin: int = MIN_MARGIN) -> Drawn:
    """Context crop around ``bbox`` (see ``crop_box``); the mask is ignored."""
    frame = canvas.frame(crop_box(bbox, canvas.height, canvas.width, margin, min_margin))
    return frame.image, frame.window[:2]


def crop_masked(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
                margin: float = MARGIN, min_margin: int = MIN_MARGIN,
                fill: Color | str = GREY) -> Drawn:
    """Context crop around ``bbox`` with every pixel outside the region set to ``fill``.

    Shows the region's shape and content without its surroundings.
    """
    frame = canvas.frame(crop_box(bbox, canvas.height, canvas.width, margin, min_margin))
    out = Image.new("RGB", frame.image.size, fill)
    bounds, inside = frame.region(mask, bbox)
    if inside.size:
        out.paste(frame.image.crop(bounds), bounds, _stencil(inside))
    return out, frame.window[:2]


def highlight(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
              dim: float = 0.5, blur: float = 0.0) -> Drawn:
    """Whole image with everything outside the region blurred and/or dimmed.

    Outside pixels are Gaussian-blurred with radius ``blur``, then scaled by ``1 - dim`` (and
    rounded down); pixels inside the region are left exactly as they are.
    """
    frame = canvas.frame()
    faded = canvas.shared(("highlight", dim, blur),
                          lambda: _faded(frame.image, dim, frame.length(blur)))
    out = faded.copy()
    bounds, inside = frame.region(mask, bbox)
    if inside.size:
        out.paste(frame.image.crop(bounds), bounds, _stencil(inside))
    return out, (0, 0)


def alpha(canvas: Canvas, mask: MaskCrop | None, bbox: Sequence[float], *,
          crop: bool = True, margin: float = MARGIN,
          min_margin: int = MIN_MARGIN) -> Drawn:
    """RGBA image whose alpha is the region (255 inside, 0 outside).

    With ``crop`` True it is the context crop of ``crop_box``, else the whole image.
    """
    window = crop_box(bbox, canvas.height, canvas.width, margin, min_margin) if crop else None
    frame = canvas.frame(window)
    opacity = Image.new("L", frame.image.size, 0)
    bounds, inside = frame.region(mask, bbox)
    if inside.size:
        opacity.paste(255, bounds, _stencil(inside))
    out = frame.image.copy()
    out.putalpha(opacity)
    return out, frame.window[:2]


VISUAL_PROMPTS: dict[str, Callable[..., Drawn]] = {
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
    """Render visual prompt ``kind`` for one region at the image's own size, after validating
    the kind and ``params``.

    Unknown kinds or parameters and bad values raise ConfigError naming them and the valid ones.
    """
    return render_with_offset(kind, image, mask, bbox, **params)[0]


def render_with_offset(kind: str, image: np.ndarray, mask: np.ndarray | None,
                       bbox: Sequence[float], **params: Any) -> tuple[Image.Image, Offset]:
    """Like ``render``, also returning where the prompt's top-left pixel sits in the image.

    The offset is (0, 0) for whole-image kinds; for crops it maps image coordinates into the
    prompt (subtract it), e.g. to point at things in the crop.
    """
    _resolve(kind, params)          # a bad kind or parameter is reported before the image
    return Canvas(image).draw(kind, mask, bbox, **params)


def crop_with_offset(image: np.ndarray, bbox: Sequence[float], *, margin: float = MARGIN,
                     min_margin: int = MIN_MARGIN) -> tuple[Image.Image, Offset]:
    """Context crop around ``bbox`` and its top-left corner (x0, y0) in the image.

    Image coordinates map into the crop by subtracting the offset.
    """
    return render_with_offset("crop", image, None, bbox, margin=margin, min_margin=min_margin)


class ImagePrompts:
    """One image as a model backend gets it: the whole image and its regions' visual prompts,
    each prepared once.

    The whole image goes through ``prepare_image`` once (the stored bytes as they are when they
    already fit the backend's budget and format, else the canvas's fitted pixels, encoded).
    Prompts are drawn on a ``Canvas`` at the backend's pixel budget (the image decoded once,
    fit once; ``ImageOptions.prompt_max_pixels``) and encoded as ``options`` say
    (``ImageOptions.prompt_encoding``); with a ``key``, a prompt several requests send is drawn
    and encoded once. ``decoded`` gives the image's pixels when they are shared with other
    ``ImagePrompts`` of the same image (other backend settings).
    """

    def __init__(self, image: bytes | np.ndarray, options: ImageOptions = ImageOptions(),
                 decoded: Callable[[], np.ndarray] | None = None) -> None:
        self.image = image
        self.options = options
        self._decoded = decoded         # the image's pixels, when already decoded elsewhere
        self._rgb: np.ndarray | None = None
        self._canvases: dict[int, Canvas] = {}
        self._whole: Encoded | None = None
        self._prompts: dict[Hashable, Encoded] = {}

    @property
    def canvas(self) -> Canvas:
        """The decoded image under the backend's pixel budget (decoded on first use)."""
        return self.canvas_for(self.options.max_pixels)

    def canvas_for(self, max_pixels: int) -> Canvas:
        """The decoded image (decoded once) under ``max_pixels`` (one canvas per budget)."""
        if max_pixels not in self._canvases:
            if self._rgb is None:
                self._rgb = self.image if isinstance(self.image, np.ndarray) else \
                    self._decoded() if self._decoded is not None else decode_rgb(self.image)
            self._canvases[max_pixels] = Canvas(self._rgb, max_pixels)
        return self._canvases[max_pixels]

    def whole(self) -> Encoded:
        """The whole image as sent (made once)."""
        if self._whole is None:
            o = self.options
            # when it must be re-encoded, the canvas's fitted image is used: decoded and
            # resized once for the whole image and the prompts alike
            self._whole = prepare_image(self.image, o.max_pixels, o.image_format, o.jpeg_quality,
                                        fitted_rgb=lambda: self.canvas.frame().image)
        return self._whole

    def prompt(self, kind: str, mask: np.ndarray | MaskCrop | None, bbox: Sequence[float],
               params: Mapping[str, Any] | None = None, *, key: Hashable = None) -> Encoded:
        """Visual prompt ``kind`` of one region, drawn and encoded as sent (kept by ``key``)."""
        if key is not None and key in self._prompts:
            return self._prompts[key]
        alpha = has_alpha(kind)
        canvas = self.canvas_for(self.options.prompt_max_pixels(alpha))
        drawn, _ = canvas.draw(kind, mask, bbox, **dict(params or {}))
        fmt, quality = self.options.prompt_encoding(alpha)
        encoded = Encoded(encode_pixels(drawn, fmt, quality), fmt, drawn.size)
        if key is not None:
            self._prompts[key] = encoded
        return encoded


def spec_provenance(kind: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The kind, renderer version and every parameter (defaults filled in), JSON-ready.

    Goes into each record so a caption can be traced to exactly what the model saw; ``width``
    None means "scaled with the image" (``auto_line_width``). How the prompt was sent (pixel
    budget, format, quality) depends on the backend: ``ImageOptions.prompt_provenance``.
    """
    resolved = _resolve(kind, dict(params or {}))
    plain = {name: list(value) if isinstance(value, tuple) else value
             for name, value in resolved.items()}
    return {"kind": kind, "version": VERSION, "params": plain}


def has_alpha(kind: str) -> bool:
    """Whether prompts of ``kind`` carry an alpha channel (and so need a format with one)."""
    return kind == "alpha"


def to_png(img: Image.Image) -> bytes:
    """PNG bytes of ``img``; the same pixels always give the same bytes.

    Metadata (text, ICC profile, EXIF, dpi) is dropped so that only pixels decide the encoding,
    which keeps record hashes and caches stable. (Models get JPEG / WebP: ``ImagePrompts``.)
    """
    clean = img.copy()
    clean.info = {}
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def render_specs(specs: Mapping[str, list[dict[str, Any]]], rgb: np.ndarray,
                 regions: Sequence[Any]) -> dict[str, dict[str, bytes]]:
    """The visual prompts a captioner asks for (``prompt_specs()``: level → [{name, kind,
    **params}]) rendered as PNG per target: ``"image"`` and each region's id (regions have
    ``id``, ``level``, ``bbox`` and a COCO RLE ``rle`` or None)."""
    from annotators.segment import masks as rle

    height, width = rgb.shape[:2]
    out: dict[str, dict[str, bytes]] = {}
    targets = [("image", None, [0.0, 0.0, float(width), float(height)])] + [(r.id, r, r.bbox) for r in regions]
    for target, region, bbox in targets:
        level = "image" if region is None else region.level
        mask = rle.decode(region.rle) if region is not None and region.rle is not None else None
        for spec in specs.get(level, []):
            params = {k: v for k, v in spec.items() if k not in ("name", "kind")}
            out.setdefault(target, {})[spec["name"]] = to_png(render(spec["kind"], rgb, mask, bbox, **params))
    return out


# --------------------------------------------------------------------------- internals


def _samples(start: int, end: int, scale: float, limit: int) -> tuple[int, int, np.ndarray]:
    """Drawn pixels [f0, f1) whose centres can fall in stored pixels [start, end) of a window
    scaled by ``scale``, and the stored pixel each centre falls in (window coordinates)."""
    f0 = max(0, math.floor(start * scale))
    f1 = min(limit, math.ceil(end * scale))
    return f0, f1, np.floor((np.arange(f0, f1) + 0.5) / scale).astype(np.int64)


def _faded(image: Image.Image, dim: float, radius: float) -> Image.Image:
    """``image`` Gaussian-blurred with ``radius`` (when > 0), then scaled by 1 - dim, floored."""
    source = image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image
    return source.point([math.floor(v * (1.0 - dim)) for v in range(256)] * 3)


def _stencil(inside: np.ndarray) -> Image.Image:
    """A boolean array as a Pillow paste mask (mode "1")."""
    return Image.fromarray(np.ascontiguousarray(inside, dtype=bool))


_DISKS: dict[int, list[tuple[int, int]]] = {}


def _disk(radius: int) -> list[tuple[int, int]]:
    """Integer offsets (dy, dx) with dy^2 + dx^2 <= radius^2."""
    if radius not in _DISKS:
        span = range(-radius, radius + 1)
        _DISKS[radius] = [(dy, dx) for dy in span for dx in span
                          if dy * dy + dx * dx <= radius * radius]
    return _DISKS[radius]


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


def _kind_function(kind: str) -> Callable[..., Drawn]:
    if kind not in VISUAL_PROMPTS:
        raise ConfigError(_unknown("visual_prompt.kind", "visual prompt kind", kind,
                                   list(VISUAL_PROMPTS)))
    return VISUAL_PROMPTS[kind]


def _defaults(function: Callable[..., Drawn]) -> dict[str, Any]:
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
