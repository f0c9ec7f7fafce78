"""End to end with the real Beam runner: accounting, validation, loading, determinism, resume."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotators.segment import masks
from pipelines import validate
from settings import ConfigError
from schemas import region_provenance
from tests.conftest import build, records

pytestmark = pytest.mark.slow


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _bad_inputs(root: Path) -> dict[str, str]:
    """A directory of good and bad inputs; returns expected outcome per key."""
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    good[10:40, 10:50] = (200, 30, 30)
    (root / "sub").mkdir(parents=True)
    (root / "good.png").write_bytes(_png(good))
    (root / "sub" / "copy.PNG").write_bytes(_png(good))                  # duplicate of good
    jpeg = io.BytesIO()
    Image.fromarray(good).save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not an image")
    (root / "tiny.png").write_bytes(_png(good[:8, :8]))
    cmyk = io.BytesIO()
    Image.fromarray(good).convert("CMYK").save(cmyk, format="JPEG")
    (root / "cmyk.jpg").write_bytes(cmyk.getvalue())
    deep = io.BytesIO()
    Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)).save(deep, format="PNG")
    (root / "deep16.png").write_bytes(deep.getvalue())
    (root / "notes.txt").write_text("ignored: not an image extension")
    return {"good": "ok", "sub_copy": "dedup/duplicate", "truncated": "decode/truncated",
            "empty": "decode/empty_file", "text": "decode/not_an_image", "tiny": "decode/too_small",
            "cmyk": "ok", "deep16": "ok"}


def test_every_input_is_accounted_for(tmp_path: Path, fast_config: dict) -> None:
    expected = _bad_inputs(tmp_path / "in")
    out, manifest = build(tmp_path, str(tmp_path / "in"), config=fast_config)
    report = validate.validate(str(out))
    assert report.ok, report.text()
    got = records(out)
    failures = pq.read_table(out / "failures").to_pylist()
    outcome = {k: "ok" for k in got}
    outcome.update({f["key"]: f"{f['stage']}/{f['reason']}" for f in failures if f["region_id"] is None})
    assert outcome == expected
    assert manifest["counts"]["inputs"] == len(expected) == manifest["counts"]["written"] + manifest["counts"]["failed"]
    assert manifest["counts"]["failed_by_reason"]["dedup/duplicate"] == 1
    dup = next(f for f in failures if f["reason"] == "duplicate")
    assert "'good'" in dup["detail"] and dup["source"].endswith("copy.PNG")
    assert got["cmyk"]["image"]["source_mode"] == "CMYK"
    assert got["deep16"]["image"]["source_mode"].startswith("I")


def test_outputs_load_everywhere_and_masks_match(tmp_path: Path, fast_config: dict) -> None:
    out, manifest = build(tmp_path, "synthetic://6?size=96", config=fast_config)
    assert validate.validate(str(out)).ok
    import webdataset as wds

    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)
                   .decode("pil").to_tuple("__key__", "png", "json"))
    assert len(samples) == 6 == manifest["counts"]["written"]
    n_masks = 0
    for _key, image, record in samples:
        assert image.size == (record["image"]["width"], record["image"]["height"])
        for region in record["regions"]:
            if region["mask"] is None:
                continue
            m = masks.decode(region["mask"])
            ys, xs = np.nonzero(m)
            assert region["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert region["area"] == m.sum()
            n_masks += 1
    assert n_masks > 6
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": str(out / "shards" / "*.tar")}, split="train",
                      cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 6 and {"png", "json"} <= set(ds.column_names)
    assert ds[0]["json"]["schema_version"] == "3"
    images = pq.read_table(out / "index" / "images")
    assert images.num_rows == 6 and manifest["counts"]["regions_by_level"]["pixel"] == n_masks


def test_provenance_is_stored_once_per_record_and_indexed_by_id(tmp_path: Path, fast_config: dict) -> None:
    out, manifest = build(tmp_path, "synthetic://4?size=96", config=fast_config)
    index = pq.read_table(out / "index" / "regions").to_pylist()
    by_region = {(row["key"], row["region_id"]): row for row in index}
    seen_ids: dict[str, dict] = {}
    for key, record in records(out).items():
        table = record["provenance"]["annotators"]
        text = json.dumps(record, sort_keys=True)
        for pid, provenance in table.items():
            # each distinct provenance is in the record once, and the same id means the same
            # provenance in every record
            assert text.count(json.dumps(provenance, sort_keys=True)) == 1
            assert seen_ids.setdefault(pid, provenance) == provenance
        assert len(table) < len(record["regions"])
        for region in record["regions"]:
            row = by_region[(key, region["id"])]
            assert (row["segmenter_provenance"], row["captioner_provenance"]) == (
                region["provenance"]["segmenter"], region["provenance"]["captioner"])
            assert region_provenance(record, region)["segmenter"]["name"] == "classical"
    images = pq.read_table(out / "index" / "images").to_pylist()
    assert {row["captioner_provenance"] for row in images} <= set(seen_ids)
    assert manifest["annotators"]["captioner"]["name"] == "attributes"


def test_workers_give_identical_shards(tmp_path: Path, fast_config: dict) -> None:
    out1, m1 = build(tmp_path, "synthetic://8?size=64", "one", fast_config)
    out2, m2 = build(tmp_path, "synthetic://8?size=64", "two", fast_config, ["--workers", "2"])
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) == 2
    for shard in m1["shards"]:
        assert (out1 / "shards" / shard["name"]).read_bytes() == (out2 / "shards" / shard["name"]).read_bytes()
    for one in sorted((out1 / "index" / "regions").glob("*.parquet")):
        assert one.read_bytes() == (out2 / "index" / "regions" / one.name).read_bytes()
    assert m2["beam_counters_this_run"]["dataset/written"] == 8   # counters add up across processes


def test_resume_rebuilds_only_missing_shards(tmp_path: Path, fast_config: dict) -> None:
    out, first = build(tmp_path, "synthetic://8?size=64", config=fast_config)
    kept_name, lost_name = (s["name"] for s in first["shards"])
    kept = out / "shards" / kept_name
    kept_mtime = kept.stat().st_mtime_ns
    lost = out / "shards" / lost_name
    original = lost.read_bytes()
    # killed while writing: a partial tar under the final name, no completion marker
    lost.write_bytes(original[:1000])
    (out / "_work" / lost_name[:-4] / "stats.json").unlink()
    (out / "_work" / lost_name[:-4] / "members.parquet").unlink()
    (out / "shards" / f"{lost_name}.tmp-deadbeef").write_bytes(b"partial")
    _, second = build(tmp_path, "synthetic://8?size=64", config=fast_config)
    assert second["shards_this_run"] == 1
    assert kept.stat().st_mtime_ns == kept_mtime       # the complete shard was skipped
    assert lost.read_bytes() == original                # the broken one was rebuilt, same bytes
    assert not list((out / "shards").glob("*.tmp-*"))
    assert validate.validate(str(out)).ok
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def test_other_settings_refuse_to_mix(tmp_path: Path, fast_config: dict) -> None:
    out, _ = build(tmp_path, "synthetic://2?size=64", config=fast_config)
    other = dict(fast_config, regions={"max_regions": 3})
    with pytest.raises(ConfigError, match="--output"):
        build(tmp_path, "synthetic://2?size=64", config=other)
    _, manifest = build(tmp_path, "synthetic://2?size=64", config=other, extra=["--overwrite"])
    assert manifest["shards_this_run"] == len(manifest["shards"]) and validate.validate(str(out)).ok


def test_validate_catches_broken_outputs(tmp_path: Path, fast_config: dict) -> None:
    out, _ = build(tmp_path, "synthetic://3?size=64", config=fast_config)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = next((broken / "shards").glob("*.tar"))
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name.endswith(".json"):
                record = json.loads(data)
                record["regions"][-1]["area"] += 5
                data = json.dumps(record).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = validate.validate(str(broken))
    assert not report.ok
    text = report.text()
    assert "sha256/size differ" in text and "differs from the mask's" in text and "area" in text
    next((broken / "index" / "images").glob("*.parquet")).unlink()
    assert "unreadable" in validate.validate(str(broken)).text()


def test_bad_settings_stop_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"segmenter.name: unknown segmenter 'nope'"):
        build(tmp_path, "synthetic://2", config={"segmenter": {"name": "nope"}})
    with pytest.raises(ConfigError, match=r"decode.max_sid: unknown setting; did you mean 'max_side'"):
        build(tmp_path, "synthetic://2", config={"decode": {"max_sid": 5}})
    with pytest.raises(ConfigError, match=r"--input: '.*missing' does not exist"):
        build(tmp_path, str(tmp_path / "missing"))
    assert not (tmp_path / "out").exists()


def test_beam_counters_mirror_the_manifest(tmp_path: Path, fast_config: dict) -> None:
    expected = _bad_inputs(tmp_path / "in")
    _, manifest = build(tmp_path, str(tmp_path / "in"), config=fast_config)
    counters = manifest["beam_counters_this_run"]
    assert counters["dataset/written"] == manifest["counts"]["written"]
    by_reason = manifest["counts"]["failed_by_reason"]
    # duplicates are found from hashes before the images are read for work
    assert counters["dataset/read"] == len(expected) - by_reason.get("read/read_error", 0) \
        - by_reason["dedup/duplicate"]
    for key, count in manifest["counts"]["failed_by_reason"].items():
        assert counters[f"failures/{key.replace('/', '.')}"] == count
    assert counters["regions/pixel"] == manifest["counts"]["regions_by_level"]["pixel"]


def test_segmenter_provenance_comes_from_the_worker(tmp_path: Path, fast_config: dict) -> None:
    """Provenance names what the worker set up (e.g. its device), not what the driver guessed."""
    import os

    config = dict(fast_config, segmenter={"name": "tests.plugins:WhereSegmenter", "work_side": 96})
    out, manifest = build(tmp_path, "synthetic://6?size=64", config=config, extra=["--workers", "2"])
    devices = {region_provenance(rec, r)["segmenter"]["device"] for rec in records(out).values()
               for r in rec["regions"]}
    assert manifest["annotators"]["segmenter"]["device"] == "not set up"   # the driver's view
    assert devices and all(d.startswith("worker-") for d in devices), devices
    assert f"worker-{os.getpid()}" not in devices                          # not this process


def test_a_build_freezes_its_start_up_heap_once(tmp_path: Path) -> None:
    """The worker's first stage moves what is alive at start-up (modules, Beam's graph) out of
    the garbage collector's generations, once per process (``stages.settle_heap``)."""
    import subprocess
    import sys

    code = """
import gc, runpy, sys
calls = []
real = gc.freeze
gc.freeze = lambda: (calls.append(1), real())
sys.argv = ["build_dataset", "--input", "synthetic://3", "--output", sys.argv[1], "--no-progress"]
try:
    runpy.run_module("pipelines.build_dataset", run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print(len(calls), gc.get_freeze_count())
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    calls, frozen = (int(v) for v in out.stdout.split()[-2:])
    assert calls == 1 and frozen > 10_000
    assert (tmp_path / "out" / "manifest.json").exists()
