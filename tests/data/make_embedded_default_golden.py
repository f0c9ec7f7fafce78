"""Golden outputs of the embedded default annotators (segmenter `classical`, region selection,
captioner `attributes`) for tests/test_embedded_default_speed.py.

The golden file records what a known-good checkout produced, so a faster implementation can be
held to the same answers. Regenerate it only when an output change is intended (and say why):

    python tests/data/make_embedded_default_golden.py [--root CHECKOUT] [--out PATH]

``--root`` imports the annotators from another checkout (e.g. an older commit unpacked with
``git archive``); by default this repository's own code is used.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "embedded_default_golden.json"
# two bundled photos (scikit-image's own data, no download) and one synthetic scene with given
# masks and box-only regions, which the classical segmenter never makes
SAMPLE_PHOTOS = ("coffee.png", "coins.png")
SYNTHETIC = {"seed": 3, "index": 5, "size": 160}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_path(name: str) -> str:
    """Where scikit-image keeps a bundled photo."""
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", name)


def _png(rgb: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _text(out: Any) -> dict[str, Any]:
    return {"caption": out.caption, "long_caption_sha": _sha(out.long_caption), "tags": list(out.tags)}


def summarise(rgb: Any, candidates: list[Any], region_settings: dict[str, Any]) -> dict[str, Any]:
    """Selected regions and their texts for ``candidates`` on ``rgb``: masks and long captions as
    short hashes, everything else as is."""
    from annotators.base import CaptionInput
    from annotators.registry import build_captioner
    from pipelines.config import RegionSettings
    from pipelines.regions import select_regions

    height, width = rgb.shape[:2]
    views, dropped = select_regions(candidates, rgb, RegionSettings(**region_settings))
    item = CaptionInput("golden", width, height, _png(rgb), views)
    result = build_captioner({"name": "attributes"}).caption_batch([item])[0]
    regions = []
    for v in views:
        regions.append({
            "id": v.id, "level": v.level, "parent": v.parent, "bbox": list(v.bbox), "area": v.area,
            "mask_sha": _sha(json.dumps(v.rle, sort_keys=True)) if v.rle is not None else None,
            "stats": {k: v.stats[k] for k in ("depth", "source")},
            **_text(result.regions[v.id])})
    return {"dropped": dict(sorted(dropped.items())), "regions": regions,
            "image_level": _text(result.image_level), "failures": len(result.failures)}


def _candidate_digest(candidates: list[Any]) -> str:
    rows = [[c.bbox, c.area, c.rle, c.scores, c.source] for c in candidates]
    return _sha(json.dumps(rows, sort_keys=True))


def sample_case(name: str) -> dict[str, Any]:
    """A bundled photo through the embedded default (default settings throughout)."""
    import numpy as np
    from PIL import Image

    from annotators.base import SegmentInput
    from annotators.registry import build_segmenter

    rgb = np.asarray(Image.open(sample_path(name)).convert("RGB"))
    out = build_segmenter({"name": "classical"}).segment_batch([SegmentInput(name, rgb)])[0]
    return {"candidates": len(out.candidates), "candidates_sha": _candidate_digest(out.candidates),
            **summarise(rgb, out.candidates, {})}


def synthetic_case() -> dict[str, Any]:
    """A synthetic scene with its true masks and their boxes as box-only candidates."""
    import numpy as np

    from annotators.base import Candidate
    from pipelines.synthetic import scene

    image, objects = scene(SYNTHETIC["seed"], SYNTHETIC["index"], SYNTHETIC["size"])
    candidates = [Candidate(list(o["bbox"]), float(o["area"]), o["mask"], {}, "given") for o in objects]
    candidates += [Candidate(list(o["bbox"]), float(o["bbox"][2] * o["bbox"][3]), None, {}, "given:box")
                   for o in objects]
    return summarise(np.asarray(image), candidates, {"min_area_frac": 0.0})


def golden() -> dict[str, Any]:
    """Every case, keyed by name."""
    cases = {name: sample_case(name) for name in SAMPLE_PHOTOS}
    cases["synthetic"] = synthetic_case()
    return cases


def dumps(cases: dict[str, Any]) -> str:
    """JSON with one region per line (small, and diffs read region by region)."""
    parts = []
    for name, case in sorted(cases.items()):
        fields = [f'  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}'
                  for k, v in sorted(case.items()) if k != "regions"]
        regions = ",\n".join(f"    {json.dumps(r, sort_keys=True)}" for r in case["regions"])
        fields.append(f'  "regions": [\n{regions}\n  ]')
        parts.append(f' {json.dumps(name)}: {{\n' + ",\n".join(fields) + "\n }")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(HERE.parent.parent), help="checkout to import from")
    parser.add_argument("--out", default=str(GOLDEN))
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.root))
    Path(args.out).write_text(dumps(golden()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
