"""Provenance by id: each distinct annotator provenance is stored once per record.

``provenance.annotators`` maps an id to a provenance dict; regions and the image level refer to it
by id. The id is a hash of the provenance's canonical JSON, so the same provenance has the same id
in every record of a dataset (and across datasets): the index can group regions by it, and a later
run can tell which regions a new setting would change.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = {"segmenter": "s", "captioner": "c"}


def provenance_id(role: str, provenance: dict[str, Any]) -> str:
    """``s-`` or ``c-`` and 12 hex digits of the sha256 of ``provenance`` as canonical JSON."""
    blob = json.dumps(provenance, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"{ROLES[role]}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:12]}"


class ProvenanceTable:
    """Collects a record's distinct provenances while it is assembled."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, role: str, provenance: dict[str, Any]) -> str:
        pid = provenance_id(role, provenance)
        self.entries.setdefault(pid, provenance)
        return pid

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {pid: self.entries[pid] for pid in sorted(self.entries)}


def image_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """The image-level captioner provenance of ``record``."""
    return record["provenance"]["annotators"][record["image_level"]["provenance"]]


def region_provenance(record: dict[str, Any], region: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"segmenter": {...}, "captioner": {...}}`` for one of ``record``'s regions."""
    table = record["provenance"]["annotators"]
    return {role: table[pid] for role, pid in region["provenance"].items()}
