"""Images as a model receives them: resized to a pixel budget, then a data URL (for a server)
or decoded pixels (for a model in this process).

Both ways give the model the same pixels: the image is fit to ``max_pixels`` (aspect kept,
never upscaled; ``fit_to_pixels`` is the one size rule) and, when it must be re-encoded, encoded
as the settings say ("auto": PNG for PNG sources and images with alpha, JPEG otherwise). Encoded
bytes already within budget and in the wanted format are used as they are.
"""
from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING

import numpy as np

from annotators.caption.backends.base import ImageLike

if TYPE_CHECKING:
    from PIL import Image


def fit_to_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and w * h <= max_pixels (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def fit_pixels(img: Image.Image, max_pixels: int) -> Image.Image:
    """``img`` downsized to ``fit_to_pixels`` (Lanczos); an image within budget is returned as
    is."""
    from PIL import Image

    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    size = fit_to_pixels(img.width, img.height, max_pixels)
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                 jpeg_quality: int = 90) -> str:
    """A data URL of ``image`` fit to ``max_pixels`` (see the module docstring).

    ``image`` is encoded bytes (JPEG/PNG/...), an (H, W[, C]) uint8 array, a PIL image, or a
    ready URL string (returned unchanged).
    """
    if isinstance(image, str):
        if image.startswith(("data:", "http://", "https://")):
            return image
        raise ValueError("image strings must be data: or http(s): URLs")
    pil, raw, source_format = _open(image)
    fmt = _output_format(image_format, pil, source_format)
    target = fit_to_pixels(pil.width, pil.height, max_pixels)
    if raw is not None and target == pil.size and source_format == fmt:
        return _data_url(raw, fmt)
    return _data_url(_encode(_fit(pil, target, fmt, source_format), fmt, jpeg_quality), fmt)


def decode_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                 jpeg_quality: int = 90) -> Image.Image:
    """The RGB pixels a server would decode from ``encode_image(image, ...)``, without the URL.

    PNG is lossless, so a PNG result is only resized; a JPEG result is encoded and decoded, as the
    model would otherwise see it. A ``data:`` URL is decoded as it is; other URLs fail (nothing
    is downloaded).
    """
    from PIL import Image

    if isinstance(image, str):
        if not image.startswith("data:") or ";base64," not in image:
            raise ValueError(f"only base64 data URLs can be used in-process, got {image[:40]!r}")
        raw = base64.b64decode(image.split(";base64,", 1)[1])
        return Image.open(io.BytesIO(raw)).convert("RGB")
    pil, raw, source_format = _open(image)
    fmt = _output_format(image_format, pil, source_format)
    target = fit_to_pixels(pil.width, pil.height, max_pixels)
    if not (raw is not None and target == pil.size and source_format == fmt):
        pil = _fit(pil, target, fmt, source_format)
        if fmt != "PNG":
            pil = Image.open(io.BytesIO(_encode(pil, fmt, jpeg_quality)))
    return pil.convert("RGB")


def _open(image: bytes | np.ndarray | Image.Image) -> tuple[Image.Image, bytes | None, str | None]:
    """A PIL image of ``image``, its encoded bytes (None for pixels) and their format."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        pil = Image.open(io.BytesIO(raw))
        return pil, raw, pil.format
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image)), None, None
    return image, None, None


def _output_format(image_format: str, pil: Image.Image, source_format: str | None) -> str:
    if image_format != "auto":
        return image_format.upper()
    has_alpha = pil.mode in ("RGBA", "LA", "PA") or "transparency" in pil.info
    return "PNG" if has_alpha or source_format == "PNG" else "JPEG"


def _fit(pil: Image.Image, size: tuple[int, int], fmt: str,
         source_format: str | None) -> Image.Image:
    """``pil`` resized to ``size`` (bicubic) in a mode ``fmt`` can hold."""
    from PIL import Image

    if source_format == "JPEG" and size != pil.size:
        pil.draft("RGB", size)          # DCT-domain downscale while decoding: much cheaper
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    if fmt == "JPEG" and pil.mode not in ("RGB", "L"):
        pil = pil.convert("RGB")
    elif fmt == "PNG" and pil.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        pil = pil.convert("RGBA")
    return pil


def _encode(pil: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        pil.save(out, format="JPEG", quality=quality)
    else:
        pil.save(out, format=fmt, compress_level=1)
    return out.getvalue()


def _data_url(data: bytes, fmt: str) -> str:
    mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}.get(fmt, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
