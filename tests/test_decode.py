"""Decode hygiene on tiny images built in the test: each odd input becomes RGB or a named failure."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import DecodeSettings
from pipelines.decode import InputError, decode, read_bytes
from pipelines.types import ImageRef

SETTINGS = DecodeSettings()


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _stored(decoded) -> Image.Image:
    image = Image.open(io.BytesIO(decoded.data))
    image.load()
    return image


def _noise_rgb(width: int = 80, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _reason(data: bytes, settings: DecodeSettings = SETTINGS) -> InputError:
    with pytest.raises(InputError) as caught:
        decode(data, settings)
    return caught.value


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 mode "1" PNG whose IHDR claims ``width`` x ``height``.

    Its pixel data is far too short for the claimed size, so a full decode would fail as
    truncated: a decompression_bomb reason shows the size was judged from the header alone.
    """
    data = bytearray(_encode(Image.new("1", (8, 8)), "PNG"))
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = chunk
    data[29:33] = struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


# --------------------------------------------------------------------------- named failures


def test_truncated_jpeg_is_truncated() -> None:
    data = _encode(_noise_rgb(), "JPEG")
    assert _reason(data[: len(data) // 2]).reason == "truncated"


def test_zero_bytes_is_empty_file() -> None:
    assert _reason(b"").reason == "empty_file"


@pytest.mark.parametrize("data", [
    b"this is a caption, not a picture\n" * 20,
    np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
], ids=["text", "random"])
def test_non_image_bytes_are_not_an_image(data: bytes) -> None:
    assert _reason(data).reason == "not_an_image"


def test_header_over_max_pixels_rejected_before_full_decode() -> None:
    error = _reason(_png_claiming(5000, 5000), DecodeSettings(max_pixels=1_000_000))
    assert error.reason == "decompression_bomb"
    assert "5000x5000" in error.detail and "max_pixels" in error.detail


def test_small_max_pixels_rejects_a_real_image() -> None:
    data = _encode(Image.new("RGB", (100, 100), (10, 20, 30)), "PNG")
    assert _reason(data, DecodeSettings(max_side=16, min_side=1, max_pixels=5000)).reason == "decompression_bomb"
    assert decode(data, DecodeSettings(max_pixels=10_000)).width == 100


def test_pillow_decompression_bomb_error_is_decompression_bomb() -> None:
    # 400M pixels is above Pillow's own hard limit (2 x MAX_IMAGE_PIXELS): Pillow raises inside
    # Image.open, even when decode.max_pixels would allow it.
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    error = _reason(_png_claiming(20000, 20000), DecodeSettings(max_pixels=10**12))
    assert error.reason == "decompression_bomb"


def test_max_pixels_not_overridden_by_pillow_warning_threshold() -> None:
    # 100M pixels lies between Pillow's warning (MAX_IMAGE_PIXELS) and the default max_pixels:
    # the header check passes, so the failure comes from the (too short) pixel data.
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 <= SETTINGS.max_pixels
    assert _reason(_png_claiming(10000, 10000)).reason == "truncated"


# --------------------------------------------------------------------------- modes → RGB


def test_cmyk_jpeg_is_stored_as_rgb() -> None:
    data = _encode(Image.new("CMYK", (64, 64), (255, 0, 0, 0)), "JPEG", quality=95)
    decoded = decode(data, SETTINGS)
    stored = _stored(decoded)
    assert stored.mode == "RGB" and decoded.format == "jpg"
    red, green, blue = stored.getpixel((32, 32))
    assert red < 20 and green > 235 and blue > 235   # pure cyan ink → cyan
    assert decoded.info["source_mode"] == "CMYK"


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (48, 1))
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    decoded = decode(_encode(source, "PNG"), SETTINGS)
    stored = np.asarray(_stored(decoded))
    assert stored.shape == (48, 256, 3)
    row = stored[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0)
    assert len(np.unique(row)) > 200            # clipping would leave almost everything at 255
    assert abs(int(row[128]) - 128) <= 2
    assert decoded.info["source_mode"] == "I;16"


def test_dark_16_bit_image_stays_dark() -> None:
    # Values 0..255 in a 16-bit image are near black; scaling must not depend on the image's max.
    ramp = np.tile(np.arange(256, dtype=np.uint16), (40, 1))
    decoded = decode(_encode(Image.fromarray(ramp), "PNG"), SETTINGS)
    assert np.asarray(_stored(decoded)).max() <= 1


def test_palette_with_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 20, 40))                    # left half opaque red, right half index 0
    decoded = decode(_encode(image, "PNG", transparency=0), SETTINGS)
    stored = _stored(decoded)
    assert stored.mode == "RGB"
    assert stored.getpixel((5, 20)) == (255, 0, 0)
    assert stored.getpixel((35, 20)) == (255, 255, 255)
    assert decoded.info["alpha_flattened"] is True


