"""Images as a model receives them: fit to a pixel budget, then a data URL (for a server) or
decoded pixels (for a model in this process).

Both ways give the model the same pixels. A backend's image settings (``ImageOptions``) say how:

* the whole image is fit to ``max_pixels`` (aspect kept, never upscaled; ``fit_to_pixels`` is
  the one size rule) and, when it must be re-encoded, encoded as ``image_format`` says ("auto":
  PNG for PNG sources and images with alpha, JPEG otherwise; ``jpeg_quality``). Encoded bytes
  already within budget and in the wanted format are used as they are (``prepare_image``);
* visual prompts are drawn by the caption engine already at that size (a quarter of the budget
  for prompts with an alpha channel: ``ImageOptions.prompt_max_pixels``;
  ``annotators.caption.visual_prompts.ImagePrompts``) and encoded as ``prompt_format`` /
  ``prompt_quality`` say (``ImageOptions.prompt_encoding``); they arrive as ``Encoded`` and are
  sent as they are.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from annotators.caption.backends.base import Encoded, ImageLike

if TYPE_CHECKING:
    from PIL import Image

@dataclass(frozen=True)
class ImageOptions:
    """A backend's image settings: what every image it sends looks like.

    ``max_pixels`` bounds width * height of each image (the whole image and each visual prompt).
    The whole image, when it must be re-encoded, goes as ``image_format`` at ``jpeg_quality``;
    visual prompts go as ``prompt_format`` at ``prompt_quality`` (see ``prompt_encoding``).
    """

    max_pixels: int = 1024 * 1024
    image_format: str = "auto"
    jpeg_quality: int = 90
    prompt_format: str = "jpeg"
    prompt_quality: int = 90

    # A prompt with an alpha channel needs WebP or PNG, which encode 10-40x slower per pixel
    # than JPEG (1 MP: WebP ~26 ms, PNG ~110 ms, JPEG ~2.6 ms); at a sixth of the budget (0.41
    # of the side: 418 x 418 of 1024 x 1024; only large crops shrink) it stays within ~12 ms
    # of CPU per prompt.
    ALPHA_BUDGET_SHARE: ClassVar[int] = 6

    @classmethod
    def from_settings(cls, settings: Any) -> ImageOptions:
        """The options of a backend's settings (fields ``image_max_pixels``, ``image_format``,
        ``jpeg_quality``, ``prompt_format``, ``prompt_quality``)."""
        return cls(settings.image_max_pixels, settings.image_format, settings.jpeg_quality,
                   settings.prompt_format, settings.prompt_quality)

    def prompt_encoding(self, alpha: bool) -> tuple[str, int | None]:
        """(format, quality) of a visual prompt; quality is None for lossless PNG.

        JPEG has no alpha channel, so a prompt with one (the ``alpha`` kind) goes as WebP (lossy
        colour at ``prompt_quality``, lossless alpha) unless ``prompt_format`` is png.
        """
        if self.prompt_format == "png":
            return "PNG", None
        if alpha or self.prompt_format == "webp":
            return "WEBP", self.prompt_quality
        return "JPEG", self.prompt_quality

    def prompt_max_pixels(self, alpha: bool) -> int:
        """The pixel budget of a visual prompt: ``max_pixels``, a sixth of it with alpha."""
        return max(1024, self.max_pixels // self.ALPHA_BUDGET_SHARE) if alpha else self.max_pixels

    def prompt_provenance(self, alpha: bool) -> dict[str, Any]:
        """What a visual prompt was sent as: pixel budget, format and quality (JSON-ready)."""
        fmt, quality = self.prompt_encoding(alpha)
        return {"max_pixels": self.prompt_max_pixels(alpha), "format": fmt.lower(),
                "quality": quality}


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


def resize_pixels(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` (H, W, C uint8) shrunk to ``size`` (w, h) by area averaging (Pillow's BOX, as
    the pipeline stores images): about half the time of bicubic, which matters when every large
    crop of an image is fit to the budget. An image already that size is returned as it is."""
    from PIL import Image

    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.BOX)
    return np.asarray(resized)


