"""Benchmark the embedded default: segmenter `classical`, SelectRegions and captioner
`attributes` on the bundled sample photos, seconds per image and stage.

The photos are the ones ``make build-dataset`` reads by default (scikit-image's bundled samples),
read and normalized by ``pipelines.decode`` as the pipeline stores them. Per image, ``segment``
is ``segment_batch``, ``select`` is ``select_regions`` and ``caption`` is ``caption_batch``
(which decodes the stored image bytes itself, as in the pipeline). A stage's figure for an image
is its fastest of ``--repeat`` runs, the one least disturbed by other work on the machine; the
image's total is the sum of its stages. One untimed image first loads the libraries.

    python bench/embedded_default.py [--repeat 3] [--json out.json]
    python bench/embedded_default.py --git-rev REV   # the same run on commit REV too, and the ratio
    python bench/embedded_default.py --smoke         # one image, one run (used in tests)

``--git-rev`` unpacks REV with ``git archive`` into a temporary folder (the work tree and its git
state are left alone) and times it in a subprocess with the same interpreter, on the very same
stored image bytes; the two alternate round by round, so both see the same load on the machine.
Target: the embedded default at least 5x faster per image than commit 7c31e11.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("segment", "select", "caption")
TARGET = {"min_speedup": 5.0, "baseline": "7c31e11c4121baa406a661d39b852f2afd209fac",
          "applies_to": "mean total seconds per bundled sample photo, default settings"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per image (fastest kept)")
    parser.add_argument("--images", nargs="*", default=None,
                        help="sample keys to run (default: all bundled samples), e.g. astronaut coins")
    parser.add_argument("--git-rev", default=None, help="also measure this commit and print the ratio")
    parser.add_argument("--root", default=str(ROOT), help="checkout whose code is measured")
    parser.add_argument("--inputs", default=None, help=argparse.SUPPRESS)   # from save_inputs
    parser.add_argument("--smoke", action="store_true", help="one image, one run")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeat, args.images = 1, (args.images or ["coins"])[:1]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def load_inputs(keys: list[str] | None) -> list[dict[str, Any]]:
    """The bundled photos as the pipeline stores them: key and encoded bytes."""
    from pipelines import decode as dec
    from pipelines.config import DecodeSettings
    from pipelines.sources import sample_refs

    settings = DecodeSettings()
    inputs = []
    for ref in sample_refs():
        if keys and ref.key not in keys:
            continue
        data, _ = dec.read_bytes(ref, settings.max_bytes)
        inputs.append({"key": ref.key, "data": dec.decode(data, settings).data})
    if not inputs:
        raise SystemExit(f"no bundled sample photo matches {keys}")
    return inputs


def save_inputs(inputs: list[dict[str, Any]], folder: Path) -> None:
    """Stored bytes for another checkout's run, so both runs measure the very same images."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for n, item in enumerate(inputs):
        (folder / f"{n:03d}.bin").write_bytes(item["data"])
        names.append({"key": item["key"], "file": f"{n:03d}.bin"})
    (folder / "inputs.json").write_text(json.dumps(names))


def read_inputs(folder: Path) -> list[dict[str, Any]]:
    """What ``save_inputs`` wrote."""
    return [{"key": row["key"], "data": (folder / row["file"]).read_bytes()}
            for row in json.loads((folder / "inputs.json").read_text())]


