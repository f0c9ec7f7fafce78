"""Shared test helpers: run the real pipeline on small inputs in a temporary directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml


def build(tmp_path: Path, input_spec: str, name: str = "out", config: dict[str, Any] | None = None,
          extra: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run pipelines.build_dataset in-process; returns (output dir, manifest)."""
    from pipelines import build_dataset

    out = tmp_path / name
    args = ["--input", input_spec, "--output", str(out)]
    if config is not None:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        args += ["--config", str(cfg)]
    manifest = build_dataset.run(args + (extra or []))
    return out, manifest


def records(out: Path) -> dict[str, dict[str, Any]]:
    """All records of a built dataset, by key (read with tarfile, independent of the writer)."""
    import tarfile

    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    record = json.loads(tar.extractfile(info).read())
                    found[record["key"]] = record
    return found


@pytest.fixture
def fast_config() -> dict[str, Any]:
    """Small, fast settings for end-to-end runs."""
    return {"shards": {"samples_per_shard": 4}, "segmenter": {"name": "classical", "work_side": 96}}
