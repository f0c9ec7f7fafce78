"""Boxes and masks given with an input land on the stored image: resize factors, EXIF orientation."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from annotators.segment import masks
from annotators.segment.frame import InputFrame
from pipelines.config import DecodeSettings
from pipelines.decode import decode


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("raw_size, max_side", [((400, 300), 400), ((400, 300), 200), ((400, 300), 100),
                                                ((333, 250), 128)])
def test_raw_frame_boxes_and_masks_follow_the_exif_orientation(orientation: int, raw_size, max_side) -> None:
    """A JPEG whose raw pixels hold a white rectangle, with an EXIF orientation: the rectangle's
    raw-frame box and mask, mapped to the stored image, cover the rectangle in the stored pixels."""
    raw_w, raw_h = raw_size
    x, y, w, h = 60, 40, 120, 90
    pixels = np.zeros((raw_h, raw_w, 3), np.uint8)
    pixels[y:y + h, x:x + w] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    decoded = decode(buffer.getvalue(), DecodeSettings(max_side=max_side, min_side=16))
    stored = np.asarray(Image.open(io.BytesIO(decoded.data)).convert("L")) > 127
    assert decoded.info.get("exif_orientation", 1) == orientation
    given = {"original_size": (decoded.info["original_height"], decoded.info["original_width"]),
             "orientation": decoded.info.get("exif_orientation", 1)}
    frame = InputFrame.of(given, decoded.height, decoded.width)
    raw_mask = np.zeros((raw_h, raw_w), bool)
    raw_mask[y:y + h, x:x + w] = True
    mapped = frame.box([x, y, w, h], "raw")
    truth = _box_of(stored)
    assert all(abs(a - b) <= 1.0 for a, b in zip(mapped, truth)), (mapped, truth)
    mask = masks.decode(frame.mask(masks.encode(raw_mask), "raw"))
    assert mask.shape == stored.shape
    assert (mask != stored).mean() < 0.01
    # "displayed" means the annotation already refers to the upright image: only scaled
    mask_image = Image.fromarray(raw_mask.astype(np.uint8) * 255)
    mask_image.getexif()[0x0112] = orientation
    upright = np.asarray(ImageOps.exif_transpose(mask_image)) > 0
    shown = frame.box(_box_of(upright), "displayed")
    assert all(abs(a - b) <= 1.0 for a, b in zip(shown, truth)), (shown, truth)


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.25, 0.8, 2.0])
def test_boxes_scale_with_the_stored_image(factor: float) -> None:
    frame = InputFrame(width=round(2048 * factor), height=round(1536 * factor), original_width=2048,
                       original_height=1536)
    sx, sy = frame.width / 2048, frame.height / 1536
    assert frame.box([1000, 400, 600, 400]) == pytest.approx([1000 * sx, 400 * sy, 600 * sx, 400 * sy])
    assert frame.box([2000, 1500, 400, 400]) == pytest.approx([2000 * sx, 1500 * sy, 48 * sx, 36 * sy])  # clipped
    assert frame.box([3000, 10, 5, 5]) is None and frame.box([1, 2, 3]) is None
    assert frame.box([10, 10, float("nan"), 4]) is None and frame.box([10, 10, -4, 4]) is None
