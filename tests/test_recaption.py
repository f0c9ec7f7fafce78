"""make recaption: only what new settings change is recomputed; the rest is carried byte for byte."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
import yaml

from annotators.caption.program import load_program
from pipelines import recaption, validate
from settings import ConfigError
from tests.conftest import build, records
from tests.fault_server import FaultConfig, FaultServer

pytestmark = pytest.mark.slow
INPUT = "synthetic://4?size=96"
FAST_CLIENT = {"timeout_s": 5.0, "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    """A fault server whose answers depend only on the request (same request, same answer)."""
    srv = FaultServer(FaultConfig(latency_s=0.0, deterministic=True)).start()
    yield srv
    srv.stop()


def _config(server: FaultServer, program: str = "longgrit", **regions: Any) -> dict[str, Any]:
    return {"segmenter": {"name": "classical"},
            "regions": {"max_regions": 4, "min_area_frac": 0.0, **regions},
            "shards": {"samples_per_shard": 2},
            "captioner": {"name": "vllm", "model": "fake-vlm", "program": program,
                          "endpoints": [server.base_url], "client": FAST_CLIENT}}


def _recaption(tmp_path: Path, source: Path, name: str, config: dict[str, Any],
               *extra: str) -> tuple[Path, dict[str, Any]]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    report = recaption.run(["--from", str(source), "--config", str(cfg), "--output", str(out), *extra])
    assert validate.validate(str(out)).ok
    assert json.loads((out / recaption.REPORT).read_text()) == report
    return out, report


def _tars(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def _text(region: dict[str, Any]) -> dict[str, Any]:
    return {k: region.get(k) for k in ("caption", "long_caption", "tags", "judge", "steps")}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, server: FaultServer) -> tuple[Path, Path, int]:
    """A longgrit dataset: (tmp dir, output, requests it took)."""
    tmp = tmp_path_factory.mktemp("recaption")
    before = len(server.requests)
    out, manifest = build(tmp, INPUT, "first", config=_config(server))
    assert manifest["counts"]["written"] == 4
    # the judge (a fair coin per request here) dropped some regions: permanent failures to retry
    assert manifest["counts"]["region_failures_by_reason"].get("caption/judge_rejected", 0) >= 1
    return tmp, out, len(server.requests) - before


def test_nothing_changed_calls_no_model_and_keeps_every_byte(first: tuple[Path, Path, int],
                                                             server: FaultServer) -> None:
    tmp, source, sent = first
    assert sent > 0
    before = len(server.requests)
    out, report = _recaption(tmp, source, "same", _config(server))
    assert len(server.requests) == before                     # no model call at all
    assert _tars(out) == _tars(source)                        # byte for byte
    counts = report["counts"]
    n_regions = sum(len(r["regions"]) for r in records(source).values())
    assert counts["image_carried"] == 4 and counts["regions_carried"] == n_regions
    assert counts["regions_recomputed"] == counts["regions_partly_reused"] == counts["model_calls"] == 0
    # FROM's failure rows are carried too
    assert pq.read_table(out / "failures").num_rows == pq.read_table(source / "failures").num_rows


def _program(tmp: Path, name: str, level: str, step: str, extra: str) -> str:
    data = yaml.safe_load(Path(load_program("longgrit").source).read_text())
    data["steps"][level] = [dict(s) for s in data["steps"][level]]
    target = next(s for s in data["steps"][level] if s["name"] == step)
    target["prompt"] += extra
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("step, asked", [("tags", ["tags"]),
                                         ("context", ["context", "long_caption", "tags"])])
def test_one_changed_prompt_recomputes_that_step_and_its_readers(
        first: tuple[Path, Path, int], server: FaultServer, step: str, asked: list[str]) -> None:
    """The pixel level's ``step`` prompt changes: for each mask region exactly the steps in
    ``asked`` are sent; every other output, the image level and the box regions stay as they were."""
    tmp, source, _ = first
    program = _program(tmp, f"prog-{step}", "pixel", step, " Keep it short.")
    before = len(server.requests)
    out, report = _recaption(tmp, source, f"changed-{step}", _config(server, program))
    old, new = records(source), records(out)
    assert set(new) == set(old)
    pixels = sum(r["level"] == "pixel" for rec in old.values() for r in rec["regions"])
    assert pixels > 0
    assert len(server.requests) - before == pixels * len(asked)
    assert report["counts"]["regions_partly_reused"] == pixels
    assert report["counts"]["image_carried"] == 4
    for key, record in new.items():
        was = old[key]
        assert json.dumps(record["image_level"]) == json.dumps(was["image_level"])
        assert [r["id"] for r in record["regions"]] == [r["id"] for r in was["regions"]]
        for region, before_region in zip(record["regions"], was["regions"], strict=True):
            if region["level"] == "region":
                assert json.dumps(region, sort_keys=True) == json.dumps(before_region, sort_keys=True)
                continue
            kept = {k for k in ("caption", "judge", "context", "long_caption", "tags") if k not in asked}
            now, then = _text(region), _text(before_region)
            flat_now = {**now, **(now["steps"] or {})}
            flat_then = {**then, **(then["steps"] or {})}
            assert {k: flat_now[k] for k in kept} == {k: flat_then[k] for k in kept}
            assert {k: flat_now[k] for k in asked} != {k: flat_then[k] for k in asked}
            assert region["provenance"]["captioner"] != before_region["provenance"]["captioner"]
            assert region["mask"] == before_region["mask"]


def test_retry_failed_asks_the_rejected_regions_again(first: tuple[Path, Path, int],
                                                      server: FaultServer) -> None:
    """--retry-failed permanent segments the images that lost regions again; the regions that
    match earlier ones are carried, the rejected ones asked again (the judge answers the same)."""
    tmp, source, _ = first
    failures = pq.read_table(source / "failures").to_pylist()
    rejected = [f for f in failures if f["reason"] == "judge_rejected"]
    before = len(server.requests)
    out, report = _recaption(tmp, source, "retry", _config(server), "--retry-failed", "permanent")
    counts = report["counts"]
    assert counts["images_segmented_again"] == len({f["key"] for f in rejected})
    assert counts["regions_recomputed"] + counts["regions_failed"] >= len(rejected)
    sent = len(server.requests) - before
    # each rejected region: caption + judge again (rejected again: the same request, the same verdict)
    assert sent >= 2 * len(rejected)
    again = [f for f in pq.read_table(out / "failures").to_pylist() if f["reason"] == "judge_rejected"]
    assert len(again) == len(rejected)
    old, new = records(source), records(out)
    carried = sum(json.dumps(r, sort_keys=True) in {json.dumps(o, sort_keys=True) for o in old[k]["regions"]}
                  for k, rec in new.items() for r in rec["regions"])
    assert carried == counts["regions_carried"] > 0


def test_changed_regions_segment_again_and_keep_matching_texts(first: tuple[Path, Path, int],
                                                               server: FaultServer) -> None:
    """A new region selection gives new masks everywhere; regions equal to earlier ones keep
    their texts (no request for them)."""
    tmp, source, _ = first
    before = len(server.requests)
    out, report = _recaption(tmp, source, "fewer", _config(server, max_regions=2))
    counts = report["counts"]
    assert report["resegment"] and counts["images_segmented_again"] == 4
    new = records(out)
    assert sum(len(rec["regions"]) for rec in new.values()) < \
        sum(len(rec["regions"]) for rec in records(source).values())
    assert counts["regions_carried"] > 0
    texts = {json.dumps(_text(r), sort_keys=True) for rec in records(source).values() for r in rec["regions"]}
    carried = sum(json.dumps(_text(r), sort_keys=True) in texts for rec in new.values() for r in rec["regions"])
    assert carried >= counts["regions_carried"]
    # requests only for the regions not carried (at most the 5 region steps of longgrit each)
    asked = counts["regions_recomputed"] + counts["regions_failed"] + counts["regions_partly_reused"]
    assert asked > 0 and 0 < len(server.requests) - before <= 5 * asked
    assert counts["image_carried"] == 4


def test_bad_requests_stop_before_any_work(first: tuple[Path, Path, int], server: FaultServer) -> None:
    tmp, source, _ = first
    config = _config(server)
    cases = [
        (["--from", str(tmp / "nothing")], "no finished dataset"),
        (["--from", str(source), "--output", str(source)], "must differ from --from"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            recaption.prepare(args + (["--output", str(tmp / "x")] if "--output" not in args else []))
    cfg = tmp / "decode.yaml"
    cfg.write_text(yaml.safe_dump({**config, "decode": {"max_side": 64}}))
    with pytest.raises(ConfigError, match="decode: the settings differ"):
        recaption.prepare(["--from", str(source), "--config", str(cfg), "--output", str(tmp / "y")])
    cfg.write_text(yaml.safe_dump({**config, "segmenter": {"name": "given"}}))
    with pytest.raises(ConfigError, match="segmenter: 'given'"):
        recaption.prepare(["--from", str(source), "--config", str(cfg), "--output", str(tmp / "y")])
    assert not (tmp / "x").exists() and not (tmp / "y").exists()


def test_new_regions_with_a_context_reading_captioner_give_a_fresh_builds_bytes(tmp_path: Path) -> None:
    """The embedded default's texts read neighbours and parts: with a new region selection, an
    image whose regions changed is described anew, one whose regions did not is carried. On
    lossless synthetic scenes the result is byte for byte the fresh build with the new settings."""
    source, _ = build(tmp_path, "synthetic://6", "default")
    fewer = {"regions": {"max_regions": 3}}
    fresh, _ = build(tmp_path, "synthetic://6", "fresh", config=fewer)
    out, report = _recaption(tmp_path, source, "fewer", fewer)
    counts = report["counts"]
    assert counts["images_segmented_again"] == 6 and counts["model_calls"] == 0
    assert counts["image_recomputed"] >= 1 and counts["regions_recomputed"] > 0
    assert _tars(out) == _tars(fresh)
