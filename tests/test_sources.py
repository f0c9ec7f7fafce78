"""Input enumeration and shard assignment on small trees, manifests and tars made in tmp_path."""
from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from annotators.base import ConfigError
from pipelines.decode import read_bytes
from pipelines.sources import assign_shards, enumerate_inputs
from pipelines.types import ImageRef

KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _png(colour=(10, 20, 30), size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png() if data is None else data)
    return path


def _by_uri(refs: list[ImageRef]) -> dict[str, ImageRef]:
    return {ref.uri: ref for ref in refs}


# --------------------------------------------------------------------------- files


def test_directory_is_recursive_case_insensitive_and_skips_non_images(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ["top.JPG", "sub/mid.Png", "sub/deeper/low.jpeg", "sub/x.webp"]:
        _write(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.json").write_text("{}")
    refs = enumerate_inputs(str(root))
    keys = {Path(ref.uri).relative_to(root).as_posix(): ref.key for ref in refs}
    assert keys == {"top.JPG": "top", "sub/mid.Png": "sub_mid", "sub/deeper/low.jpeg": "sub_deeper_low",
                    "sub/x.webp": "sub_x"}
    assert all(ref.loader == {"kind": "file", "path": ref.uri} for ref in refs)


def test_keys_are_safe(tmp_path: Path) -> None:
    for name in ["a b+c.png", "ünï cødé.png", "(1).jpg", "dir.with.dots/x.y.png"]:
        _write(tmp_path / name)
    refs = enumerate_inputs(str(tmp_path))
    assert len(refs) == 4
    assert all(KEY.match(ref.key) for ref in refs)
    assert _by_uri(refs)[str(tmp_path / "dir.with.dots/x.y.png")].key == "dir_with_dots_x_y"


def test_colliding_keys_become_unique_deterministically(tmp_path: Path) -> None:
    for name in ["a b.png", "a_b.png", "a-b.png", "sub/c.png", "sub_c.png"]:
        _write(tmp_path / name)
    first = {ref.uri: ref.key for ref in assign_shards(enumerate_inputs(str(tmp_path)), 10, "train")}
    refs = enumerate_inputs(str(tmp_path))
    random.Random(0).shuffle(refs)
    second = {ref.uri: ref.key for ref in assign_shards(refs, 10, "train")}
    assert first == second
    assert len(set(first.values())) == 5
    assert all(KEY.match(key) for key in first.values())
    assert first[str(tmp_path / "a-b.png")] == "a-b"            # no collision: left alone
    assert first[str(tmp_path / "a b.png")].startswith("a_b-")
    assert first[str(tmp_path / "a_b.png")].startswith("a_b-")


def test_glob(tmp_path: Path) -> None:
    for name in ["img1.png", "img2.jpg", "other.png", "sub/img3.png"]:
        _write(tmp_path / name)
    refs = enumerate_inputs(str(tmp_path / "img*"))
    assert sorted(ref.key for ref in refs) == ["img1", "img2"]
    refs = enumerate_inputs(str(tmp_path / "*.png"))
    assert sorted(ref.key for ref in refs) == ["img1", "other"]


def test_single_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "deep" / "One Photo.PNG")
    [ref] = enumerate_inputs(str(path))
    assert ref.key == "One_Photo" and ref.uri == str(path)
    assert read_bytes(ref, 10**6)[0] == path.read_bytes()


# --------------------------------------------------------------------------- manifests

BOXES = [[1, 2, 10, 12], [5, 5, 20, 20]]
MASKS = [{"size": [40, 40], "counts": "abc"}]


def _manifest_images(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "cat.png")
    _write(tmp_path / "images" / "dog.png")


def _check_manifest_refs(refs: list[ImageRef], tmp_path: Path) -> None:
    assert len(refs) == 2
    cat, dog = refs
    assert cat.uri == str(tmp_path / "images" / "cat.png")
    assert cat.key == "cat-01" and cat.dataset == "pets"
    assert cat.given == {"boxes": BOXES, "masks": MASKS}
    assert dog.key == "dog" and dog.dataset is None and dog.given is None
    assert read_bytes(cat, 10**6)[0] == (tmp_path / "images" / "cat.png").read_bytes()


def test_jsonl_manifest(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.jsonl"
    rows = [{"path": "images/cat.png", "key": "cat-01", "dataset": "pets", "boxes": BOXES, "masks": MASKS},
            {"path": str(tmp_path / "images" / "dog.png")}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    _check_manifest_refs(enumerate_inputs(str(manifest)), tmp_path)


def test_csv_manifest_cells_hold_json(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "key", "dataset", "boxes", "masks"])
        writer.writeheader()
        writer.writerow({"path": "images/cat.png", "key": "cat-01", "dataset": "pets",
                         "boxes": json.dumps(BOXES), "masks": json.dumps(MASKS)})
        writer.writerow({"path": "images/dog.png", "key": "", "dataset": "", "boxes": "", "masks": ""})
    _check_manifest_refs(enumerate_inputs(str(manifest)), tmp_path)


def test_parquet_manifest(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.parquet"
    table = pa.table({
        "path": ["images/cat.png", "images/dog.png"],
        "key": ["cat-01", None],
        "dataset": ["pets", None],
        "boxes": [BOXES, None],
        "masks": [MASKS, None],
    })
    pq.write_table(table, manifest)
    _check_manifest_refs(enumerate_inputs(str(manifest)), tmp_path)


def test_manifest_numeric_keys_are_kept(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "images/cat.png", "key": 0}) + "\n"
                        + json.dumps({"path": "images/dog.png", "key": 1}) + "\n")
    assert [ref.key for ref in enumerate_inputs(str(manifest))] == ["0", "1"]


def test_manifest_row_without_path_names_the_row(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "images/cat.png"}) + "\n" + json.dumps({"key": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"--input: .*list\.jsonl row 2 has no 'path'"):
        enumerate_inputs(str(manifest))


def test_missing_manifest_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input"):
        enumerate_inputs(str(tmp_path / "absent.csv"))


# --------------------------------------------------------------------------- tars


def test_webdataset_tar_members_read_back_exactly(tmp_path: Path) -> None:
    payloads = {"000000": _png((255, 0, 0)), "000001": _png((0, 255, 0), (48, 40))}
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "000000", "png": payloads["000000"], "json": {"caption": "red"}})
        writer.write({"__key__": "000001", "jpg": payloads["000001"], "txt": "green"})
    refs = enumerate_inputs(str(path))
    assert sorted(ref.key for ref in refs) == ["shard-000000_000000", "shard-000000_000001"]
    for ref in refs:
        assert ref.loader["kind"] == "tar" and ref.loader["path"] == str(path)
        data, truth = read_bytes(ref, 10**6)
        assert data == payloads[ref.key.rsplit("_", 1)[1]] and truth is None


