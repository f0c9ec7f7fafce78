"""Reading input bytes and decode hygiene: every odd image becomes RGB or a named failure."""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.config import RESAMPLE, DecodeSettings
from pipelines.synthetic import scene_png
from pipelines.types import ImageRef


class InputError(Exception):
    """An input that cannot become a record: ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """A normalized image: encoded bytes of the stored RGB image plus facts about the input."""

    data: bytes
    format: str
    width: int
    height: int
    info: dict[str, Any] = field(default_factory=dict)
    # (H, W, 3) uint8 pixels of ``data`` when they are known exactly without decoding it again
    # (the input's own JPEG bytes, or a lossless PNG); None after a lossy re-encode
    pixels: np.ndarray | None = None


def read_bytes(ref: ImageRef, max_bytes: int) -> tuple[bytes, list[dict[str, Any]] | None]:
    """The input's bytes (and ground truth for synthetic scenes).

    A tar member is read by offset from the tar as stored (never through a decompressor); a member
    whose data the file does not hold to its end (a tar cut short) is ``truncated``."""
    loader = ref.loader
    if loader["kind"] == "synthetic":
        return scene_png(loader["seed"], loader["index"], loader["size"])
    try:
        if loader["kind"] == "tar":
            return _read_member(loader, max_bytes), None
        data = _read_file(loader["path"], max_bytes)
    except InputError:
        raise
    except Exception as exc:  # missing file, permission, network: all are read failures
        raise InputError("read_error", f"{type(exc).__name__}: {exc}") from exc
    if len(data) > max_bytes:
        raise InputError("too_large", f"more than decode.max_bytes={max_bytes} bytes")
    return data, None


def _read_file(path: str, max_bytes: int) -> bytes:
    """A whole file, at most ``max_bytes + 1`` bytes of it. A local path is read directly (no
    filesystem lookup, no buffer of ``max_bytes`` allocated); any other through Beam's
    filesystems, which also undo a compression its name declares."""
    local = "://" not in path and \
        CompressionTypes.detect_compression_type(path) == CompressionTypes.UNCOMPRESSED
    if not local:
        with FileSystems.open(path) as handle:
            return handle.read(max_bytes + 1)
    with open(path, "rb", buffering=0) as handle:
        if os.fstat(handle.fileno()).st_size > max_bytes:   # refused without reading it
            raise InputError("too_large", f"more than decode.max_bytes={max_bytes} bytes")
        return handle.readall()


def _read_member(loader: dict[str, Any], max_bytes: int) -> bytes:
    size = loader["size"]
    if size > max_bytes:
        raise InputError("too_large", f"{size} bytes > decode.max_bytes={max_bytes}")
    with FileSystems.open(loader["path"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.seek(loader["offset"])
        data = handle.read(size)
    if len(data) < size:
        raise InputError("truncated", f"the tar holds {len(data)} of the member's {size} bytes "
                                      f"(it is cut short)")
    return data


def _open(data: bytes, settings: DecodeSettings) -> Image.Image:
    if not data:
        raise InputError("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # decode.max_pixels (checked below) is the limit; Pillow's warning fires at half its
            # own hard limit, so treating it as an error would reject what the settings allow.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InputError("not_an_image", "no image format recognised") from exc
    except Exception as exc:
        raise InputError("not_an_image", f"{type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width * height > settings.max_pixels:   # header only: checked before the full decode
        raise InputError("decompression_bomb",
                         f"{width}x{height} > decode.max_pixels={settings.max_pixels}")
    return image


def _load(image: Image.Image) -> Image.Image:
    """The full decode. ``truncated``: the data ends before the image does; ``corrupt``: the
    decoder rejects the data (Pillow's "broken data stream" is a decoding error — e.g. a valid
    header followed by garbage — not a short file)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise InputError(reason, str(exc)) from exc
    except Exception as exc:
        raise InputError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return image


# The next marker: libjpeg skips stray bytes and 0xFF fill bytes before one (no "\xff+": the
# regex engine then tries every byte, 15x slower on a large JPEG).
_MARKER = re.compile(rb"\xff([^\x00\xff])")
# The end of a scan's entropy-coded data: a marker that is not a stuffed 0xFF00 or a restart.
_SCAN_END = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")
# What may follow a scan: tables, another scan, DNL, comments, application data, the end; the
# standalone TEM and restart markers are skipped, as libjpeg does.
_AFTER_SCAN = frozenset([0x01, 0xC4, 0xCC, *range(0xD0, 0xD8), 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE,
                         *range(0xE0, 0xF0)])


