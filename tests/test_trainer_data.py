"""The trainer's data stream: shard lists, sample decoding, determinism, splitting, bad input,
and the resume position."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from trainer.data import DataPosition, RegionStream, StreamSpec, expand_urls, make_loader, split_holdout
from trainer.samples import SampleOptions, build_example, region_mask
from trainer.testing import make_sample, write_shards
from trainer.text import ClipTokenizer

OPTS = SampleOptions(image_size=32, regions_per_image=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    import open_clip

    return ClipTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=248))


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    return [str(p) for p in write_shards(tmp_path / "ds" / "shards", shards=6, per_shard=4)]


def _spec(urls: list[str], **kw: Any) -> StreamSpec:
    return StreamSpec(urls=urls, options=kw.pop("options", OPTS), batch_size=kw.pop("batch_size", 4), **kw)


def _keys(batches: Any) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_expand_urls_accepts_folders_globs_braces_and_fsspec(shards: list[str], tmp_path: Path) -> None:
    root = tmp_path / "ds"
    assert expand_urls([str(root)]) == shards                     # pipeline output folder
    assert expand_urls([str(root / "shards")]) == shards          # folder of tars
    assert expand_urls([str(root / "shards" / "*.tar")]) == shards
    assert expand_urls([str(root / "shards" / "train-{000000..000002}.tar")]) == shards[:3]
    assert expand_urls([shards[1], shards[0], shards[1]]) == shards[:2]   # sorted, unique
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/a-000.tar", Path(shards[0]).read_bytes())
    assert expand_urls(["memory://bucket/*.tar"]) == [memory.unstrip_protocol("/bucket/a-000.tar")]
    with pytest.raises(FileNotFoundError):
        expand_urls([str(tmp_path / "missing")])
    assert split_holdout(shards, 2) == (shards[:4], shards[4:])


def test_streams_from_an_fsspec_url(shards: list[str], tokenizer: ClipTokenizer) -> None:
    fsspec.filesystem("memory").pipe("/stream/x-000.tar", Path(shards[0]).read_bytes())
    batches = list(make_loader(_spec(["memory://stream/x-000.tar"], train=False), tokenizer, workers=0))
    assert _keys(batches) == [f"s000-{i:04d}" for i in range(4)]


def test_sample_decoding_masks_boxes_crops_and_cap() -> None:
    sample = make_sample("k", np.random.default_rng(0), size=48, n_masks=3)
    record = json.loads(sample["json"])
    pixel, box = record["regions"][1], record["regions"][0]
    decoded = region_mask(pixel, 48, 48)
    assert decoded.sum() == pixel["area"]
    assert np.array_equal(decoded, mask_utils.decode({"size": [48, 48], "counts": pixel["mask"]["counts"].encode()}))
    box_mask = region_mask(box, 48, 48)                         # a box region: its box is its mask
    assert box_mask.sum() == 24 * 24 and box_mask[:24, :24].all()
    full = build_example(sample, SampleOptions(image_size=32, regions_per_image=10))
    assert len(full["long"]) == 4 and set(full["levels"]) == {"pixel", "region"}
    assert full["image"].shape == (3, 32, 32) and full["image"].dtype == np.uint8
    assert full["region_masks"].shape == (4, 1, 32, 32) and full["crops"].shape == (4, 3, 32, 32)
    index = full["long"].index(box["long_caption"])            # box mask after the 48 → 32 letterbox
    box_in = full["region_masks"][index, 0]
    assert box_in[:15, :15].min() == 255 and box_in[17:].max() == 0 and box_in[:, 17:].max() == 0
    capped = build_example(sample, OPTS)
    assert len(capped["long"]) == 2
    assert capped["long"] == build_example(sample, OPTS)["long"]           # seeded choice
    only_pixels = build_example(sample, SampleOptions(32, 10, levels=("pixel",)))
    assert set(only_pixels["levels"]) == {"pixel"}


def test_seeded_stream_is_deterministic_across_workers(shards: list[str], tokenizer: ClipTokenizer) -> None:
    def run(seed: int) -> list[str]:
        spec = _spec(shards, train=True, seed=seed, shuffle_buffer=8)
        return _keys(itertools.islice(make_loader(spec, tokenizer, workers=2), 8))

    first = run(0)
    assert run(0) == first
    assert run(1) != first
    assert first != sorted(first)                               # shuffled


def test_split_by_node_and_worker_partition_the_shards(shards: list[str], tokenizer: ClipTokenizer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_loader(_spec(shards, train=True, seed=0), tokenizer, workers=2)
        seen.append({k.split("-")[0] for k in _keys(itertools.islice(loader, 3))})   # 3 shards/rank/epoch
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"s{i:03d}" for i in range(6)}


def _bad_samples() -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    bad_image = make_sample("bad_image", rng) | {"png": b"\x89PNG not really"}
    bad_json = make_sample("bad_json", rng) | {"json": b"{not json"}
    record = json.loads(make_sample("bad_mask", rng)["json"])
    record["regions"][1]["mask"]["size"] = [10, 10]
    bad_mask = make_sample("bad_mask", rng) | {"json": json.dumps(record).encode()}
    no_image = {k: v for k, v in make_sample("no_image", rng).items() if k != "png"}
    return [bad_image, bad_json, bad_mask, no_image]


def test_corrupt_input_is_counted_logged_and_skipped(tmp_path: Path, tokenizer: ClipTokenizer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, shards=2, per_shard=3, extra={0: _bad_samples()})
    whole = write_shards(tmp_path / "src", shards=1, per_shard=4, prefix="t")[0].read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(whole[: len(whole) // 2])     # truncated tar
    (tmp_path / "train-000003.tar").write_bytes(b"this is not a tar file" * 50)
    urls = expand_urls([str(tmp_path / "*.tar")])
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        batches = list(make_loader(_spec(urls, train=False, batch_size=2), tokenizer, workers=0))
    keys = _keys(batches)
    good = {f"s{s:03d}-{i:04d}" for s in range(2) for i in range(3)}
    assert good <= set(keys) and len(keys) == len(set(keys))
    assert set(keys) - good <= {f"t000-{i:04d}" for i in range(4)}            # what the cut left
    errors = batches[-1]["errors"]
    assert errors["sample/UnidentifiedImageError"] == 1                       # bad image bytes
    assert errors["sample/JSONDecodeError"] == 1                              # bad record
    assert errors["sample/ValueError"] == 1                                   # mask size ≠ image
    assert errors["sample/KeyError"] >= 1                                     # no image member
    # truncated + not a tar; a tar cut inside a member's data raises twice (member, then end)
    assert 2 <= errors["read/ReadError"] <= 3
    read_errors = [r.getMessage() for r in caplog.records if "read/ReadError" in r.getMessage()]
    assert any("train-000002.tar" in m for m in read_errors) and any("train-000003.tar" in m for m in read_errors)
    assert "skipped bad input (sample/JSONDecodeError" in caplog.text


def test_a_stream_of_only_bad_samples_stops_with_a_clear_error(tmp_path: Path, tokenizer: ClipTokenizer) -> None:
    write_shards(tmp_path, shards=1, per_shard=0, extra={0: _bad_samples() * 3})
    spec = _spec([str(tmp_path / "train-000000.tar")], train=True, max_consecutive_errors=10)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(RegionStream(spec, tokenizer)))


def test_position_reports_each_shard_once_after_its_last_sample(shards: list[str],
                                                                 tokenizer: ClipTokenizer) -> None:
    spec = _spec(shards, train=True, seed=3, shuffle_buffer=10, batch_size=3)
    seen: set[str] = set()
    done: list[tuple[int, str]] = []
    for batch in itertools.islice(RegionStream(spec, tokenizer), 16):     # two epochs of 24 images
        seen.update(batch["keys"])
        for epoch, url in batch["shards_done"]:
            if epoch == 0:       # every sample of a reported shard has been delivered
                prefix = "s" + Path(url).stem.split("-")[1][-3:]
                assert {f"{prefix}-{i:04d}" for i in range(4)} <= seen
            done.append((epoch, url))
    assert sorted(u for e, u in done if e == 0) == shards


def test_position_resume_skips_consumed_shards(shards: list[str], tokenizer: ClipTokenizer) -> None:
    position = DataPosition(shards)
    stream = iter(RegionStream(_spec(shards, train=True, seed=0, batch_size=4), tokenizer))
    first = [next(stream) for _ in range(2)]                    # batch = one shard, no shuffle
    for batch in first:
        position.update(batch)
    consumed = {u for urls in position.consumed.values() for u in urls}
    assert len(consumed) == 2
    state = json.loads(json.dumps(position.state()))             # survives a checkpoint
    restored = DataPosition.from_state(state, shards)
    resumed = RegionStream(_spec(shards, train=True, seed=0, **restored.stream_args()), tokenizer)
    rest = _keys(itertools.islice(iter(resumed), 4))
    assert not set(rest) & set(_keys(first))
    assert len(set(rest)) == 16
    assert DataPosition.from_state(state, shards[:-1]).consumed == {}       # shard list changed


def test_position_merges_processes_and_folds_complete_epochs(shards: list[str]) -> None:
    ranks = [DataPosition(shards), DataPosition(shards)]
    for i, url in enumerate(shards):
        ranks[i % 2].update({"shards_done": [(0, url)], "worker": 0, "errors": {"read/X": i}})
    ranks[0].update({"shards_done": [(1, shards[0])], "worker": 0, "errors": {"read/X": 1}})
    merged = ranks[0].merged_state([r.run_state() for r in ranks])
    assert merged["start_epoch"] == 1 and merged["consumed"] == {"1": [shards[0]]}
    assert merged["errors"] == {"read/X": 1 + 5}                # each process's latest counts
    assert DataPosition.from_state(merged, shards).epoch() == pytest.approx(1 + 1 / 6)


def test_loader_bench_runs(tmp_path: Path) -> None:
    """bench/loader_bench.py end to end on tiny shards (the figure itself is not asserted)."""
    from bench import loader_bench

    assert loader_bench.main(["--smoke", "--json", str(tmp_path / "bench.json")]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())["loader"]
    assert report["images"] == report["trainer_images"] == 12
    assert report["ratio"] > 0 and report["target_ratio"] == 0.8
