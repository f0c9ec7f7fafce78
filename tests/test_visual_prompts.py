"""Property tests of the visual prompts on small random images, masks and boxes.

Seeded random loops: every case is reproducible from its seed, and the whole file runs in well
under a few seconds.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from annotators.caption import visual_prompts as vp
from annotators.caption.backends.images import (
    ImageOptions,
    decode_image,
    encode_image,
    fit_pixels,
    fit_to_pixels,
    prepare_image,
)
from annotators.caption.visual_prompts import (
    GREY,
    RED,
    VISUAL_PROMPTS,
    ImagePrompts,
    auto_line_width,
    box_bounds,
    contour_mask,
    crop_box,
    crop_with_offset,
    region_mask,
    render,
    render_with_offset,
    spec_provenance,
    to_png,
)
from settings import ConfigError

REPO = Path(__file__).resolve().parents[1]
SEEDS = range(40)
MASK_KINDS = ["contour", "crop_masked", "highlight", "alpha"]
FULL3 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- case generation


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise image with values 1..254, so dimming always shows and no pixel is pure red."""
    return rng.integers(1, 255, size=(height, width, 3), dtype=np.uint8)


def random_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Union of a few random ellipses and rectangles (possibly touching the image border)."""
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(1.5, height / 2 + 1), rng.uniform(1.5, width / 2 + 1)
        if rng.random() < 0.5:
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask |= (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    if not mask.any():
        mask[height // 2, width // 2] = True
    return mask


def tight_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of the mask with integer pixel edges (pycocotools convention)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()),
            float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def random_bbox(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """Fractional box that overlaps the image, sometimes sticking out of it."""
    x = rng.uniform(-width / 3, width - 1)
    y = rng.uniform(-height / 3, height - 1)
    w = rng.uniform(0.0, width)
    h = rng.uniform(0.0, height)
    return [x, y, max(w, 1.0 - x) if x < 0 else w, max(h, 1.0 - y) if y < 0 else h]


def case(seed: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A random image (6..40 px per side), a region mask on it and the mask's bbox."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(6, 41, size=2))
    mask = random_mask(rng, height, width)
    return random_image(rng, height, width), mask, tight_bbox(mask)


def pixels(img: Image.Image) -> np.ndarray:
    """The image's pixels as an array, for exact comparisons."""
    return np.asarray(img)


# --------------------------------------------------------------------------- highlight


@pytest.mark.parametrize("seed", SEEDS)
def test_highlight_keeps_inside_and_dims_outside(seed: int) -> None:
    image, mask, bbox = case(seed)
    dim = float(np.random.default_rng(seed).uniform(0.1, 1.0))
    out = render("highlight", image, mask, bbox, dim=dim)
    assert out.mode == "RGB" and out.size == (image.shape[1], image.shape[0])
    arr = pixels(out)
    assert np.array_equal(arr[mask], image[mask])
    assert np.all(arr[~mask] < image[~mask])
    assert np.all(arr[~mask] <= np.floor(image[~mask] * (1 - dim)))


def test_highlight_blur_only_changes_outside() -> None:
    for seed in range(10):
        image, mask, bbox = case(seed)
        arr = pixels(render("highlight", image, mask, bbox, dim=0.0, blur=1.5))
        assert np.array_equal(arr[mask], image[mask])
        if (~mask).sum() >= 10:
            assert np.mean(np.any(arr[~mask] != image[~mask], axis=-1)) > 0.5


# --------------------------------------------------------------------------- contour


@pytest.mark.parametrize("seed", SEEDS)
def test_contour_mask_is_inner_band_covering_the_boundary(seed: int) -> None:
    _, mask, _ = case(seed)
    width = seed % 4 + 1
    drawn = contour_mask(mask, width)
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    within = mask & ~ndimage.binary_erosion(mask, FULL3, iterations=width, border_value=0)
    assert not np.any(drawn & ~mask), "contour pixel outside the mask"
    assert np.all(drawn[boundary]), "boundary pixel not drawn"
    assert not np.any(drawn & ~within), "contour pixel farther than width from the boundary"


