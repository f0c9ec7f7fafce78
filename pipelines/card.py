"""The dataset card (OUT/README.md): what, how built, stats, schema, how to load."""
from __future__ import annotations

import json
from typing import Any


def render(manifest: dict[str, Any]) -> str:
    """Markdown card from the manifest (whose counts the pipeline summed over the shards)."""
    c = manifest["counts"]
    seg = manifest["annotators"]["segmenter"]
    cap = manifest["annotators"]["captioner"]
    weight_free = seg["name"] in ("classical", "given") and cap["name"] == "attributes"
    lines = [
        f"# {manifest['dataset_name']}",
        "",
        "Multi-granularity image–text dataset: every image has an image-level caption, long caption",
        "and tags; regions come as boxes (level `region`) and pixel masks (level `pixel`, COCO RLE)",
        "with captions, long captions and tags, linked by `parent` (whole → part → subpart).",
        "",
        "## How it was built",
        "",
        f"- input: `{manifest['input']}`",
        f"- segmenter: `{seg['name']}` (version {seg['version']})",
        f"- captioner: `{cap['name']}` (version {cap['version']})",
        f"- pipeline version {manifest['pipeline_version']}, record schema version "
        f"{manifest['schema_version']}, settings hash `{manifest['settings_hash']}`",
    ]
    if weight_free:
        lines += ["", "Built with the weight-free annotators: regions come from colour segmentation and",
                  "text from measured attributes (colour, position, size, shape). It is a fallback",
                  "that runs anywhere, not object recognition or MLLM-written text."]
    lines += [
        "",
        "## Statistics",
        "",
        "| | |",
        "|---|---|",
        f"| inputs | {c['inputs']} |",
        f"| records | {c['written']} |",
        f"| failed inputs | {c['failed']} |",
        f"| shards | {len(manifest['shards'])} |",
        f"| regions by level | {json.dumps(c['regions_by_level'])} |",
        f"| mean image caption length (chars) | {manifest['means']['image_caption_chars']:.0f} |",
        f"| mean region long caption length (chars) | {manifest['means']['region_long_caption_chars']:.0f} |",
        f"| failures by reason | {json.dumps(c['failed_by_reason'])} |",
        f"| failures by class | {json.dumps(c['failed_by_class'])} |",
        f"| inputs waiting for a retry | {c['awaiting_retry']} |",
        "",
        "## Layout",
        "",
        "```",
        "shards/{split}-{NNNNNN}[-{GGG}].tar  WebDataset: {key}.json (record) + {key}.jpg|png (stored image)",
        "index/images/{shard}.parquet        one row per image",
        "index/regions/{shard}.parquet       one row per region",
        "failures/{shard}.parquet            one row per rejected input or region (stage, reason, class)",
        "manifest.json                       counts, per-shard sha256 and size, settings, versions",
        "```",
        "",
        "The record schema is documented in the project's `docs/SCHEMA.md`.",
        "",
        "## Loading",
        "",
        "```python",
        "import glob",
        "import webdataset as wds",
        "ds = wds.WebDataset(sorted(glob.glob('shards/*.tar'))).decode('pil').to_tuple('jpg;png', 'json')",
        "",
        "from datasets import load_dataset",
        "ds = load_dataset('webdataset', data_files={'train': 'shards/*.tar'}, split='train')",
        "",
        "import pyarrow.dataset as pads   # the index: one parquet file per shard, read as one table",
        "regions = pads.dataset('index/regions', format='parquet').to_table().to_pandas()",
        "",
        "from pycocotools import mask as mask_utils   # masks",
        "m = mask_utils.decode({'size': r['mask']['size'], 'counts': r['mask']['counts'].encode()})",
        "```",
        "",
    ]
    return "\n".join(lines)