def _jpeg_scan_damage(data: bytes) -> str | None:
    """Where a decoded JPEG's scan data turns out to be garbage, or None.

    libjpeg ends a scan at any marker-like byte pair and fills the rest of the image with grey,
    with a warning Pillow does not surface: a valid header followed by random bytes decodes without
    an error about one time in ten. In a sound file every scan ends at a marker that may follow a
    scan, and so does every segment after it, up to the end-of-image marker, inside the file
    (the header before the first scan is Pillow's to judge)."""
    pos, in_scan, scanned = 2, False, False
    while True:
        found = (_SCAN_END if in_scan else _MARKER).search(data, pos)
        if found is None:
            return "no end-of-image marker after the image data" if scanned else None
        code, at = found.group(1)[0], found.start(1) - 1
        if code == 0xD9:
            return None
        if scanned and code not in _AFTER_SCAN:
            return f"marker 0x{code:02X} at byte {at} inside the image data: the data is not a JPEG scan"
        if code == 0x01 or 0xD0 <= code <= 0xD7:   # no length
            pos, in_scan = at + 2, False
            continue
        pos = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if pos > len(data):
            return f"segment 0x{code:02X} at byte {at} runs past the end of the file" if scanned \
                else None
        in_scan = code == 0xDA
        scanned = scanned or in_scan


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float images: scale to 8 bits instead of clipping."""
    array = np.asarray(image)
    if image.mode == "F":   # float32 throughout: 4 bytes per pixel, not float64's 8
        top = float(np.nanmax(array)) if array.size else 1.0
        scaled = np.clip(np.nan_to_num(array) / np.float32(top if top > 1.0 else 1.0), 0, 1) * np.float32(255)
        grey = np.rint(scaled).astype(np.uint8)
    elif image.mode.startswith("I;16") or array.max(initial=0) > 255:
        # 16 bits (by mode, or by value for 32-bit "I"): round(x / 257) in integers, no float copy
        grey = ((np.clip(array, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    else:
        grey = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
    """Any Pillow mode → RGB. Alpha is composited over white (noted in the info)."""
    info: dict[str, Any] = {"source_mode": image.mode}
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image), info
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
        info["alpha_flattened"] = True
    return (image if image.mode == "RGB" else image.convert("RGB")), info


def stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size of the stored image for an input of ``width`` × ``height`` (after EXIF rotation)."""
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, getattr(Image.Resampling, RESAMPLE[resample]))


def _draft(image: Image.Image, max_side: int) -> None:
    """JPEG: decode at 1/2, 1/4 or 1/8 scale when the stored image is that much smaller (the
    decoder skips the detail; memory and time shrink with the scale). The result stays at least
    the stored size, so the final resize still makes exactly ``stored_size``."""
    width, height = image.size
    if image.format == "JPEG" and max(width, height) >= 2 * max_side:
        image.draft(None, stored_size(width, height, max_side))


def decode(data: bytes, settings: DecodeSettings) -> Decoded:
    """Validate and normalize one input. Raises InputError with a reason on any problem."""
    image = _open(data, settings)
    source_format = (image.format or "").upper()
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        image.seek(0)
    header_size = image.size
    _draft(image, settings.max_side)
    drafted = image.size != header_size
    image = _load(image)
    if source_format in ("JPEG", "MPO"):
        damage = _jpeg_scan_damage(data)
        if damage:
            raise InputError("corrupt", damage)
    info: dict[str, Any] = {}
    # exif_transpose copies the image even when there is nothing to do: ask first
    orientation = _orientation(image)
    transposed = ImageOps.exif_transpose(image) if orientation != 1 else None
    if transposed is not None:
        info["exif_transposed"] = True
        info["exif_orientation"] = orientation
    swapped = transposed is not None and transposed.size != image.size
    image = transposed if transposed is not None else image
    rgb, mode_info = to_rgb(image)
    info.update(mode_info)
    # the input's size (after rotation) even when the JPEG was decoded at a reduced scale
    original = header_size[::-1] if swapped else header_size
    info["original_width"], info["original_height"] = original
    if frames > 1:
        info["animated"] = True
    short, long = min(original), max(original)
    if short < settings.min_side:
        raise InputError("too_small", f"{original[0]}x{original[1]}: shorter side < "
                                      f"decode.min_side={settings.min_side}")
    if long / short > settings.max_aspect:
        raise InputError("bad_aspect", f"{original[0]}x{original[1]}: aspect > "
                                       f"decode.max_aspect={settings.max_aspect}")
    resized = _resize(rgb, stored_size(*original, settings.max_side), settings.resample)
    unchanged = (resized is rgb and not drafted and source_format == "JPEG" and image.mode == "RGB"
                 and not info.get("exif_transposed") and frames == 1)
    if unchanged:   # keep the original JPEG bytes: no second lossy encode
        return Decoded(data, "jpg", rgb.size[0], rgb.size[1], info, np.asarray(rgb))
    lossy = source_format in ("JPEG", "WEBP", "MPO")
    buffer = io.BytesIO()
    if lossy:
        resized.save(buffer, format="JPEG", quality=settings.jpeg_quality, optimize=False)
    else:
        resized.save(buffer, format="PNG", optimize=False)
    return Decoded(buffer.getvalue(), "jpg" if lossy else "png", resized.size[0], resized.size[1], info,
                   None if lossy else np.asarray(resized))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = upright, also when absent or unreadable)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