def test_contour_width_one_is_the_morphological_boundary() -> None:
    for seed in SEEDS:
        _, mask, _ = case(seed)
        boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
        assert np.array_equal(contour_mask(mask, 1), boundary)


@pytest.mark.parametrize("seed", SEEDS[:15])
def test_contour_paints_exactly_the_contour(seed: int) -> None:
    image, mask, bbox = case(seed)
    color = (0, 255, 0)
    arr = pixels(render("contour", image, mask, bbox, color=color, width=2))
    drawn = contour_mask(mask, 2)
    assert np.all(arr[drawn] == color)
    assert np.array_equal(arr[~drawn], image[~drawn])


# --------------------------------------------------------------------------- box


@pytest.mark.parametrize("seed", SEEDS)
def test_box_outline_lies_on_the_box_edges(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(6, 41, size=2))
    image = random_image(rng, height, width)
    bbox = random_bbox(rng, height, width)
    line = int(rng.integers(1, 4))
    arr = pixels(render("box", image, None, bbox, width=line))
    x0, y0, x1, y1 = box_bounds(bbox, height, width)
    yy, xx = np.mgrid[:height, :width]
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    edge_dist = np.minimum.reduce([xx - x0, x1 - 1 - xx, yy - y0, y1 - 1 - yy])
    band = inside & (edge_dist < line)
    assert np.all(arr[band] == RED)
    assert np.array_equal(arr[~band], image[~band])
    # the box's outermost rows and columns are all drawn
    assert np.all(arr[y0, x0:x1] == RED) and np.all(arr[y1 - 1, x0:x1] == RED)
    assert np.all(arr[y0:y1, x0] == RED) and np.all(arr[y0:y1, x1 - 1] == RED)


def test_box_ignores_mask_and_default_width_scales() -> None:
    image, mask, bbox = case(3)
    assert np.array_equal(pixels(render("box", image, mask, bbox)),
                          pixels(render("box", image, None, bbox)))
    assert auto_line_width(16, 16) >= 1
    sizes = [64, 256, 1024, 4096]
    widths = [auto_line_width(s, s) for s in sizes]
    assert widths == sorted(widths) and widths[-1] > widths[0]
    big = np.zeros((40, 1200, 3), dtype=np.uint8)
    arr = pixels(render("box", big, None, [100.0, 5.0, 400.0, 30.0]))
    assert int(np.sum(arr[20, 100:500, 0] == 255)) == 2 * auto_line_width(40, 1200)


def test_box_pixel_convention() -> None:
    assert box_bounds([2.0, 3.0, 4.0, 5.0], 20, 20) == (2, 3, 6, 8)
    assert box_bounds([2.5, 3.5, 1.0, 1.0], 20, 20) == (2, 3, 4, 5)
    assert box_bounds([2.2, 3.2, 0.0, 0.0], 20, 20) == (2, 3, 3, 4)
    assert box_bounds([-5.0, -5.0, 100.0, 100.0], 20, 10) == (0, 0, 10, 20)


# --------------------------------------------------------------------------- crops