def run_once(item: dict[str, Any], segmenter: Any, captioner: Any) -> dict[str, Any]:
    """One image through the three stages; seconds per stage and what came out."""
    from annotators.base import CaptionInput, SegmentInput
    from pipelines.config import RegionSettings
    from pipelines.regions import select_regions

    rgb, key = item["rgb"], item["key"]
    height, width = rgb.shape[:2]
    start = time.perf_counter()
    out = segmenter.segment_batch([SegmentInput(key, rgb)])[0]
    segmented = time.perf_counter()
    views, _ = select_regions(out.candidates, rgb, RegionSettings())
    selected = time.perf_counter()
    result = captioner.caption_batch([CaptionInput(key, width, height, item["data"], views)])[0]
    captioned = time.perf_counter()
    if result.failures or len(result.regions) != len(views):
        raise RuntimeError(f"{key}: captioner failed: {result.failures}")
    return {"key": key, "width": width, "height": height, "candidates": len(out.candidates),
            "regions": len(views), "segment_s": segmented - start, "select_s": selected - segmented,
            "caption_s": captioned - selected}


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per image, the fastest of the runs per stage; the image's total; means over images."""
    best: dict[str, dict[str, Any]] = {}
    for row in runs:
        kept = best.setdefault(row["key"], dict(row))
        for stage in STAGES:
            kept[f"{stage}_s"] = min(kept[f"{stage}_s"], row[f"{stage}_s"])
    images = list(best.values())
    for row in images:
        row["total_s"] = sum(row[f"{stage}_s"] for stage in STAGES)
    mean = {f"{name}_s": statistics.fmean(r[f"{name}_s"] for r in images) for name in STAGES + ("total",)}
    return {"images": images, "mean": mean, "repeat": len(runs) // max(len(images), 1), "runs": runs}


def measure(inputs: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    """``repeat`` timed runs of every image (after one untimed image that loads the libraries)."""
    import numpy as np
    from PIL import Image

    from annotators.registry import build_captioner, build_segmenter

    segmenter, captioner = build_segmenter({"name": "classical"}), build_captioner({"name": "attributes"})
    segmenter.setup()
    captioner.setup()
    items = [{**item, "rgb": np.asarray(Image.open(io.BytesIO(item["data"])).convert("RGB"))}
             for item in inputs]
    run_once(items[0], segmenter, captioner)
    return [run_once(item, segmenter, captioner) for _ in range(repeat) for item in items]


def unpack(rev: str, folder: Path) -> str:
    """Commit ``rev`` of this repository, unpacked into ``folder`` (no git state changes)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True,
                            check=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return commit


def measure_in(root: Path, inputs: Path, repeat: int) -> list[dict[str, Any]]:
    """Timed runs with the code of checkout ``root``, in a subprocess (same interpreter)."""
    out = root / "runs.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--inputs",
                    str(inputs), "--repeat", str(repeat), "--json", str(out)],
                   check=True, cwd=root, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"]


def commit_of(root: str) -> str | None:
    """HEAD of ``root`` when it is a git checkout (an unpacked archive is not: None)."""
    if not (Path(root) / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              check=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(report: dict[str, Any], title: str) -> str:
    """Seconds per image and stage, as text."""
    lines = [title, f"{'image':<20}{'regions':>8}" + "".join(f"{s:>10}" for s in STAGES) + f"{'total':>10}"]
    for row in report["images"]:
        lines.append(f"{row['key']:<20}{row['regions']:>8}"
                     + "".join(f"{row[f'{s}_s']:>10.4f}" for s in STAGES + ("total",)))
    mean = report["mean"]
    lines.append(f"{'mean':<20}{'':>8}" + "".join(f"{mean[f'{s}_s']:>10.4f}" for s in STAGES + ("total",)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run, print, optionally compare with ``--git-rev`` and write JSON; 0 on success."""
    args = parse_args(argv)
    root = os.path.abspath(args.root)
    sys.path.insert(0, root)
    inputs = read_inputs(Path(args.inputs)) if args.inputs else load_inputs(args.images)
    report: dict[str, Any] = {"benchmark": "embedded_default", "root": root, "head": commit_of(root),
                              "target": TARGET}
    title = f"this checkout ({root}, HEAD {report['head']} and its uncommitted changes), seconds per image"
    if not args.git_rev:
        report.update(combine(measure(inputs, args.repeat)))
        print(table(report, title))
    else:
        with tempfile.TemporaryDirectory(prefix="embedded-bench-") as tmp:
            other = Path(tmp) / "checkout"
            baseline_commit = unpack(args.git_rev, other)
            save_inputs(inputs, Path(tmp) / "inputs")
            ours, theirs = [], []
            for _ in range(args.repeat):   # rounds alternate, so both see the same machine load
                ours += measure(inputs, 1)
                theirs += measure_in(other, Path(tmp) / "inputs", 1)
        report.update(combine(ours))
        report["baseline"] = {"commit": baseline_commit, **combine(theirs)}
        report["speedup"] = {s: report["baseline"]["mean"][f"{s}_s"] / report["mean"][f"{s}_s"]
                             for s in STAGES + ("total",)}
        print(table(report, title))
        print()
        print(table(report["baseline"], f"baseline {baseline_commit}, seconds per image"))
        print()
        print("speedup (baseline mean / this mean): "
              + ", ".join(f"{s} {v:.1f}x" for s, v in report["speedup"].items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