def test_tar_glob_with_subfolder_members(tmp_path: Path) -> None:
    for index in range(2):
        with tarfile.open(tmp_path / f"part-{index}.tar", "w") as tar:
            for name, payload in [("imgs/a.png", _png((index, 0, 0))), ("imgs/a.txt", b"caption")]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    refs = enumerate_inputs(str(tmp_path / "part-*.tar"))
    assert sorted(ref.key for ref in refs) == ["part-0_imgs_a", "part-1_imgs_a"]
    for ref in refs:
        index = int(ref.key[5])
        assert read_bytes(ref, 10**6)[0] == _png((index, 0, 0))


# --------------------------------------------------------------------------- built-in sources


def test_samples_are_bundled_photographs() -> None:
    refs = enumerate_inputs("samples")
    keys = {ref.key for ref in refs}
    assert len(refs) >= 10 and {"astronaut", "coffee", "chelsea", "rocket"} <= keys
    assert all(ref.dataset == "skimage-samples" and Path(ref.loader["path"]).is_file() for ref in refs)
    astronaut = next(ref for ref in refs if ref.key == "astronaut")
    assert Image.open(io.BytesIO(read_bytes(astronaut, 10**7)[0])).size == (512, 512)


def test_synthetic_spec() -> None:
    refs = enumerate_inputs("synthetic://5?seed=3&size=64")
    assert len(refs) == 5 and len({ref.key for ref in refs}) == 5
    assert all(ref.loader == {"kind": "synthetic", "seed": 3, "index": i, "size": 64}
               for i, ref in enumerate(refs))
    assert Image.open(io.BytesIO(read_bytes(refs[0], 10**6)[0])).size == (64, 64)


@pytest.mark.parametrize("spec", ["synthetic://many", "synthetic://0", "synthetic://5?seed=x",
                                  "synthetic://5?size=8", "synthetic://"])
def test_bad_synthetic_spec_is_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="--input"):
        enumerate_inputs(spec)


def test_missing_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input.*does not exist"):
        enumerate_inputs(str(tmp_path / "nowhere"))


def test_directory_without_images_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(ConfigError, match="--input: no images found"):
        enumerate_inputs(str(tmp_path))


# --------------------------------------------------------------------------- shards


def _refs(keys: list[str]) -> list[ImageRef]:
    return [ImageRef(key, f"/data/{key}.png", {"kind": "file", "path": f"/data/{key}.png"}) for key in keys]


def test_assign_shards_sorts_and_names_shards() -> None:
    refs = assign_shards(_refs(["e", "b", "a", "d", "c"]), 2, "val")
    assert [ref.key for ref in refs] == ["a", "b", "c", "d", "e"]
    assert [ref.shard for ref in refs] == ["val-000000", "val-000000", "val-000001", "val-000001",
                                           "val-000002"]


def test_assign_shards_makes_keys_unique() -> None:
    refs = _refs(["x", "y"]) + [ImageRef("x", "/other/x.png", {"kind": "file", "path": "/other/x.png"})]
    refs.append(ImageRef("y", "/data/y.png", {"kind": "file", "path": "/data/y.png"}))   # listed twice
    keys = [ref.key for ref in assign_shards(refs, 100, "train")]
    assert len(set(keys)) == 4 and keys == sorted(keys)
    assert all(KEY.match(key) for key in keys)


def test_assign_shards_ignores_input_order() -> None:
    keys = [f"img{i:03d}" for i in range(23)] + ["dup", "dup"]
    baseline = [(r.uri, r.key, r.shard) for r in assign_shards(_refs(keys), 4, "train")]
    for seed in range(3):
        shuffled = _refs(keys)
        random.Random(seed).shuffle(shuffled)
        assert [(r.uri, r.key, r.shard) for r in assign_shards(shuffled, 4, "train")] == baseline
    assert baseline[-1][2] == "train-000006"