@pytest.mark.parametrize("seed", SEEDS)
def test_crop_contains_bbox_and_respects_borders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(6, 41, size=2))
    image = random_image(rng, height, width)
    bbox = random_bbox(rng, height, width)
    margin, min_margin = float(rng.uniform(0, 0.5)), int(rng.integers(0, 8))
    img, (ox, oy) = crop_with_offset(image, bbox, margin=margin, min_margin=min_margin)
    cw, ch = img.size
    assert 0 <= ox and 0 <= oy and ox + cw <= width and oy + ch <= height
    bx0, by0, bx1, by1 = box_bounds(bbox, height, width)
    # box corners mapped into the crop with the offset land inside it
    assert 0 <= bx0 - ox and bx1 - ox <= cw and 0 <= by0 - oy and by1 - oy <= ch
    # margins: at least min_margin of context on each side unless the image ends first
    assert ox <= max(0, bx0 - min_margin) and oy <= max(0, by0 - min_margin)
    assert ox + cw >= min(width, bx1 + min_margin) and oy + ch >= min(height, by1 + min_margin)
    assert np.array_equal(pixels(img), image[oy:oy + ch, ox:ox + cw])
    same, offset = render_with_offset("crop", image, None, bbox,
                                      margin=margin, min_margin=min_margin)
    assert offset == (ox, oy) and np.array_equal(pixels(same), pixels(img))


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_crop_masked_fills_outside_the_mask(seed: int) -> None:
    image, mask, bbox = case(seed)
    fill = (0, 0, 255) if seed % 2 else GREY
    params = {"fill": list(fill)} if seed % 2 else {}
    img, (ox, oy) = render_with_offset("crop_masked", image, mask, bbox, min_margin=3, **params)
    arr = pixels(img)
    ch, cw = arr.shape[:2]
    x0, y0, x1, y1 = crop_box(bbox, *mask.shape, 0.25, 3)
    assert (ox, oy, ox + cw, oy + ch) == (x0, y0, x1, y1)
    sub_mask, sub_image = mask[oy:oy + ch, ox:ox + cw], image[oy:oy + ch, ox:ox + cw]
    assert np.all(arr[~sub_mask] == fill)
    assert np.array_equal(arr[sub_mask], sub_image[sub_mask])
    assert sub_mask.sum() == mask.sum(), "crop lost part of the mask"


@pytest.mark.parametrize("seed", SEEDS[:20])
def test_alpha_channel_is_the_mask(seed: int) -> None:
    image, mask, bbox = case(seed)
    whole = render("alpha", image, mask, bbox, crop=False)
    assert whole.mode == "RGBA" and whole.size == (image.shape[1], image.shape[0])
    arr = pixels(whole)
    assert np.array_equal(arr[..., 3], np.where(mask, 255, 0))
    assert np.array_equal(arr[..., :3], image)
    img, (ox, oy) = render_with_offset("alpha", image, mask, bbox)
    sub = pixels(img)
    ch, cw = sub.shape[:2]
    assert np.array_equal(sub[..., 3], np.where(mask[oy:oy + ch, ox:ox + cw], 255, 0))
    assert np.array_equal(sub[..., :3], image[oy:oy + ch, ox:ox + cw])


# --------------------------------------------------------------------------- fallback, purity


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_box_only_regions_use_the_box_rectangle(kind: str) -> None:
    for seed in range(8):
        rng = np.random.default_rng(seed)
        height, width = (int(v) for v in rng.integers(6, 41, size=2))
        image = random_image(rng, height, width)
        bbox = random_bbox(rng, height, width)
        rect = region_mask(None, bbox, height, width)
        x0, y0, x1, y1 = box_bounds(bbox, height, width)
        assert rect.sum() == (x1 - x0) * (y1 - y0) and rect[y0:y1, x0:x1].all()
        assert np.array_equal(pixels(render(kind, image, None, bbox)),
                              pixels(render(kind, image, rect, bbox)))


@pytest.mark.parametrize("kind", sorted(VISUAL_PROMPTS))
def test_every_kind_is_pure_and_returns_a_pil_image(kind: str) -> None:
    image, mask, bbox = case(7)
    image_before, mask_before = image.copy(), mask.copy()
    first = render(kind, image, mask, bbox)
    second = render(kind, image, mask, bbox)
    assert isinstance(first, Image.Image)
    assert first.mode == ("RGBA" if kind == "alpha" else "RGB")
    assert np.array_equal(image, image_before) and np.array_equal(mask, mask_before)
    assert to_png(first) == to_png(second)


def test_region_and_bbox_input_errors() -> None:
    image, mask, bbox = case(1)
    with pytest.raises(ValueError, match="mask shape"):
        render("contour", image, mask[:-1], bbox)
    with pytest.raises(ValueError, match="outside"):
        render("crop", image, None, [1000.0, 1000.0, 5.0, 5.0])
    for bad in ([1.0, 2.0, 3.0], [0.0, 0.0, -1.0, 2.0], [0.0, float("nan"), 1.0, 1.0]):
        with pytest.raises(ValueError, match="bbox"):
            render("box", image, None, bad)
    with pytest.raises(ValueError, match="uint8"):
        render("box", image.astype(np.float32), None, bbox)


# --------------------------------------------------------------------------- registry, params


