"""A tiny schema language: one definition gives JSON Schema, Arrow schemas and Markdown docs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass
class F:
    """A field of a JSON record.

    kind: "string" | "integer" | "number" | "boolean" | "object" | "array" | "any".
    For objects, ``fields``; for arrays, ``items``. ``nullable`` allows JSON null.
    """

    kind: str
    doc: str
    required: bool = True
    nullable: bool = False
    fields: dict[str, "F"] = field(default_factory=dict)
    items: "F | None" = None
    extra: dict[str, Any] = field(default_factory=dict)   # JSON Schema keywords (enum, pattern, ...)
    open: bool = False   # objects: allow keys not listed (e.g. free-form provenance)


def json_schema(spec: F) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) for a field spec."""
    out: dict[str, Any] = {"description": spec.doc}
    if spec.kind != "any":
        out["type"] = [spec.kind, "null"] if spec.nullable else spec.kind
    out.update(spec.extra)
    if spec.kind == "object" and (spec.fields or not spec.open):
        out["properties"] = {name: json_schema(f) for name, f in spec.fields.items()}
        out["required"] = [name for name, f in spec.fields.items() if f.required]
        out["additionalProperties"] = spec.open
    if spec.kind == "array" and spec.items is not None:
        out["items"] = json_schema(spec.items)
    return out


def markdown_rows(spec: F, prefix: str = "") -> list[str]:
    """Markdown table rows "| path | type | required | description |" for every nested field."""
    rows: list[str] = []
    for name, f in spec.fields.items():
        path = f"{prefix}{name}"
        rows.append(f"| `{path}` | {_type_label(f)} | {'yes' if f.required else 'no'} | {_doc(f)} |")
        if f.kind == "object":
            rows.extend(markdown_rows(f, path + "."))
        if f.kind == "array" and f.items is not None and f.items.kind == "object":
            rows.extend(markdown_rows(f.items, path + "[]."))
    return rows


def _type_label(f: F) -> str:
    label = f.kind
    if f.kind == "array" and f.items is not None:
        label = f"array of {f.items.kind}"
    return label + (" or null" if f.nullable else "")


def _doc(f: F) -> str:
    doc = f.doc
    if "enum" in f.extra:
        doc += " One of: " + ", ".join(f"`{v}`" for v in f.extra["enum"]) + "."
    if "const" in f.extra:
        doc += f" Always `{f.extra['const']}`."
    if "pattern" in f.extra:
        doc += f" Pattern `{f.extra['pattern']}`."
    return doc.replace("|", "\\|")


@dataclass
class Column:
    """A column of a parquet table."""

    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False


def arrow_schema(columns: list[Column], version: str) -> pa.Schema:
    """Arrow schema with column docs and the schema version in the metadata."""
    return pa.schema(
        [pa.field(c.name, c.type, nullable=c.nullable, metadata={"doc": c.doc}) for c in columns],
        metadata={"schema_version": version},
    )


def column_rows(columns: list[Column]) -> list[str]:
    """Markdown rows for a table's columns."""
    return [f"| `{c.name}` | `{c.type}` | {'yes' if c.nullable else 'no'} | {c.doc} |" for c in columns]
