"""COCO export: a built dataset as COCO instances JSON, one file per split, for the tools
segmentation people use (pycocotools, detectron2, mmdetection, FiftyOne, CVAT).

    python -m pipelines.export_coco OUT [--level pixel|region|all] [--dest DIR] [--no-images]
    (make export-coco OUTPUT=OUT [LEVEL=pixel])

Writes ``DEST/{split}/instances_{level}.json`` (``DEST`` defaults to ``OUT/coco``) and, unless
``--no-images``, the stored images beside it as ``DEST/{split}/images/{key}.{jpg|png}`` — the
exact bytes of the shards, so masks and boxes line up. Each COCO image also names its shard
and key (``shard``, ``key``): with ``--no-images`` that is the path into the shards
(``shards/{shard}`` member ``{key}.jpg|png``).

Annotations: ``segmentation`` is the record's COCO RLE unchanged (``{"size", "counts"}``, counts
as a string) for masks, the box as a polygon for box regions; ``bbox``, ``area`` as in the
record; ``iscrowd`` 0; ``category_id`` 1 for box regions (level ``region``) and 2 for masks
(level ``pixel``). Extra fields: ``region_id``, ``level``, ``parent_region_id`` (the record's
parent id), ``parent_id`` (that parent's annotation id when it is in the same file, else null),
``caption``, ``long_caption``, ``tags``, ``scores``. Image-level text is on each image:
``caption``, ``long_caption``, ``tags``. Ids are assigned in key order, so the same dataset
always gives the same file.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterator

LEVELS = {"pixel": ("pixel",), "region": ("region",), "all": ("region", "pixel")}
CATEGORIES = [{"id": 1, "name": "region", "supercategory": "region"},
              {"id": 2, "name": "pixel", "supercategory": "region"}]
CATEGORY_ID = {"region": 1, "pixel": 2}
_SHARD = re.compile(r"^(?P<split>.+)-\d{6}(?:-\d{3})?\.tar$")


def _samples(shard: Path) -> Iterator[tuple[dict[str, Any], str, bytes]]:
    """(record, image extension, image bytes) of each sample of one shard, in shard order."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            pending.setdefault(key, {})[ext] = tar.extractfile(info).read()
            if "json" in pending[key] and len(pending[key]) == 2:
                members = pending.pop(key)
                record = json.loads(members.pop("json"))
                ext, data = next(iter(members.items()))
                yield record, ext, data


def box_polygon(bbox: list[float]) -> list[list[float]]:
    """The box [x, y, w, h] as one COCO polygon."""
    x, y, w, h = bbox
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def annotations(record: dict[str, Any], image_id: int, first_id: int,
                levels: tuple[str, ...]) -> list[dict[str, Any]]:
    """COCO annotations of one record's regions of ``levels`` (ids from ``first_id``)."""
    chosen = [r for r in record["regions"] if r["level"] in levels]
    ids = {r["id"]: first_id + i for i, r in enumerate(chosen)}
    out = []
    for region in chosen:
        segmentation = region["mask"] if region.get("mask") else box_polygon(region["bbox"])
        out.append({"id": ids[region["id"]], "image_id": image_id,
                    "category_id": CATEGORY_ID[region["level"]], "segmentation": segmentation,
                    "area": region["area"], "bbox": region["bbox"], "iscrowd": 0,
                    "region_id": region["id"], "level": region["level"],
                    "parent_region_id": region["parent"], "parent_id": ids.get(region["parent"]),
                    "caption": region["caption"], "long_caption": region["long_caption"],
                    "tags": region["tags"], "scores": region.get("scores", {})})
    return out


def _split_of(shard_name: str) -> str:
    match = _SHARD.match(shard_name)
    return match.group("split") if match else "train"


def export(out: str | Path, level: str = "pixel", dest: str | Path | None = None,
           images: bool = True) -> dict[str, Path]:
    """Write the COCO files of the dataset at ``out`` (a local folder); returns {split: json}."""
    if level not in LEVELS:
        raise ValueError(f"level: {level!r}; use one of {sorted(LEVELS)}")
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    dest = Path(dest) if dest is not None else out / "coco"
    by_split: dict[str, list[str]] = {}
    for shard in manifest["shards"]:
        by_split.setdefault(_split_of(shard["name"]), []).append(shard["name"])
    written = {}
    for split, shards in sorted(by_split.items()):
        samples = []
        for shard in sorted(shards):
            for record, ext, data in _samples(out / "shards" / shard):
                samples.append((record["key"], shard, ext, record))
                if images:
                    target = dest / split / "images" / f"{record['key']}.{ext}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
        written[split] = _write_split(dest / split / f"instances_{level}.json", manifest, samples,
                                      LEVELS[level])
    return written


def _write_split(path: Path, manifest: dict[str, Any], samples: list[tuple[str, str, str, dict[str, Any]]],
                 levels: tuple[str, ...]) -> Path:
    coco_images, coco_annotations = [], []
    for image_id, (key, shard, ext, record) in enumerate(sorted(samples, key=lambda s: s[0]), start=1):
        text = record["image_level"]
        coco_images.append({"id": image_id, "file_name": f"{key}.{ext}", "width": record["image"]["width"],
                            "height": record["image"]["height"], "key": key, "shard": shard,
                            "caption": text["caption"], "long_caption": text["long_caption"],
                            "tags": text["tags"]})
        coco_annotations += annotations(record, image_id, len(coco_annotations) + 1, levels)
    document = {
        "info": {"description": f"{manifest['dataset_name']} (multigran), levels {', '.join(levels)}",
                 "version": manifest["schema_version"], "settings_hash": manifest["settings_hash"],
                 "pipeline_version": manifest["pipeline_version"]},
        "licenses": [], "images": coco_images, "annotations": coco_annotations, "categories": CATEGORIES}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.export_coco",
                                     description="Export a built dataset as COCO instances JSON.",
                                     epilog="example: python -m pipelines.export_coco out/dataset --level pixel")
    parser.add_argument("output", help="a built dataset folder (local)")
    parser.add_argument("--level", choices=sorted(LEVELS), default="pixel",
                        help="pixel: masks (default); region: boxes; all: both, parents linked")
    parser.add_argument("--dest", default=None, help="where to write (default OUTPUT/coco)")
    parser.add_argument("--no-images", action="store_true",
                        help="do not copy images; each COCO image names its shard and key instead")
    args = parser.parse_args(argv)
    if not (Path(args.output) / "manifest.json").is_file():
        print(f"error: {args.output}: not a built dataset (no manifest.json)", file=sys.stderr)
        return 2
    for split, path in export(args.output, args.level, args.dest, not args.no_images).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