def test_unknown_kind_names_it_and_lists_the_valid_ones() -> None:
    image, mask, bbox = case(0)
    with pytest.raises(ConfigError) as err:
        render("outline", image, mask, bbox)
    assert "'outline'" in str(err.value)
    assert all(kind in str(err.value) for kind in VISUAL_PROMPTS)


def test_unknown_param_names_it_and_lists_the_valid_ones() -> None:
    image, mask, bbox = case(0)
    with pytest.raises(ConfigError) as err:
        render("highlight", image, mask, bbox, dimm=0.3)
    message = str(err.value)
    assert "visual_prompt.highlight.dimm" in message and "'dim'" in message
    assert "dim" in message and "blur" in message
    with pytest.raises(ConfigError, match="valid: color, width"):
        render("box", image, mask, bbox, fill=[0, 0, 0])


@pytest.mark.parametrize("kind, params", [
    ("highlight", {"dim": 1.5}),
    ("highlight", {"dim": 0.0, "blur": 0.0}),
    ("highlight", {"blur": -1.0}),
    ("box", {"width": 0}),
    ("box", {"width": 2.5}),
    ("box", {"color": "not-a-colour"}),
    ("contour", {"color": [255, 0]}),
    ("crop", {"margin": float("inf")}),
    ("crop", {"min_margin": -1}),
    ("crop_masked", {"fill": [0, 0, 300]}),
    ("alpha", {"crop": "yes"}),
])
def test_bad_param_values_raise_config_error(kind: str, params: dict) -> None:
    image, mask, bbox = case(0)
    name = next(iter(params))
    with pytest.raises(ConfigError, match=f"visual_prompt.{kind}"):
        render(kind, image, mask, bbox, **params)
    with pytest.raises(ConfigError, match=kind if len(params) > 1 else name):
        spec_provenance(kind, params)


def test_colour_names_are_accepted() -> None:
    image, mask, bbox = case(2)
    assert np.array_equal(pixels(render("contour", image, mask, bbox, color="red")),
                          pixels(render("contour", image, mask, bbox, color=[255, 0, 0])))


def test_spec_provenance_fills_defaults() -> None:
    spec = spec_provenance("crop_masked", {"margin": 0.5})
    assert spec["kind"] == "crop_masked"
    assert spec["params"] == {"margin": 0.5, "min_margin": 16, "fill": [128, 128, 128]}
    assert spec_provenance("box")["params"] == {"color": [255, 0, 0], "width": None}
    assert spec_provenance("box", {"color": "blue"})["params"]["color"] == [0, 0, 255]
    for kind in VISUAL_PROMPTS:
        spec = spec_provenance(kind)
        assert json.loads(json.dumps(spec)) == spec
        assert set(spec["params"]) == set(spec_provenance(kind, spec["params"])["params"])
    with pytest.raises(ConfigError, match="'nope'"):
        spec_provenance("nope", {})


# The defaults the kinds' docstrings give (RED / GREY, margin 0.25 of the box but at least 16 px,
# half dimming, no blur, alpha cropped, width None = auto_line_width).
DOCUMENTED_DEFAULTS = {
    "box": {"color": [255, 0, 0], "width": None},
    "contour": {"color": [255, 0, 0], "width": None},
    "crop": {"margin": 0.25, "min_margin": 16},
    "crop_masked": {"margin": 0.25, "min_margin": 16, "fill": [128, 128, 128]},
    "highlight": {"dim": 0.5, "blur": 0.0},
    "alpha": {"crop": True, "margin": 0.25, "min_margin": 16},
}
# One value per parameter, each of which changes the render of ``region_case`` on its own.
NON_DEFAULT = {
    "box": {"color": [0, 0, 255], "width": 5},
    "contour": {"color": "lime", "width": 4},
    "crop": {"margin": 1.5, "min_margin": 2},
    "crop_masked": {"margin": 1.5, "min_margin": 2, "fill": [0, 0, 0]},
    "highlight": {"dim": 0.9, "blur": 2.0},
    "alpha": {"crop": False, "margin": 1.5, "min_margin": 2},
}


