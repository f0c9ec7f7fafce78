"""Generates docs/SCHEMA.md from the schema definition (a test fails when the file is stale)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.record import (FAILURE_COLUMNS, IMAGE_COLUMNS, RECORD, REGION_COLUMNS, SCHEMA_VERSION)
from schemas.spec import column_rows, markdown_rows

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "SCHEMA.md"
_HEAD = "| field | type | required | description |\n|---|---|---|---|"
_COLS = "| column | type | nullable | description |\n|---|---|---|---|"


def render() -> str:
    """The schema document as Markdown."""
    from schemas import RECORD_JSON_SCHEMA

    parts = [
        f"# Record schema, version {SCHEMA_VERSION}",
        "",
        "Generated from `schemas/record.py` by `python -m schemas.doc`; do not edit by hand.",
        "",
        "Each shard sample is `{key}.json` (this record) plus `{key}.jpg` or `{key}.png` (the stored",
        "image that every `bbox` and `mask` refers to).",
        "",
        "## Record (`{key}.json`)",
        "",
        _HEAD,
        *markdown_rows(RECORD),
        "",
        "Rules beyond the types: region ids are unique; a `parent` is an earlier region's id; a",
        "`pixel` region has a mask; a mask's `size` is `[height, width]` of the stored image and its",
        "decoded tight box and pixel count equal `bbox` and `area`; boxes lie inside the image.",
        "",
        "## `index/images/{shard}.parquet`",
        "",
        _COLS,
        *column_rows(IMAGE_COLUMNS),
        "",
        "## `index/regions/{shard}.parquet`",
        "",
        _COLS,
        *column_rows(REGION_COLUMNS),
        "",
        "## `failures/{shard}.parquet`",
        "",
        _COLS,
        *column_rows(FAILURE_COLUMNS),
        "",
        "## JSON Schema",
        "",
        "```json",
        json.dumps(RECORD_JSON_SCHEMA, indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(parts)


def main() -> int:
    """Write docs/SCHEMA.md, or with --check exit 1 when it is stale."""
    text = render()
    if "--check" in sys.argv:
        current = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run `python -m schemas.doc`", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