def encode_pixels(pixels: np.ndarray | Image.Image, fmt: str, quality: int | None) -> bytes:
    """``pixels`` encoded as a visual prompt is sent: ``fmt`` JPEG, WEBP or PNG, no metadata.

    JPEG at ``quality`` with full-resolution colour (4:4:4): Pillow's default 4:2:0 turns a
    2-pixel red outline into dull (160, 40, 40); 4:4:4 keeps it red for ~1.6x the encode time
    (still ~4 ms per megapixel). WebP at ``quality``, fastest method (its colour is always
    4:2:0; alpha lossless). PNG at zlib level 1.
    """
    from PIL import Image

    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(
        np.ascontiguousarray(pixels))
    fmt = fmt.upper()
    if fmt == "JPEG":
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90 if quality is None else quality, subsampling=0)
        return out.getvalue()
    return _encode(img, fmt, 90 if quality is None else quality)


def prepare_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                  jpeg_quality: int = 90,
                  fitted_rgb: Callable[[], Image.Image] | None = None) -> Encoded:
    """``image`` fit to ``max_pixels`` and encoded (see the module docstring), as ``Encoded``.

    ``image`` is encoded bytes (JPEG/PNG/...), an (H, W[, C]) uint8 array, a PIL image or
    ``Encoded`` (returned unchanged: it was made for this backend). ``fitted_rgb``, when given,
    returns the image already decoded and fit to ``max_pixels`` as RGB (the caption engine's
    canvas), used instead of decoding and resizing again when an image without alpha must be
    re-encoded.
    """
    if isinstance(image, Encoded):
        return image
    if isinstance(image, str):
        raise ValueError("image strings are URLs; they cannot be re-encoded")
    pil, raw, source_format = _open(image)
    fmt = _output_format(image_format, pil, source_format)
    target = fit_to_pixels(pil.width, pil.height, max_pixels)
    if raw is not None and target == pil.size and source_format == fmt:
        return Encoded(raw, fmt, pil.size)
    if fitted_rgb is not None and not _has_alpha(pil):
        fitted = fitted_rgb()
        if fitted.size != target:
            raise ValueError(f"the fitted image is {fitted.size}, not {target}")
    else:
        fitted = _fit(pil, target, fmt, source_format)
    return Encoded(_encode(fitted, fmt, jpeg_quality), fmt, fitted.size)


def encode_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                 jpeg_quality: int = 90) -> str:
    """A data URL of ``image`` fit to ``max_pixels`` (see the module docstring).

    ``image`` is encoded bytes (JPEG/PNG/...), an (H, W[, C]) uint8 array, a PIL image,
    ``Encoded`` bytes (sent as they are) or a ready URL string (returned unchanged).
    """
    if isinstance(image, str):
        if image.startswith(("data:", "http://", "https://")):
            return image
        raise ValueError("image strings must be data: or http(s): URLs")
    return prepare_image(image, max_pixels, image_format, jpeg_quality).data_url()


def decode_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                 jpeg_quality: int = 90) -> Image.Image:
    """The RGB pixels a server would decode from ``encode_image(image, ...)``, without the URL.

    PNG is lossless, so a PNG result is only resized; a JPEG result is encoded and decoded, as the
    model would otherwise see it. ``Encoded`` bytes and ``data:`` URLs are decoded as they are;
    other URLs fail (nothing is downloaded).
    """
    from PIL import Image

    if isinstance(image, Encoded):
        return Image.open(io.BytesIO(image.data)).convert("RGB")
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


def decode_rgb(data: bytes) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of encoded image bytes."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


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
    return "PNG" if _has_alpha(pil) or source_format == "PNG" else "JPEG"


def _has_alpha(pil: Image.Image) -> bool:
    return pil.mode in ("RGBA", "LA", "PA") or "transparency" in pil.info


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
    elif fmt in ("PNG", "WEBP") and pil.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        pil = pil.convert("RGBA")
    return pil


def _encode(pil: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        pil.save(out, format="JPEG", quality=quality)
    elif fmt == "WEBP":
        # method 0: the fastest encoder effort (5-8x faster than the default 4 for a few % more
        # bytes); alpha stays lossless (alpha_quality 100). exact: the colour under transparent
        # pixels is kept (libwebp otherwise replaces it to save bytes, and a model reading the
        # prompt as RGB would see the region on a smeared fill instead of in its context).
        pil.save(out, format="WEBP", quality=quality, method=0, exact=True)
    else:
        pil.save(out, format=fmt, compress_level=1)
    return out.getvalue()