def region_case() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A 120x100 noise image with a 20x16 blob in the middle, far from every border."""
    rng = np.random.default_rng(11)
    image = random_image(rng, 100, 120)
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:56, 50:70] = True
    mask[40:44, 50:54] = False
    return image, mask, tight_bbox(mask)


def test_defaults_are_the_documented_ones() -> None:
    assert set(DOCUMENTED_DEFAULTS) == set(VISUAL_PROMPTS) == set(NON_DEFAULT)
    image, mask, bbox = region_case()
    for kind, params in DOCUMENTED_DEFAULTS.items():
        assert spec_provenance(kind)["params"] == params, kind
        assert to_png(render(kind, image, mask, bbox)) == \
            to_png(render(kind, image, mask, bbox, **params)), kind
    # and they do what the documentation says, on pixels
    x0, y0, x1, y1 = box_bounds(bbox, *mask.shape)
    assert pixels(render("box", image, None, bbox))[y0, x0:x1].tolist() == [list(RED)] * (x1 - x0)
    faded = pixels(render("highlight", image, mask, bbox))
    assert np.array_equal(faded[~mask], np.floor(image[~mask] * 0.5).astype(np.uint8))
    assert render("crop", image, mask, bbox).size == (x1 - x0 + 32, y1 - y0 + 32)  # 16 px a side
    assert render("alpha", image, mask, bbox).size == (x1 - x0 + 32, y1 - y0 + 32)


@pytest.mark.parametrize("kind", sorted(VISUAL_PROMPTS))
def test_params_change_the_render_and_their_provenance_reproduces_it(kind: str) -> None:
    image, mask, bbox = region_case()
    default = to_png(render(kind, image, mask, bbox))
    for name, value in NON_DEFAULT[kind].items():
        assert to_png(render(kind, image, mask, bbox, **{name: value})) != default, name
    custom = to_png(render(kind, image, mask, bbox, **NON_DEFAULT[kind]))
    recorded = json.loads(json.dumps(spec_provenance(kind, NON_DEFAULT[kind])))["params"]
    assert to_png(render(kind, image, mask, bbox, **recorded)) == custom


# --------------------------------------------------------------------------- encoding, sizing


def test_to_png_is_deterministic_and_lossless() -> None:
    for seed in range(5):
        image, mask, bbox = case(seed)
        for kind in ("highlight", "alpha"):
            img = render(kind, image, mask, bbox)
            twin = Image.frombytes(img.mode, img.size, img.tobytes())
            twin.info["dpi"] = (300, 300)
            twin.info["icc_profile"] = b"not a real profile"
            twin.info["comment"] = "metadata must not change the bytes"
            data = to_png(img)
            assert data == to_png(img) == to_png(twin)
            assert data.startswith(b"\x89PNG")
            back = Image.open(io.BytesIO(data))
            assert back.mode == img.mode and np.array_equal(pixels(back), pixels(img))


def test_fit_pixels_keeps_within_budget_and_aspect() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(1, 300, size=2))
        budget = int(rng.integers(1, 20000))
        img = Image.new("RGB", (width, height), (10, 20, 30))
        out = fit_pixels(img, budget)
        new_w, new_h = out.size
        assert new_w >= 1 and new_h >= 1 and new_w * new_h <= budget
        if width * height <= budget:
            assert out.size == img.size
        else:
            assert new_w <= width and new_h <= height
            if min(new_w, new_h) >= 10:
                assert abs(new_w / new_h - width / height) / (width / height) < 0.2
                assert new_w * new_h >= 0.7 * budget
    assert fit_pixels(Image.new("RGBA", (1000, 1)), 10).size == (10, 1)
    assert fit_pixels(Image.new("RGB", (1, 1000)), 10).size == (1, 10)
    with pytest.raises(ValueError, match="max_pixels"):
        fit_pixels(Image.new("RGB", (4, 4)), 0)


# --------------------------------------------------------------------------- as sent to a model
# ImagePrompts draws at the backend's pixel budget and encodes; PNG keeps pixels exact.


def sent(prompts: ImagePrompts, kind: str, mask: np.ndarray | None, bbox: list[float],
         **params: object) -> np.ndarray:
    """The decoded pixels of a prompt as sent."""
    encoded = prompts.prompt(kind, mask, bbox, params)
    img = Image.open(io.BytesIO(encoded.data))
    assert img.format == encoded.format and img.size == encoded.size
    return pixels(img)


def nearest(mask: np.ndarray, window: tuple[int, int, int, int],
            size: tuple[int, int]) -> np.ndarray:
    """``mask[window]`` resized to ``size`` (w, h) by sampling at the new pixels' centres."""
    x0, y0, x1, y1 = window
    rows = y0 + np.floor((np.arange(size[1]) + 0.5) * (y1 - y0) / size[1]).astype(int)
    cols = x0 + np.floor((np.arange(size[0]) + 0.5) * (x1 - x0) / size[0]).astype(int)
    return mask[np.ix_(rows, cols)]


