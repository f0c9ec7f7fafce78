"""Cost of visual prompts as a model backend gets them: drawn + encoded per region, and bytes.

For every visual prompt kind, on a 1024x1024 photo (scikit-image's bundled astronaut, enlarged,
with a little sensor-like noise so it compresses like a real photograph) stored as JPEG (q95,
as the pipeline keeps JPEG sources) or PNG (``--stored png``), and object-like masks (wavy
blobs) covering 1, 5, 15 and 40 % of the image, given as full boolean masks:

* ``ms`` / ``ms_max``: median / worst wall time per region to draw the prompt and encode it as
  sent; ``cpu_ms``: the median in this thread's CPU time (steadier on a shared machine), and
  ``cpu_ms_by_area`` per region size; ``first_ms``: the first prompt of a kind, which also
  makes what the image's regions share (e.g. the dimmed image of ``highlight``);
* ``image``: what is done once per image: the whole image prepared (``whole_ms``; the stored
  bytes as they are when they fit) and the image decoded and fit (``canvas_ms``);
* ``bytes``: mean encoded prompt size; ``request_bytes``: whole image + prompt, the image
  payload of one region request (before base64); ``requests``: the same for the shipped
  programs' region steps (e.g. ``umg.pixel``: whole image + contour + masked crop);
* ``format`` and ``size`` (the largest): what was sent.

``met`` is true when every region size's median CPU time is within the target.

Modes: ``engine`` (default) is the caption engine's path (``visual_prompts.ImagePrompts``:
drawn at the backend's input size, encoded at the configured format and quality, the whole
image prepared once per image); ``legacy`` is the earlier path, kept for comparison: drawn at
the stored size, PNG-encoded (``to_png``), then fit to the pixel budget by the backend.

    python bench/prompt_bench.py --json /tmp/prompts.json
    python bench/prompt_bench.py --mode legacy --repeat 1
    python bench/prompt_bench.py --max-pixels 802816 --format webp --quality 80
    python bench/prompt_bench.py --smoke --json /tmp/smoke.json

Target (the design's CPU budget): <= 12 ms per prompt, drawn and encoded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from annotators.caption import visual_prompts as vp  # noqa: E402
from annotators.caption.backends import images  # noqa: E402

TARGET_MS = 12.0
SIDE = 1024
AREA_FRACTIONS = (0.01, 0.05, 0.15, 0.40)
SMOKE = {"side": 256, "repeat": 1, "masks": 2}


# --------------------------------------------------------------------------- inputs


def photo(side: int, seed: int = 0) -> np.ndarray:
    """A side x side RGB photograph: the bundled astronaut, resized, with mild noise."""
    from PIL import Image
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)
    rgb = np.asarray(base).astype(np.int16)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, rgb.shape).round().astype(np.int16)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def stored_bytes(rgb: np.ndarray, fmt: str) -> bytes:
    """The image as the pipeline stores it: JPEG q95 or PNG."""
    from PIL import Image

    out = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    else:
        Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def blob(side: int, fraction: float, center: tuple[float, float], seed: int) -> np.ndarray:
    """An object-like mask: a star-shaped blob with a wavy outline covering ``fraction``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    cy, cx = center[0] * side, center[1] * side
    radius = np.sqrt(fraction * side * side / np.pi)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.18 * np.sin(3 * theta + rng.uniform(0, 6.3)) \
        + 0.08 * np.sin(7 * theta + rng.uniform(0, 6.3))
    return np.hypot(yy - cy, xx - cx) <= radius * wobble


def masks(side: int, count: int) -> list[tuple[np.ndarray, list[float]]]:
    """``count`` masks (of ``AREA_FRACTIONS``, cycled) with their tight boxes."""
    centers = [(0.3, 0.35), (0.55, 0.6), (0.5, 0.45), (0.5, 0.5)]
    out = []
    for i in range(count):
        mask = blob(side, AREA_FRACTIONS[i % 4], centers[i % 4], i)
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)]
        out.append((mask, bbox))
    return out


# --------------------------------------------------------------------------- the two paths


