"""A built dataset in the tools its users already have: webdataset, wids (indexed random access),
Hugging Face datasets (the webdataset builder and ``load_dataset(<folder>)`` through the card's
configs), DuckDB over index/, pycocotools over the COCO export, a PyTorch DataLoader with two
workers — and the card's loading snippets, run as written from the dataset folder."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from annotators.segment import masks as rle
from pipelines import card, export_coco
from tests.conftest import build, records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """8 synthetic images in several shards, with card files and a COCO export; its records."""
    tmp = tmp_path_factory.mktemp("interop")
    out, manifest = build(tmp, "synthetic://8?size=96", config={
        "shards": {"samples_per_shard": 2}, "segmenter": {"name": "classical", "work_side": 96}})
    assert len(manifest["shards"]) >= 2
    card.write(str(out), json.loads((out / "manifest.json").read_text()))
    export_coco.export(out, level="all")
    return out, records(out)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access, and a Hugging Face cache of the test's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _shards(out: Path) -> list[str]:
    return sorted(glob.glob(str(out / "shards" / "*.tar")))


def test_webdataset_reads_every_record(dataset: tuple[Path, dict]) -> None:
    import webdataset as wds

    out, expected = dataset
    ds = wds.WebDataset(_shards(out), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "json")
    seen = {}
    for key, image, record in ds:
        assert image.size == (record["image"]["width"], record["image"]["height"])
        seen[key] = record
    assert seen == expected


def test_wids_random_access(dataset: tuple[Path, dict]) -> None:
    import wids

    out, expected = dataset
    ds = wids.ShardListDataset(str(out / card.WIDS_INDEX), cache_dir=str(out.parent / "wids-cache"))
    assert len(ds) == len(expected)
    for index in (len(ds) - 1, 0, len(ds) // 2, 1):      # out of order on purpose
        sample = ds[index]
        record = sample[".json"]
        assert record == expected[sample["__key__"]]
        image = sample[f".{record['image']['format']}"]
        assert image.size == (record["image"]["width"], record["image"]["height"])
    assert sorted(ds[i]["__key__"] for i in range(len(ds))) == sorted(expected)


def test_hugging_face_webdataset_builder(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    from datasets import load_dataset

    out, expected = dataset
    ds = load_dataset("webdataset", data_files={"train": str(out / "shards" / "*.tar")}, split="train",
                      cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["__key__"]) == sorted(expected)
    row = ds[0]
    assert row["json"]["key"] == row["__key__"]
    assert row["png"].size == (row["json"]["image"]["width"], row["json"]["image"]["height"])


def test_hugging_face_loads_the_folder_through_the_card(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    from datasets import load_dataset

    out, expected = dataset
    front = (out / "README.md").read_text().split("---\n")[1]
    header = yaml.safe_load(front)
    assert header["license"] and header["size_categories"] == ["n<1K"]
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "shards/train-*.tar"}]}]
    ds = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["__key__"]) == sorted(expected)
    regions = load_dataset("parquet", data_files=str(out / "index" / "regions" / "*.parquet"), split="train",
                           cache_dir=str(tmp_path / "cache"))
    assert len(regions) == sum(len(r["regions"]) for r in expected.values())
    assert set(regions["level"]) == {"region", "pixel"}


def test_duckdb_over_the_index_agrees_with_the_shards(dataset: tuple[Path, dict]) -> None:
    import duckdb

    out, expected = dataset
    levels = dict(duckdb.sql(f"SELECT level, count(*) FROM '{out}/index/regions/*.parquet' GROUP BY level")
                  .fetchall())
    assert levels == dict(Counter(r["level"] for rec in expected.values() for r in rec["regions"]))
    rows = duckdb.sql(f"""SELECT i.key, i.caption, i.n_pixel, count(r.region_id) FILTER (r.level = 'pixel')
                          FROM '{out}/index/images/*.parquet' i
                          LEFT JOIN '{out}/index/regions/*.parquet' r USING (key)
                          GROUP BY ALL ORDER BY i.key""").fetchall()
    assert [row[0] for row in rows] == sorted(expected)
    for key, caption, n_pixel, joined in rows:
        record = expected[key]
        assert caption == record["image_level"]["caption"]
        assert n_pixel == joined == sum(r["level"] == "pixel" for r in record["regions"])
    texts = duckdb.sql(f"SELECT key, region_id, caption, parent FROM '{out}/index/regions/*.parquet'").fetchall()
    by_id = {(r[0], r[1]): (r[2], r[3]) for r in texts}
    for key, record in expected.items():
        for region in record["regions"]:
            assert by_id[key, region["id"]] == (region["caption"], region["parent"])


def test_pycocotools_loads_the_export_with_equal_masks(dataset: tuple[Path, dict]) -> None:
    from pycocotools.coco import COCO

    out, expected = dataset
    coco = COCO(str(out / "coco" / "train" / "instances_all.json"))
    assert len(coco.getImgIds()) == len(expected)
    assert len(coco.getAnnIds()) == sum(len(r["regions"]) for r in expected.values())
    for image in coco.loadImgs(coco.getImgIds()):
        record = expected[image["key"]]
        assert (out / "coco" / "train" / "images" / image["file_name"]).is_file()
        assert image["caption"] == record["image_level"]["caption"]
        anns = {a["region_id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))}
        assert set(anns) == {r["id"] for r in record["regions"]}
        for region in record["regions"]:
            ann = anns[region["id"]]
            assert ann["bbox"] == region["bbox"] and ann["caption"] == region["caption"]
            assert ann["tags"] == region["tags"] and ann["parent_region_id"] == region["parent"]
            assert ann["parent_id"] == (anns[region["parent"]]["id"] if region["parent"] else None)
            mask = coco.annToMask(ann).astype(bool)
            if region["mask"]:
                assert np.array_equal(mask, rle.decode(region["mask"])), (image["key"], region["id"])
            else:
                x, y, w, h = (int(v) for v in region["bbox"])
                assert mask[y:y + h, x:x + w].mean() > 0.9



def test_pytorch_dataloader_with_two_workers(dataset: tuple[Path, dict]) -> None:
    """Each worker reads its own shards (webdataset's worker split): every sample exactly once."""
    import torch.utils.data
    import webdataset as wds

    out, expected = dataset
    ds = wds.WebDataset(_shards(out), shardshuffle=False, workersplitter=wds.split_by_worker) \
        .decode("pil").to_tuple("__key__", "json").map(lambda s: (s[0], len(s[1]["regions"])))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = list(loader)
    assert sorted(k for k, _ in got) == sorted(expected)
    assert dict(got) == {k: len(r["regions"]) for k, r in expected.items()}


def _snippets(text: str) -> list[tuple[str, str]]:
    loading = text.split("## Loading", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", loading, flags=re.S)


@pytest.mark.slow
def test_card_snippets_run_as_written(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, expected = dataset
    snippets = _snippets((out / "README.md").read_text())
    assert [lang for lang, _ in snippets] == ["python"] * 4 + ["bash", "python"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for lang, code in snippets:
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euc", code]
        run = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{lang} snippet failed:\n{code}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert (out / "coco" / "train" / "instances_pixel.json").is_file()


def test_card_describes_the_build(dataset: tuple[Path, dict]) -> None:
    out, expected = dataset
    text = (out / "README.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    stats = card.dataset_stats(str(out))
    for name in card.PLOTS.values():
        assert f"]({name})" in text and (out / name).stat().st_size > 5000
    assert manifest["settings_hash"] in text and "captioner: `attributes`" in text
    lengths = [len(r["long_caption"]) for rec in expected.values() for r in rec["regions"]
               if r["level"] == "pixel"]
    assert stats["text_chars"]["pixel"]["long_caption"]["count"] == len(lengths)
    assert stats["text_chars"]["pixel"]["long_caption"]["max"] == max(lengths)
    tags = Counter(t for rec in expected.values() for t in rec["image_level"]["tags"])
    assert stats["top_tags"]["image"][0] == [min(tags, key=lambda t: (-tags[t], t)), max(tags.values())]
    assert "No failures." in text