@pytest.mark.parametrize("mode,opaque,clear,half", [
    ("LA", (0, 255), (0, 0), (0, 128)),
    ("RGBA", (0, 0, 200, 255), (0, 0, 200, 0), (0, 0, 0, 128)),
])
def test_alpha_is_composited_over_white(mode, opaque, clear, half) -> None:
    image = Image.new(mode, (48, 48), opaque)
    image.paste(clear, (0, 0, 16, 48))
    image.paste(half, (16, 0, 32, 48))
    decoded = decode(_encode(image, "PNG"), SETTINGS)
    stored = _stored(decoded)
    assert stored.mode == "RGB"
    assert stored.getpixel((8, 8)) == (255, 255, 255)
    assert all(abs(v - 127) <= 2 for v in stored.getpixel((24, 8)))
    expected = (0, 0, 0) if mode == "LA" else (0, 0, 200)
    assert stored.getpixel((40, 8)) == expected
    assert decoded.info["alpha_flattened"] is True


def test_greyscale_becomes_rgb() -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1)), mode="L")
    decoded = decode(_encode(grey, "PNG"), SETTINGS)
    stored = np.asarray(_stored(decoded))
    assert stored.shape == (40, 64, 3)
    assert np.array_equal(stored[..., 0], np.asarray(grey))
    assert np.array_equal(stored[..., 0], stored[..., 1]) and np.array_equal(stored[..., 1], stored[..., 2])
    assert "alpha_flattened" not in decoded.info


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (80, 40), (0, 0, 230))
    image.paste((230, 0, 0), (0, 0, 40, 40))          # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                  # display rotated 90° clockwise
    data = _encode(image, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode(data, SETTINGS)
    stored = _stored(decoded)
    assert (decoded.width, decoded.height) == (40, 80) == stored.size
    assert decoded.info["exif_transposed"] is True
    assert (decoded.info["original_width"], decoded.info["original_height"]) == (40, 80)
    top, bottom = stored.getpixel((20, 10)), stored.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 50              # the left side is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    assert decoded.data != data


def test_animated_gif_keeps_first_frame() -> None:
    frames = [Image.new("RGB", (48, 48), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode(data, SETTINGS)
    assert decoded.info["animated"] is True
    assert _stored(decoded).getpixel((24, 24)) == (255, 0, 0)
    assert (decoded.width, decoded.height) == (48, 48)


# --------------------------------------------------------------------------- size rules


@pytest.mark.parametrize("size,settings,reason", [
    ((20, 100), DecodeSettings(min_side=32), "too_small"),
    ((400, 40), DecodeSettings(min_side=32, max_aspect=8.0), "bad_aspect"),
    ((40, 400), DecodeSettings(min_side=32, max_aspect=8.0), "bad_aspect"),
])
def test_size_limits(size, settings, reason) -> None:
    assert _reason(_encode(Image.new("RGB", size, (1, 2, 3)), "PNG"), settings).reason == reason


def test_aspect_at_the_limit_passes() -> None:
    decoded = decode(_encode(Image.new("RGB", (320, 40)), "PNG"), DecodeSettings(max_aspect=8.0))
    assert (decoded.width, decoded.height) == (320, 40)


def test_long_side_above_max_side_is_resized() -> None:
    data = _encode(_noise_rgb(300, 150), "PNG")
    decoded = decode(data, DecodeSettings(max_side=100, min_side=16))
    assert (decoded.width, decoded.height) == (100, 50) == _stored(decoded).size
    assert (decoded.info["original_width"], decoded.info["original_height"]) == (300, 150)
    assert decoded.format == "png"


def test_resized_jpeg_stays_jpeg() -> None:
    decoded = decode(_encode(_noise_rgb(200, 100), "JPEG"), DecodeSettings(max_side=64, min_side=16))
    stored = _stored(decoded)
    assert decoded.format == "jpg" and stored.format == "JPEG" and stored.size == (64, 32)


def _smooth_rgb(width: int, height: int) -> Image.Image:
    """A photo-like image (gradients and blocks) whose downscales are comparable pixel by pixel."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 97 + yy // 89) % 2) * 200], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_result(
        orientation: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG 4× the stored size is decoded at 1/4 scale (JPEG draft mode): the stored size and the
    recorded original size are those of a full decode, and the pixels nearly equal."""
    from pipelines import decode as decode_module

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_smooth_rgb(1600, 1200), "JPEG", quality=95, exif=exif.tobytes())
    settings = DecodeSettings(max_side=400)
    reduced = decode(data, settings)
    monkeypatch.setattr(decode_module, "_draft", lambda image, max_side: None)
    full = decode(data, settings)
    size = (400, 300) if orientation == 1 else (300, 400)
    for decoded in (reduced, full):
        assert (decoded.width, decoded.height) == size == _stored(decoded).size
        assert (decoded.info["original_width"], decoded.info["original_height"]) == (size[0] * 4, size[1] * 4)
    assert reduced.data != full.data
    diff = np.abs(np.asarray(_stored(reduced), np.int16) - np.asarray(_stored(full), np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))


def test_resample_filter_is_a_setting() -> None:
    data = _encode(_noise_rgb(300, 150), "PNG")
    area = _stored(decode(data, DecodeSettings(max_side=100, min_side=16)))
    lanczos = _stored(decode(data, DecodeSettings(max_side=100, min_side=16, resample="lanczos")))
    source = np.asarray(Image.open(io.BytesIO(data)), np.float64)
    block_mean = source.reshape(50, 3, 100, 3, 3).mean(axis=(1, 3))     # a 3×3 area average
    assert np.abs(np.asarray(area, np.float64) - block_mean).max() <= 1.0
    assert area.tobytes() != lanczos.tobytes()
    from settings import ConfigError

    with pytest.raises(ConfigError, match="resample"):
        DecodeSettings(resample="nearest").check()


# --------------------------------------------------------------------------- stored bytes


def test_unchanged_rgb_jpeg_keeps_original_bytes() -> None:
    data = _encode(_noise_rgb(), "JPEG", quality=90)
    decoded = decode(data, SETTINGS)
    assert decoded.data == data
    assert (decoded.format, decoded.width, decoded.height) == ("jpg", 80, 64)


@pytest.mark.parametrize("make", [
    lambda: _encode(Image.new("CMYK", (64, 64), (10, 200, 30, 5)), "JPEG"),
    lambda: _encode(_noise_rgb(300, 200).convert("RGBA"), "PNG"),
    lambda: _encode(_noise_rgb(300, 200), "JPEG"),
], ids=["cmyk-jpeg", "rgba-png", "resized-jpeg"])
def test_output_bytes_are_deterministic(make) -> None:
    settings = DecodeSettings(max_side=128)
    first, second = decode(make(), settings), decode(make(), settings)
    assert first.data == second.data
    assert first.info == second.info


# --------------------------------------------------------------------------- read_bytes


def test_read_bytes_file(tmp_path: Path) -> None:
    data = _encode(_noise_rgb(), "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(data)
    ref = ImageRef("img", str(path), {"kind": "file", "path": str(path)})
    assert read_bytes(ref, 10**6) == (data, None)


def test_read_bytes_tar_member_by_offset(tmp_path: Path) -> None:
    members = {"a.png": _encode(_noise_rgb(seed=1), "PNG"), "b.jpg": _encode(_noise_rgb(seed=2), "JPEG")}
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as tar:
        infos = {info.name: info for info in tar}
    for name, payload in members.items():
        loader = {"kind": "tar", "path": str(path), "offset": infos[name].offset_data,
                  "size": infos[name].size}
        data, truth = read_bytes(ImageRef(name, f"{path}#{name}", loader), 10**6)
        assert data == payload and truth is None
    big = infos["b.jpg"]
    ref = ImageRef("b", f"{path}#b.jpg", {"kind": "tar", "path": str(path), "offset": big.offset_data,
                                          "size": big.size})
    with pytest.raises(InputError) as caught:
        read_bytes(ref, big.size - 1)
    assert caught.value.reason == "too_large"


def test_read_bytes_synthetic_gives_png_and_ground_truth() -> None:
    ref = ImageRef("s", "synthetic://7/2?size=64", {"kind": "synthetic", "seed": 7, "index": 2, "size": 64})
    data, truth = read_bytes(ref, 10**6)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert isinstance(truth, list) and truth
    assert read_bytes(ref, 10**6)[0] == data


def test_read_bytes_missing_file_is_read_error(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.png")
    with pytest.raises(InputError) as caught:
        read_bytes(ImageRef("gone", path, {"kind": "file", "path": path}), 10**6)
    assert caught.value.reason == "read_error"


def test_read_bytes_over_max_bytes_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * 1001)
    ref = ImageRef("big", str(path), {"kind": "file", "path": str(path)})
    with pytest.raises(InputError) as caught:
        read_bytes(ref, 1000)
    assert caught.value.reason == "too_large"
    assert read_bytes(ref, 1001)[0] == b"\0" * 1001


@pytest.mark.parametrize("fmt, size", [("JPEG", (80, 64)), ("PNG", (80, 64)), ("PNG", (300, 150)),
                                       ("JPEG", (300, 150))])
def test_pixels_handed_on_are_those_of_the_stored_bytes(fmt: str, size: tuple[int, int]) -> None:
    """Later stages use the decoded pixels without decoding the stored image again only when
    they are exactly its pixels (kept JPEG bytes, lossless PNG); a re-encoded JPEG hands on none."""
    decoded = decode(_encode(_noise_rgb(*size), fmt), DecodeSettings(max_side=128, min_side=16))
    if decoded.pixels is None:
        assert fmt == "JPEG" and decoded.data[:2] == b"\xff\xd8" and size[0] > 128
    else:
        np.testing.assert_array_equal(decoded.pixels, np.asarray(_stored(decoded).convert("RGB")))


# --------------------------------------------------------------------------- garbage after a valid header


def _garbage_after_header(data: bytes, seed: int) -> bytes:
    """A valid JPEG's header up to its first scan, then 4000 random bytes."""
    sos = data.index(b"\xff\xda")
    end = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    return data[:end] + np.random.default_rng(seed).integers(0, 256, 4000, dtype=np.uint8).tobytes()


def test_garbage_after_a_valid_jpeg_header_is_corrupt() -> None:
    """libjpeg decodes some such files without an error (it ends the scan at a marker-like byte
    pair and fills grey); none of these may become a record."""
    header = _encode(_noise_rgb(), "JPEG")
    reasons = {_reason(_garbage_after_header(header, seed)).reason for seed in range(40)}
    assert reasons == {"corrupt"}


def test_garbage_pixel_data_in_a_png_is_corrupt_not_truncated() -> None:
    data = _encode(_noise_rgb(), "PNG")
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    chunk = b"IDAT" + np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    bad = data[:idat] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[idat + 4 + length + 4:]
    assert _reason(bad).reason == "corrupt"


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_blocks": 2}, {"exif": 1}],
                         ids=["baseline", "progressive", "restarts", "exif"])
def test_sound_jpegs_pass_the_scan_check(options) -> None:
    if "exif" in options:
        exif = Image.Exif()
        exif[0x0112] = options["exif"]
        options = {"exif": exif.tobytes()}
    data = _encode(_noise_rgb(200, 120), "JPEG", **options)
    assert decode(data, SETTINGS).width == 200


def test_a_tar_member_cut_short_is_truncated(tmp_path: Path) -> None:
    payload = _encode(_noise_rgb(), "PNG")
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(path.read_bytes()[: 512 + 100])
    loader = {"kind": "tar", "path": str(path), "offset": 512, "size": len(payload)}
    ref = ImageRef("a", f"{path}#a.png", loader)
    with pytest.raises(InputError) as caught:
        read_bytes(ref, 10**6)
    assert caught.value.reason == "truncated" and "100 of" in caught.value.detail