def options(args: argparse.Namespace) -> images.ImageOptions:
    """The backend's image settings under test."""
    return images.ImageOptions(max_pixels=args.max_pixels, prompt_format=args.format,
                               prompt_quality=args.quality)


def legacy_whole(data: bytes, args: argparse.Namespace) -> bytes:
    """The whole image as the earlier backend sent it (fit, re-encoded when needed)."""
    return _url_bytes(images.encode_image(data, args.max_pixels, "auto", 90))


def legacy_prompt(rgb: np.ndarray, kind: str, mask: np.ndarray, bbox: list[float],
                  args: argparse.Namespace) -> bytes:
    """Rendered at the stored size, PNG, then fit to the budget by the backend."""
    png = vp.to_png(vp.render(kind, rgb, mask, bbox))
    return _url_bytes(images.encode_image(png, args.max_pixels, "auto", 90))


def _url_bytes(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(";base64,", 1)[1])


def _describe(data: bytes) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    return str(img.format).lower(), img.size


# --------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()`` with its wall and thread-CPU milliseconds."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    out = fn()
    return out, 1000 * (time.perf_counter() - wall0), 1000 * (time.thread_time() - cpu0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every kind over every mask, ``repeat`` times; the report as a dict."""
    rgb = photo(args.side)
    data = stored_bytes(rgb, args.stored)
    regions = masks(args.side, args.masks)
    image: dict[str, Any] = {}
    if args.mode == "engine":
        prompts = vp.ImagePrompts(data, options(args))
        encoded, image["whole_ms"], image["whole_cpu_ms"] = timed(prompts.whole)
        whole = encoded.data
        # decoded and fit to the budget once per image, shared by all its prompts
        _, image["canvas_ms"], image["canvas_cpu_ms"] = timed(lambda: prompts.canvas.frame())
    else:
        whole, image["whole_ms"], image["whole_cpu_ms"] = timed(lambda: legacy_whole(data, args))
        image["canvas_ms"] = image["canvas_cpu_ms"] = 0.0

    def one(kind: str, mask: Any, bbox: list[float]) -> bytes:
        if args.mode == "engine":
            return prompts.prompt(kind, mask, bbox).data
        return legacy_prompt(rgb, kind, mask, bbox, args)

    kinds: dict[str, Any] = {}
    for kind in sorted(vp.VISUAL_PROMPTS):
        # the first prompt of a kind also makes what the image's regions share (a dimmed copy)
        _, first_ms, _ = timed(lambda: one(kind, *regions[0]))
        walls, cpus, sizes, shapes = [], [], [], []
        by_area: dict[float, list[float]] = {}
        for _ in range(args.repeat):
            for i, (mask, bbox) in enumerate(regions):
                blob_bytes, wall, cpu = timed(lambda: one(kind, mask, bbox))
                fmt, size = _describe(blob_bytes)
                walls.append(wall)
                cpus.append(cpu)
                sizes.append(len(blob_bytes))
                shapes.append(size)
                by_area.setdefault(AREA_FRACTIONS[i % 4], []).append(cpu)
        mean_bytes = statistics.fmean(sizes)
        kinds[kind] = {"ms": round(statistics.median(walls), 3),
                       "ms_max": round(max(walls), 3),
                       "cpu_ms": round(statistics.median(cpus), 3),
                       "cpu_ms_max": round(max(cpus), 3),
                       "first_ms": round(first_ms, 3),
                       "bytes": round(mean_bytes),
                       "request_bytes": round(len(whole) + mean_bytes),
                       "format": fmt, "size": list(max(shapes, key=lambda s: s[0] * s[1])),
                       "regions": len(walls),
                       "cpu_ms_by_area": {str(a): round(statistics.median(v), 3)
                                          for a, v in sorted(by_area.items())}}
    # every region size must be within the target, not just the median region
    worst = max(max(k["cpu_ms_by_area"].values()) for k in kinds.values())
    return {"mode": args.mode, "side": args.side, "stored": args.stored,
            "stored_bytes": len(data), "max_pixels": args.max_pixels, "format": args.format,
            "quality": args.quality, "masks": args.masks, "repeat": args.repeat,
            "area_fractions": [AREA_FRACTIONS[i % 4] for i in range(args.masks)],
            "whole_image_bytes": len(whole),
            "image": {k: round(v, 3) for k, v in image.items()},
            "kinds": kinds, "requests": program_requests(len(whole), kinds),
            "target_ms": TARGET_MS, "worst_cpu_ms": worst, "met": worst <= TARGET_MS,
            "environment": environment(args.side)}


def program_requests(whole: int, kinds: dict[str, Any]) -> dict[str, int]:
    """Image bytes of one request of the shipped programs' region steps: the whole image plus
    the prompts the step sends (mean prompt sizes)."""
    steps = {"umg.region": ["box"], "umg.pixel": ["contour", "crop_masked"],
             "longgrit.caption": ["crop"], "longgrit.judge": ["box"]}
    return {name: whole * ("umg" in name or "judge" in name)
            + sum(kinds[k]["bytes"] for k in used) for name, used in steps.items()}


def environment(side: int) -> dict[str, Any]:
    """What the numbers depend on: Python, Pillow (and its codecs), cores, load, and how fast
    this machine is right now: ``reference_jpeg_ms``, the CPU time of a plain JPEG encode (q90,
    Pillow's defaults) of the test photo, to compare runs made under different loads."""
    from PIL import Image, features

    img = Image.fromarray(photo(side))
    times = []
    for _ in range(5):
        out = io.BytesIO()
        _, _, cpu = timed(lambda: img.save(out, format="JPEG", quality=90))
        times.append(cpu)
    return {"python": platform.python_version(), "pillow": metadata.version("pillow"),
            "numpy": np.__version__, "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
            "webp": features.version("webp"), "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "reference_jpeg_ms": round(statistics.median(times), 3)}


def table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table."""
    lines = [f"mode={report['mode']} image={report['side']}px stored={report['stored']} "
             f"({report['stored_bytes']} B) max_pixels={report['max_pixels']} "
             f"format={report['format']} quality={report['quality']}",
             f"per image, once: whole image {report['whole_image_bytes']} B in "
             f"{report['image']['whole_ms']:.1f} ms; decode + fit "
             f"{report['image']['canvas_ms']:.1f} ms",
             f"{'kind':<12} {'ms':>7} {'ms_max':>7} {'cpu_ms':>7} {'first':>7} {'bytes':>9} "
             f"{'request_B':>10}  format max size"]
    for kind, row in report["kinds"].items():
        lines.append(f"{kind:<12} {row['ms']:>7.2f} {row['ms_max']:>7.2f} {row['cpu_ms']:>7.2f} "
                     f"{row['first_ms']:>7.2f} {row['bytes']:>9} {row['request_bytes']:>10}  "
                     f"{row['format']:<6} {row['size'][0]}x{row['size'][1]}")
    lines.append("image bytes per request: " + ", ".join(
        f"{name} {value}" for name, value in report["requests"].items()))
    lines.append(f"reference: a plain JPEG encode of the photo takes "
                 f"{report['environment']['reference_jpeg_ms']:.2f} ms here now (load "
                 f"{report['environment']['loadavg_1m']})")
    verdict = "met" if report["met"] else "NOT met"
    lines.append(f"target <= {report['target_ms']} ms per prompt (cpu, median of each region "
                 f"size): {verdict} (worst {report['worst_cpu_ms']:.2f} ms)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks the run to a few seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["engine", "legacy"], default="engine")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")
    parser.add_argument("--stored", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--masks", type=int, default=8, help="regions per kind and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-pixels", type=int, default=1024 * 1024,
                        help="the backend's image_max_pixels")
    parser.add_argument("--format", choices=["jpeg", "webp", "png"], default="jpeg",
                        help="the backend's prompt_format (engine mode)")
    parser.add_argument("--quality", type=int, default=90,
                        help="the backend's prompt_quality (engine mode)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (a few seconds)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
