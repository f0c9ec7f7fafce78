"""Caption faults through the whole pipeline: nothing lost, every failed region a counted row,
and a managed server stopped even when the pipeline itself fails."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from annotators.serving import managed_server
from pipelines import validate, writer
from tests.conftest import build, records
from tests.fault_server import FaultConfig, serve_faults

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
FAST_CLIENT = {"timeout_s": 1.0, "max_retries": 4, "backoff_base_s": 0.01, "backoff_max_s": 0.05}


def _config(captioner: dict) -> dict:
    return {"segmenter": {"name": "given"}, "regions": {"max_regions": 4, "min_area_frac": 0.0},
            "shards": {"samples_per_shard": 4}, "captioner": captioner}


def test_twenty_percent_faults_lose_nothing(tmp_path: Path) -> None:
    with serve_faults(FaultConfig(latency_s=0.002, fault_rate=0.2, seed=5, hang_s=3)) as srv:
        captioner = {"name": "vllm", "model": "fake-vlm", "program": "umg",
                     "endpoints": [srv.base_url], "client": FAST_CLIENT}
        config = _config(captioner)
        out, manifest = build(tmp_path, "synthetic://10?size=96", config=config)
        sent = dict(srv.counts)
    assert sum(v for k, v in sent.items() if k != "ok") > 20, sent   # faults really happened
    assert validate.validate(str(out)).ok
    counts = manifest["counts"]
    assert counts["inputs"] == 10 == counts["written"] + counts["failed"] + counts["awaiting_retry"] \
        + counts["held"]
    failures = pq.read_table(out / "failures").to_pylist()
    region_rows = [f for f in failures if f["region_id"] is not None]
    assert region_rows, "20% faults should fail some regions"
    assert all(f["stage"] == "caption" and f["reason"] and f["detail"] for f in failures)
    assert {f["reason"] for f in failures} <= {"http_400", "refusal", "http_500", "http_503",
                                                "timeout", "connection", "bad_response"}
    for f in failures:   # infrastructure faults are transient; a bad request or answer is final
        assert f["class"] == ("permanent" if f["reason"] in ("http_400", "refusal") else "transient")
    # the server recovers: the same command completes every shard, nothing redone twice
    with serve_faults(FaultConfig(latency_s=0.002, fault_rate=0.0)) as srv:
        config["captioner"]["endpoints"] = [srv.base_url]
        _, manifest = build(tmp_path, "synthetic://10?size=96", config=config)
    counts = manifest["counts"]
    assert counts["awaiting_retry"] == 0 == counts["held"] and not manifest["incomplete_shards"]
    assert counts["inputs"] == 10 == counts["written"] + counts["failed"]
    assert validate.validate(str(out)).ok
    failures = pq.read_table(out / "failures").to_pylist()
    region_rows = [f for f in failures if f["region_id"] is not None]
    assert all(f["class"] == "permanent" for f in failures)
    assert sum(counts["region_failures_by_reason"].values()) == len(region_rows)
    got = records(out)
    assert len(got) == counts["written"] >= 5
    for record in got.values():   # a failed region is gone from its record, the rest are whole
        ids = {r["id"] for r in record["regions"]}
        assert not ids & {f["region_id"] for f in region_rows if f["key"] == record["key"]}
        assert all(r["caption"] and r["tags"] for r in record["regions"])


def _alive(pattern: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if pattern in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_managed_server_stopped_after_a_pipeline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"managed-fault-server-{time.time_ns()}"
    command = [sys.executable, "-c",
               "import sys; from aiohttp import web; from tests.fault_server import FaultApp, "
               "FaultConfig; web.run_app(FaultApp(FaultConfig()).build(), host='127.0.0.1', "
               "port=int(sys.argv[1]), print=None)", "{port}", marker]
    captioner = {"name": "vllm", "model": "fake-vlm", "program": "umg", "client": FAST_CLIENT,
                 "server": {"command": command, "poll_interval_s": 0.05, "ready_timeout_s": 20,
                            "stop_grace_s": 2, "cwd": str(REPO)}}

    def broken_writer(*args, **kwargs):
        assert _alive(marker.encode()), "the managed server should be up while the pipeline runs"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(writer, "write_shard", broken_writer)
    with pytest.raises(Exception, match="disk full"):
        build(tmp_path, "synthetic://2?size=64", config=_config(captioner))
    deadline = time.time() + 10
    while _alive(marker.encode()) and time.time() < deadline:
        time.sleep(0.1)
    assert _alive(marker.encode()) == [] and managed_server.running() == []
