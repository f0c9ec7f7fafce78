"""Production runs: inputs that grow or vanish, keys used twice, a caption server that is down
and then recovers, the failure budget, and a pipeline whose size does not grow with its inputs."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import build_dataset, validate
from pipelines.build_dataset import RunFailed
from tests.conftest import build, records
from tests.fault_server import FaultConfig, serve_faults

pytestmark = pytest.mark.slow
FAST_CLIENT = {"timeout_s": 2.0, "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02}


def _photo(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rgb = np.full((48, 64, 3), rng.integers(0, 255, 3), np.uint8)
    y, x = rng.integers(0, 24), rng.integers(0, 32)
    rgb[y:y + 20, x:x + 28] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def _members(out: Path) -> dict[str, list[str]]:
    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        import tarfile

        with tarfile.open(shard) as tar:
            found[shard.name] = sorted({m.name.split(".")[0] for m in tar})
    return found


@pytest.fixture
def config(fast_config: dict) -> dict:
    return fast_config


def test_input_that_grows_adds_new_shards_and_keeps_the_old_ones(tmp_path: Path, config: dict) -> None:
    folder = tmp_path / "in"
    for i in range(8):
        _photo(folder / f"m{i:02d}.png", i)
    out, first = build(tmp_path, str(folder), config=config)
    out2, _ = build(tmp_path, str(folder), "two", config, ["--workers", "2"])
    assert first["counts"]["written"] == 8 and validate.validate(str(out)).ok
    before = _digests(out)
    # one name sorts first, one last, one in the middle
    for name, seed in (("a-first.png", 100), ("z-last.png", 101), ("m03b.png", 102)):
        _photo(folder / name, seed)
    _, second = build(tmp_path, str(folder), config=config)
    after = _digests(out)
    assert {k: after[k] for k in before} == before                 # complete shards untouched
    assert set(after) - set(before) and second["shards_this_run"] == len(set(after) - set(before))
    got = records(out)
    assert len(got) == 11 == second["counts"]["written"] == second["counts"]["inputs"]
    assert {"a-first", "z-last", "m03b"} <= set(got)
    assert sum(len(v) for v in _members(out).values()) == 11      # nobody twice
    assert validate.validate(str(out)).ok
    # the same incremental history with 2 workers gives the same bytes
    build(tmp_path, str(folder), "two", config, ["--workers", "2"])
    assert _digests(out2) == after


def test_vanished_inputs_are_reported_then_pruned_on_request(tmp_path: Path, config: dict) -> None:
    folder = tmp_path / "in"
    for i in range(6):
        _photo(folder / f"p{i}.png", i)
    out, _ = build(tmp_path, str(folder), config=config)
    (folder / "p2.png").unlink()
    _, manifest = build(tmp_path, str(folder), config=config)
    assert manifest["counts"]["vanished"] == 1 and manifest["vanished_keys"] == ["p2"]
    assert "p2" in records(out) and manifest["shards_this_run"] == 0   # reported, kept
    _, manifest = build(tmp_path, str(folder), config=config, extra=["--prune-vanished"])
    got = records(out)
    assert "p2" not in got and len(got) == 5 == manifest["counts"]["written"]
    assert manifest["pruned_shards"] and validate.validate(str(out)).ok
    _, manifest = build(tmp_path, str(folder), config=config)
    assert manifest["counts"]["vanished"] == 0 and manifest["shards_this_run"] == 0


def test_a_key_in_two_manifests_is_one_sample_and_a_failure_row(tmp_path: Path, config: dict) -> None:
    _photo(tmp_path / "a" / "cat.png", 1)
    _photo(tmp_path / "b" / "cat.png", 2)
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"path": "a/cat.png", "key": "cat"}) + "\n")
    (tmp_path / "part-2.jsonl").write_text(json.dumps({"path": "b/cat.png", "key": "cat"}) + "\n"
                                           + json.dumps({"key": "nopath"}) + "\n")
    out, manifest = build(tmp_path, str(tmp_path / "part-*.jsonl"), config=config)
    assert list(records(out)) == ["cat"]
    failures = pq.read_table(out / "failures").to_pylist()
    reasons = sorted((f["key"], f["stage"], f["reason"], f["class"]) for f in failures)
    assert reasons == [("cat", "read", "duplicate_key", "permanent"),
                       ("nopath", "read", "bad_manifest_row", "permanent")]
    assert manifest["counts"]["inputs"] == 3 == manifest["counts"]["written"] + manifest["counts"]["failed"]
    assert validate.validate(str(out)).ok
    _, again = build(tmp_path, str(tmp_path / "part-*.jsonl"), config=config)
    assert again["shards_this_run"] == 0 and again["counts"]["failed"] == 2   # settled, not redone


def _caption_config(url: str, **limits: float) -> dict:
    return {"segmenter": {"name": "given"}, "regions": {"max_regions": 3, "min_area_frac": 0.0},
            "shards": {"samples_per_shard": 4}, "limits": limits or {},
            "captioner": {"name": "vllm", "model": "fake-vlm", "program": "umg", "endpoints": [url],
                          "client": FAST_CLIENT}}


def test_outage_then_recovery_writes_every_record(tmp_path: Path) -> None:
    outage = FaultConfig(fault_rate=1.0, mix={"http_503": 1})
    with serve_faults(outage) as down:
        with pytest.raises(RunFailed) as stopped:
            build(tmp_path, "synthetic://6?size=64", config=_caption_config(down.base_url))
        url = down.base_url
    message = str(stopped.value)
    assert "caption/http_503" in message and url.split("/v1")[0] in message, message
    out = tmp_path / "out"
    assert not list((out / "shards").glob("*.tar"))      # nothing published as complete
    failures = pq.read_table(out / "failures").to_pylist()
    assert failures and {f["class"] for f in failures} == {"transient"}
    with serve_faults(FaultConfig(deterministic=True)) as up:
        _, manifest = build(tmp_path, "synthetic://6?size=64", config=_caption_config(up.base_url))
        _, clean = build(tmp_path, "synthetic://6?size=64", "clean", _caption_config(up.base_url))
    assert manifest["counts"]["written"] == 6 == clean["counts"]["written"]
    assert not pq.read_table(out / "failures").num_rows
    assert _digests(out) == _digests(tmp_path / "clean")   # the same bytes a clean run writes
    assert validate.validate(str(out)).ok


def test_failure_budget_stops_early_and_the_rerun_continues(tmp_path: Path) -> None:
    outage = FaultConfig(fault_rate=1.0, mix={"http_503": 1})
    config_down = None
    with serve_faults(outage) as down:
        config_down = _caption_config(down.base_url, min_samples=4, window=8, max_transient_fraction=0.5)
        with pytest.raises(RunFailed, match=r"failure budget exceeded: \d+ of the last \d+ inputs"):
            build(tmp_path, "synthetic://40?size=64", config=config_down)
        asked = sum(down.counts.values())
    # stopped early: far fewer requests than 40 images × (1 image + 3 regions) × 2 attempts
    assert asked < 40 * 4 * 2 / 2, asked
    with serve_faults(FaultConfig()) as up:
        _, manifest = build(tmp_path, "synthetic://40?size=64", config=_caption_config(up.base_url))
    assert manifest["counts"]["written"] == 40 and validate.validate(str(tmp_path / "out")).ok


def test_a_run_where_everything_failed_exits_non_zero(tmp_path: Path, config: dict) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image")
    with pytest.raises(RunFailed, match=r"no records written: all 2 inputs failed \(decode/"):
        build(tmp_path, str(folder), config=config)


def test_cli_exit_codes(tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    root = Path(__file__).resolve().parent.parent
    base = [sys.executable, "-m", "pipelines.build_dataset", "--output", str(tmp_path / "out")]
    failed = subprocess.run(base + ["--input", str(folder)], cwd=root, capture_output=True, text=True)
    assert failed.returncode == 1 and "no records written" in failed.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = subprocess.run(base + ["--input", str(empty)], cwd=root, capture_output=True, text=True)
    assert nothing.returncode == 1 and "no images found" in nothing.stderr
    bad = subprocess.run(base + ["--input", str(tmp_path / "absent")], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def _pipeline_bytes(tmp_path: Path, rows: int) -> int:
    manifest = tmp_path / f"list-{rows}.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"img/{i:07d}.jpg"}) + "\n" for i in range(rows)))
    pipeline = build_dataset.create_pipeline(["--input", str(manifest), "--output", str(tmp_path / "out")])
    return len(pipeline.to_runner_api().SerializeToString())


def test_pipeline_size_does_not_grow_with_inputs(tmp_path: Path) -> None:
    small, large = _pipeline_bytes(tmp_path, 100), _pipeline_bytes(tmp_path, 100_000)
    assert abs(large - small) < 256, (small, large)   # only the file name's digits differ


def test_run_settings_do_not_block_a_resume_but_output_settings_do(tmp_path: Path) -> None:
    from settings import ConfigError

    program = tmp_path / "umg-edited.yaml"
    original = (Path(__file__).resolve().parent.parent / "annotators" / "caption" / "programs"
                / "umg.yaml").read_text()
    with serve_faults(FaultConfig()) as one, serve_faults(FaultConfig()) as two:
        config = _caption_config(one.base_url)
        build(tmp_path, "synthetic://3?size=64", config=config)
        # a longer timeout and a second endpoint: the same dataset, the build continues
        config["captioner"]["client"] = dict(FAST_CLIENT, timeout_s=9.0)
        config["captioner"]["endpoints"] = [one.base_url, two.base_url]
        _, manifest = build(tmp_path, "synthetic://4?size=64", config=config)
        assert manifest["counts"]["written"] == 4 and manifest["shards_this_run"] >= 1
        # another prompt changes the output: refused without --overwrite
        edited = original.replace("Describe", "Describe briefly", 1)
        assert edited != original
        program.write_text(edited)
        config["captioner"]["program"] = str(program)
        with pytest.raises(ConfigError, match="other settings"):
            build(tmp_path, "synthetic://4?size=64", config=config)
        _, manifest = build(tmp_path, "synthetic://4?size=64", config=config, extra=["--overwrite"])
    assert manifest["counts"]["written"] == 4 and validate.validate(str(tmp_path / "out")).ok


def test_an_incremental_run_stopped_before_writing_resumes_to_the_same_bytes(
        tmp_path: Path, config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import writer

    folder = tmp_path / "in"
    for i in range(6):
        _photo(folder / f"k{i}.png", i)
    out, _ = build(tmp_path, str(folder), config=config)
    clean, _ = build(tmp_path, str(folder), "clean", config)
    for i in range(6, 9):
        _photo(folder / f"k{i}.png", i)
    real_write = writer.write_shard

    def worker_lost(*args: object) -> dict:
        raise OSError("worker lost (simulated)")

    monkeypatch.setattr(writer, "write_shard", worker_lost)
    with pytest.raises(Exception, match="worker lost"):
        build(tmp_path, str(folder), config=config)
    monkeypatch.setattr(writer, "write_shard", real_write)
    assert list((out / "_work").glob("*/staged/*.pkl"))    # outcomes were staged, not all written
    _, manifest = build(tmp_path, str(folder), config=config)
    build(tmp_path, str(folder), "clean", config)          # the same history, never stopped
    assert manifest["counts"]["written"] == 9 and validate.validate(str(out)).ok
    assert _digests(out) == _digests(clean)
    assert not list((out / "_work").glob("*/staged/*"))