def png_options(max_pixels: int) -> ImageOptions:
    return ImageOptions(max_pixels=max_pixels, prompt_format="png")


def big_case() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A 240x160 noise image with an elliptical region."""
    rng = np.random.default_rng(5)
    image = random_image(rng, 160, 240)
    yy, xx = np.mgrid[:160, :240]
    mask = ((yy - 70) / 30.0) ** 2 + ((xx - 130) / 50.0) ** 2 <= 1
    return image, mask, tight_bbox(mask)


@pytest.mark.parametrize("kind", sorted(VISUAL_PROMPTS))
def test_within_budget_the_sent_prompt_is_the_stored_size_render(kind: str) -> None:
    image, mask, bbox = big_case()
    prompts = ImagePrompts(image, png_options(image.shape[0] * image.shape[1]))
    expected = pixels(render(kind, image, mask, bbox))
    if kind == "alpha":     # an alpha prompt gets a share of the budget: compare unbudgeted
        share = ImageOptions.ALPHA_BUDGET_SHARE
        prompts = ImagePrompts(image, png_options(share * image.shape[0] * image.shape[1]))
    assert np.array_equal(sent(prompts, kind, mask, bbox), expected)


def test_box_lands_at_the_scaled_coordinates() -> None:
    image = random_image(np.random.default_rng(1), 100, 200)
    prompts = ImagePrompts(image, png_options(5000))          # 200x100 -> 100x50
    arr = sent(prompts, "box", None, [40.0, 20.0, 60.0, 40.0], width=4)
    assert arr.shape == (50, 100, 3)
    x0, y0, x1, y1 = 20, 10, 50, 30                             # the box, halved
    line = 2                                                    # 4 stored pixels, halved
    yy, xx = np.mgrid[:50, :100]
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    band = inside & (np.minimum.reduce([xx - x0, x1 - 1 - xx, yy - y0, y1 - 1 - yy]) < line)
    assert np.all(arr[band] == RED)
    base = np.asarray(Image.fromarray(image).resize((100, 50), Image.Resampling.BOX))
    assert np.array_equal(arr[~band], base[~band])


def test_contour_lands_on_the_resized_mask() -> None:
    image, mask, bbox = big_case()
    prompts = ImagePrompts(image, png_options(120 * 80))        # 240x160 -> 120x80
    arr = sent(prompts, "contour", mask, bbox, width=4, color=[0, 255, 0])
    small = nearest(mask, (0, 0, 240, 160), (120, 80))
    drawn = contour_mask(small, 2)
    assert drawn.any() and np.all(arr[drawn] == (0, 255, 0))
    base = prompts.canvas.frame().rgb
    assert np.array_equal(arr[~drawn], base[~drawn])


def test_crop_contains_the_region_and_keeps_stored_detail_within_budget() -> None:
    image, mask, bbox = big_case()
    window = crop_box(bbox, 160, 240)
    x0, y0, x1, y1 = window
    # the whole image is over the budget, the crop is not: the crop keeps its stored pixels
    budget = (x1 - x0) * (y1 - y0)
    prompts = ImagePrompts(image, png_options(budget))
    assert prompts.canvas.frame().rgb.shape[0] < 160
    assert np.array_equal(sent(prompts, "crop", mask, bbox), image[y0:y1, x0:x1])
    # under a smaller budget it is the crop, shrunk, and still shows the whole box
    small = ImagePrompts(image, png_options(budget // 4))
    arr = sent(small, "crop", mask, bbox)
    w, h = fit_to_pixels(x1 - x0, y1 - y0, budget // 4)
    assert arr.shape == (h, w, 3)
    masked = sent(small, "crop_masked", mask, bbox)
    inside = nearest(mask, window, (w, h))
    assert np.all(masked[~inside] == GREY)
    assert np.array_equal(masked[inside], arr[inside])
    bx0, by0, bx1, by1 = box_bounds(bbox, 160, 240)
    assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1


def test_alpha_channel_is_the_resized_mask() -> None:
    image, mask, bbox = big_case()
    window = crop_box(bbox, 160, 240)
    x0, y0, x1, y1 = window
    options = ImageOptions(max_pixels=(x1 - x0) * (y1 - y0))  # alpha: a share of it
    prompts = ImagePrompts(image, options)
    encoded = prompts.prompt("alpha", mask, bbox)
    assert encoded.format == "WEBP"
    img = Image.open(io.BytesIO(encoded.data))
    assert img.mode == "RGBA"
    size = fit_to_pixels(x1 - x0, y1 - y0, options.prompt_max_pixels(alpha=True))
    assert img.size == size and size[0] < x1 - x0
    alpha_channel = pixels(img)[..., 3]
    assert np.array_equal(alpha_channel, np.where(nearest(mask, window, size), 255, 0))
    whole = Image.open(io.BytesIO(prompts.prompt("alpha", mask, bbox, {"crop": False}).data))
    wsize = fit_to_pixels(240, 160, options.prompt_max_pixels(alpha=True))
    assert np.array_equal(pixels(whole)[..., 3],
                          np.where(nearest(mask, (0, 0, 240, 160), wsize), 255, 0))


def test_alpha_prompt_as_webp_keeps_the_context_under_the_transparent_pixels() -> None:
    """The alpha kind sends the context crop with the region as its alpha channel: the colour
    outside the region is the crop's (within WebP's loss), not a fill the encoder chose."""
    yy, xx = np.mgrid[:160, :240]
    image = np.stack([xx, yy + 40, (xx + yy) // 2], -1).astype(np.uint8)   # smooth: little loss
    mask = ((yy - 70) / 30.0) ** 2 + ((xx - 130) / 50.0) ** 2 <= 1
    bbox = tight_bbox(mask)
    prompts = ImagePrompts(image, ImageOptions(max_pixels=10 * 240 * 160))
    encoded = prompts.prompt("alpha", mask, bbox)
    assert encoded.format == "WEBP"
    x0, y0, x1, y1 = crop_box(bbox, 160, 240)
    got = pixels(Image.open(io.BytesIO(encoded.data)))
    assert got.shape == (y1 - y0, x1 - x0, 4)
    outside = got[..., 3] == 0
    assert outside.sum() > 1000
    error = np.abs(got[..., :3].astype(int) - image[y0:y1, x0:x1].astype(int))[outside]
    assert error.mean() < 4 and np.percentile(error, 99) < 16


def test_highlight_keeps_the_region_and_dims_the_rest_at_the_model_size() -> None:
    image, mask, bbox = big_case()
    prompts = ImagePrompts(image, png_options(120 * 80))
    arr = sent(prompts, "highlight", mask, bbox, dim=0.5)
    base = prompts.canvas.frame().rgb
    inside = nearest(mask, (0, 0, 240, 160), (120, 80))
    assert np.array_equal(arr[inside], base[inside])
    assert np.array_equal(arr[~inside], np.floor(base[~inside] * 0.5).astype(np.uint8))


def test_jpeg_prompts_keep_thin_outlines_red_and_are_small() -> None:
    rng = np.random.default_rng(3)
    image = np.asarray(Image.fromarray(random_image(rng, 64, 64)).resize((512, 512)))
    bbox = [101.0, 101.0, 200.0, 150.0]        # odd edges: across chroma blocks
    encoded = ImagePrompts(image).prompt("box", None, bbox)
    assert encoded.format == "JPEG" and encoded.size == (512, 512)
    arr = pixels(Image.open(io.BytesIO(encoded.data))).astype(int)
    line = auto_line_width(512, 512)
    assert line == 2
    for edge in (arr[101:101 + line, 111:291], arr[111:241, 101:101 + line]):
        assert np.all(edge[..., 0] > 220) and np.all(edge[..., 1:] < 40)
    assert len(encoded.data) < len(to_png(render("box", image, None, bbox)))


def test_each_prompt_and_the_whole_image_are_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"decode": 0, "encode": 0, "prepare": 0}
    for name, key in (("decode_rgb", "decode"), ("encode_pixels", "encode"),
                      ("prepare_image", "prepare")):
        original = getattr(vp, name)

        def counted(*args: object, _original=original, _key=key, **kwargs: object) -> object:
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(vp, name, counted)
    image, mask, bbox = big_case()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    prompts = ImagePrompts(buf.getvalue(), ImageOptions(max_pixels=5000))
    wholes = {id(prompts.whole()) for _ in range(5)}
    for region in range(4):
        for _ in range(3):                       # three steps send the same two prompts
            prompts.prompt("contour", mask, bbox, key=(region, "contour"))
            prompts.prompt("crop_masked", mask, bbox, key=(region, "masked"))
    assert len(wholes) == 1
    assert calls == {"decode": 1, "encode": 8, "prepare": 1}


def test_encoded_bytes_are_sent_as_they_are() -> None:
    image, mask, bbox = big_case()
    encoded = ImagePrompts(image).prompt("crop", mask, bbox)
    url = encode_image(encoded, 100)             # a budget it does not fit: still as it is
    assert url == encoded.data_url() and url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == encoded.data
    assert prepare_image(encoded, 100) is encoded
    decoded = decode_image(encoded, 100)
    assert decoded.size == encoded.size and decoded.mode == "RGB"


def test_prompt_encoding_follows_the_settings() -> None:
    assert ImageOptions().prompt_encoding(alpha=False) == ("JPEG", 90)
    assert ImageOptions().prompt_encoding(alpha=True) == ("WEBP", 90)
    assert ImageOptions(prompt_format="webp", prompt_quality=70).prompt_encoding(False) == \
        ("WEBP", 70)
    assert ImageOptions(prompt_format="png").prompt_encoding(alpha=True) == ("PNG", None)
    assert ImageOptions(max_pixels=4096).prompt_provenance(alpha=True) == \
        {"max_pixels": 1024, "format": "webp", "quality": 90}
    image, mask, bbox = big_case()
    for fmt in ("jpeg", "webp", "png"):
        encoded = ImagePrompts(image, ImageOptions(prompt_format=fmt)).prompt("box", mask, bbox)
        assert Image.open(io.BytesIO(encoded.data)).format == fmt.upper()


@pytest.mark.parametrize("field, value", [
    ("prompt_format", "gif"), ("prompt_format", "JPEG"), ("prompt_quality", 0),
    ("prompt_quality", 96), ("prompt_quality", "high"), ("prompt_quality", 85.5),
])
def test_prompt_format_and_quality_are_validated(field: str, value: object) -> None:
    from annotators.caption.backends.openai_api.client import VllmChatClient
    from annotators.caption.backends.transformers_local import LocalClientSettings
    from settings import parse_settings

    with pytest.raises(ConfigError, match=rf"^captioner\.client\.{field}: "):
        VllmChatClient({"model": "m", field: value}, where="captioner.client")
    with pytest.raises(ConfigError, match=rf"^captioner\.{field}: "):
        parse_settings(LocalClientSettings, {"model": "m", field: value}, "captioner")


def test_prompt_bench_smoke_reports_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "prompt_bench.py"), "--smoke",
                    "--json", str(out)], check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert set(report["kinds"]) == set(VISUAL_PROMPTS)
    for kind, row in report["kinds"].items():
        assert row["ms"] > 0 and row["cpu_ms"] > 0 and row["bytes"] > 0, kind
        assert row["request_bytes"] > row["bytes"], kind
    assert report["whole_image_bytes"] > 0 and all(v > 0 for v in report["requests"].values())
