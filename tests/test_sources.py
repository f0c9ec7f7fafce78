"""Input listing (the functions ReadInputs runs in workers) and the shard layout, on small trees,
manifests and tars made in tmp_path."""
from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines import layout
from pipelines.decode import read_bytes
from pipelines.plan import FAILED, PRESENT, VANISHED, decide
from pipelines.sources import list_inputs
from pipelines.types import ImageRef
from settings import ConfigError

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
    refs = list_inputs(str(root))
    keys = {Path(ref.uri).relative_to(root).as_posix(): ref.key for ref in refs}
    assert keys == {"top.JPG": "top", "sub/mid.Png": "sub_mid", "sub/deeper/low.jpeg": "sub_deeper_low",
                    "sub/x.webp": "sub_x"}
    assert all(ref.loader == {"kind": "file", "path": ref.uri} for ref in refs)


def test_keys_are_safe(tmp_path: Path) -> None:
    for name in ["a b+c.png", "ünï cødé.png", "(1).jpg", "dir.with.dots/x.y.png"]:
        _write(tmp_path / name)
    refs = list_inputs(str(tmp_path))
    assert len(refs) == 4
    assert all(KEY.match(ref.key) for ref in refs)
    assert _by_uri(refs)[str(tmp_path / "dir.with.dots/x.y.png")].key == "dir_with_dots_x_y"


def test_colliding_keys_are_kept_as_derived(tmp_path: Path) -> None:
    """A key depends on its input alone: colliding names keep the same key (the plan then makes
    all but one a duplicate_key failure row), so adding a file never renames another."""
    for name in ["a b.png", "a_b.png", "a-b.png"]:
        _write(tmp_path / name)
    first = {ref.uri: ref.key for ref in list_inputs(str(tmp_path))}
    _write(tmp_path / "a+b.png")
    second = {ref.uri: ref.key for ref in list_inputs(str(tmp_path))}
    assert {u: k for u, k in second.items() if u in first} == first
    assert first[str(tmp_path / "a b.png")] == first[str(tmp_path / "a_b.png")] == "a_b"
    assert first[str(tmp_path / "a-b.png")] == "a-b"


def test_glob(tmp_path: Path) -> None:
    for name in ["img1.png", "img2.jpg", "other.png", "sub/img3.png"]:
        _write(tmp_path / name)
    refs = list_inputs(str(tmp_path / "img*"))
    assert sorted(ref.key for ref in refs) == ["img1", "img2"]
    refs = list_inputs(str(tmp_path / "*.png"))
    assert sorted(ref.key for ref in refs) == ["img1", "other"]


def test_single_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "deep" / "One Photo.PNG")
    [ref] = list_inputs(str(path))
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
    _check_manifest_refs(list_inputs(str(manifest)), tmp_path)


def test_csv_manifest_cells_hold_json(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "key", "dataset", "boxes", "masks"])
        writer.writeheader()
        writer.writerow({"path": "images/cat.png", "key": "cat-01", "dataset": "pets",
                         "boxes": json.dumps(BOXES), "masks": json.dumps(MASKS)})
        writer.writerow({"path": "images/dog.png", "key": "", "dataset": "", "boxes": "", "masks": ""})
    _check_manifest_refs(list_inputs(str(manifest)), tmp_path)


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
    _check_manifest_refs(list_inputs(str(manifest)), tmp_path)


def test_manifest_numeric_keys_are_kept(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "images/cat.png", "key": 0}) + "\n"
                        + json.dumps({"path": "images/dog.png", "key": 1}) + "\n")
    assert [ref.key for ref in list_inputs(str(manifest))] == ["0", "1"]


def test_manifest_row_without_path_becomes_a_named_failure(tmp_path: Path) -> None:
    _manifest_images(tmp_path)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": "images/cat.png"}) + "\n" + json.dumps({"key": "x"}) + "\n"
                        + "{not json\n")
    refs = list_inputs(str(manifest))
    kinds = {ref.key: ref.loader for ref in refs}
    assert kinds["cat"]["kind"] == "file"
    assert kinds["x"]["kind"] == "invalid" and kinds["x"]["reason"] == "bad_manifest_row"
    assert "no 'path'" in kinds["x"]["detail"]
    [broken] = [ref for ref in refs if ref.key.startswith("list_jsonl-line")]
    assert broken.loader["reason"] == "bad_manifest_row" and "not JSON" in broken.loader["detail"]


def test_missing_manifest_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input"):
        list_inputs(str(tmp_path / "absent.csv"))


# --------------------------------------------------------------------------- tars


def test_webdataset_tar_members_read_back_exactly(tmp_path: Path) -> None:
    payloads = {"000000": _png((255, 0, 0)), "000001": _png((0, 255, 0), (48, 40))}
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "000000", "png": payloads["000000"], "json": {"caption": "red"}})
        writer.write({"__key__": "000001", "jpg": payloads["000001"], "txt": "green"})
    refs = list_inputs(str(path))
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
    refs = list_inputs(str(tmp_path / "part-*.tar"))
    assert sorted(ref.key for ref in refs) == ["part-0_imgs_a", "part-1_imgs_a"]
    for ref in refs:
        index = int(ref.key[5])
        assert read_bytes(ref, 10**6)[0] == _png((index, 0, 0))


# --------------------------------------------------------------------------- built-in sources


def test_samples_are_bundled_photographs() -> None:
    refs = list_inputs("samples")
    keys = {ref.key for ref in refs}
    assert len(refs) >= 10 and {"astronaut", "coffee", "chelsea", "rocket"} <= keys
    assert all(ref.dataset == "skimage-samples" and Path(ref.loader["path"]).is_file() for ref in refs)
    astronaut = next(ref for ref in refs if ref.key == "astronaut")
    assert Image.open(io.BytesIO(read_bytes(astronaut, 10**7)[0])).size == (512, 512)


def test_synthetic_spec() -> None:
    refs = list_inputs("synthetic://5?seed=3&size=64")
    assert len(refs) == 5 and len({ref.key for ref in refs}) == 5
    assert all(ref.loader == {"kind": "synthetic", "seed": 3, "index": i, "size": 64}
               for i, ref in enumerate(refs))
    assert Image.open(io.BytesIO(read_bytes(refs[0], 10**6)[0])).size == (64, 64)


@pytest.mark.parametrize("spec", ["synthetic://many", "synthetic://0", "synthetic://5?seed=x",
                                  "synthetic://5?size=8", "synthetic://"])
def test_bad_synthetic_spec_is_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="--input"):
        list_inputs(spec)


def test_missing_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input.*does not exist"):
        list_inputs(str(tmp_path / "nowhere"))


def test_directory_without_images_lists_nothing(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no pictures here")
    assert list_inputs(str(tmp_path)) == []


# --------------------------------------------------------------------------- shard layout


def _ref(key: str, uri: str | None = None) -> ImageRef:
    uri = uri or f"/data/{key}.png"
    return ImageRef(key, uri, {"kind": "file", "path": uri})


def _plan(key: str, refs: list[ImageRef], members: list[dict], buckets: int = 4,
          generations: dict[int, int] | None = None, pruned: tuple[str, ...] = ()) -> dict[str, list]:
    out: dict[str, list] = {"new": [], FAILED: [], VANISHED: [], PRESENT: []}
    for value in decide((key, {"refs": refs, "members": members}), buckets, generations or {},
                        "train", pruned):
        if hasattr(value, "tag"):
            out[value.tag].append(value.value)
        else:
            out["new"].append(value)
    return out


EXPECTED_BUCKETS = [260, 259, 77]   # sha256 of the key, first 8 bytes big-endian, mod 1000


def test_bucket_depends_on_the_key_alone() -> None:
    keys = [f"img{i:03d}" for i in range(200)]
    buckets = [layout.bucket_of(k, 7) for k in keys]
    assert buckets == [layout.bucket_of(k, 7) for k in keys]   # stable
    assert set(buckets) == set(range(7))                         # spread over every bucket
    # fixed values: the same on every machine, process and Python version (not Python's hash())
    assert [layout.bucket_of(k, 1000) for k in ("img000", "cat", "synthetic-0-000001")] == \
        EXPECTED_BUCKETS


def test_shard_names_round_trip() -> None:
    assert layout.shard_name("train", 3, 0) == "train-000003"
    assert layout.shard_name("train", 3, 2) == "train-000003-002"
    for bucket, generation in [(0, 0), (12, 0), (12, 7)]:
        name = layout.shard_name("my-split", bucket, generation)
        assert layout.parse_shard("my-split", name) == (bucket, generation)
    assert layout.parse_shard("train", "val-000001") is None
    assert layout.next_generations("train", ["train-000001", "train-000001-001", "train-000002"]) == \
        {1: 2, 2: 1}


def test_new_input_goes_to_its_bucket_first_open_generation() -> None:
    bucket = layout.bucket_of("cat", 4)
    out = _plan("cat", [_ref("cat")], [])
    assert [r.shard for r in out["new"]] == [layout.shard_name("train", bucket, 0)]
    out = _plan("cat", [_ref("cat")], [], generations={bucket: 3})
    assert [r.shard for r in out["new"]] == [layout.shard_name("train", bucket, 3)]


def test_settled_inputs_are_skipped_and_vanished_ones_reported() -> None:
    member = {"key": "cat", "uri": "/data/cat.png", "sha256": "x", "shard": "train-000001",
              "status": "written"}
    out = _plan("cat", [_ref("cat")], [member])
    assert out["new"] == [] and out[FAILED] == [] and out[VANISHED] == [] and out[PRESENT] == [1]
    out = _plan("cat", [], [member])
    assert out[VANISHED] == [member] and out[PRESENT] == [0]
    out = _plan("cat", [_ref("cat")], [member], pruned=("train-000001",))   # pruned: redone
    assert [r.key for r in out["new"]] == ["cat"]


def test_a_key_used_by_two_inputs_is_one_sample_and_one_failure() -> None:
    refs = [_ref("cat", "/b/cat.png"), _ref("cat", "/a/cat.png"), _ref("cat", "/a/cat.png")]
    out = _plan("cat", refs, [])
    assert [r.uri for r in out["new"]] == ["/a/cat.png"]     # the smallest uri keeps the key
    assert [(f.source, f.reason) for f in out[FAILED]] == [("/b/cat.png", "duplicate_key")]
    assert out[PRESENT] == [2]                                # the same file listed twice is one input
    written = {"key": "cat", "uri": "/z/cat.png", "sha256": "x", "shard": "train-000000",
               "status": "written"}
    out = _plan("cat", [_ref("cat", "/a/cat.png"), _ref("cat", "/z/cat.png")], [written])
    assert out["new"] == [] and [f.source for f in out[FAILED]] == ["/a/cat.png"]   # written one keeps it


# Beam finds filesystems through FileSystem.__subclasses__(), which holds them weakly: without this
# reference a garbage collection between registering and listing made the test fail at random.
_REGISTERED: list[type] = []


def _denied_filesystem() -> None:
    """Registers a Beam filesystem ``denied://`` whose listing fails like a bucket without access."""
    from apache_beam.io.filesystem import BeamIOError, FileSystem

    if any(getattr(c, "scheme", lambda: None)() == "denied" for c in FileSystem.__subclasses__()):
        return

    class Denied(FileSystem):   # only what listing touches is implemented
        @classmethod
        def scheme(cls) -> str:
            return "denied"

        def exists(self, path: str) -> bool:
            return True

        def match(self, patterns, limits=None):
            raise BeamIOError("Match operation failed", {
                p: PermissionError(f"403 caller does not have storage.objects.list access to {p}")
                for p in patterns})

        def __getattr__(self, name: str):   # every other operation: not reached by listing
            raise NotImplementedError(name)

    for name in ("join", "split", "mkdirs", "has_dirs", "create", "open", "copy", "rename", "size",
                 "last_updated", "checksum", "delete", "_list"):
        if name in Denied.__abstractmethods__:
            setattr(Denied, name, lambda self, *a, **k: (_ for _ in ()).throw(NotImplementedError()))
    Denied.join = lambda self, base, *paths: "/".join([base.rstrip("/"), *paths])
    Denied.__abstractmethods__ = frozenset()
    _REGISTERED.append(Denied)


@pytest.mark.parametrize("spec", ["denied://bucket/photos", "denied://bucket/photos/*.jpg",
                                  "denied://bucket/manifest.jsonl"])
def test_a_listing_error_stops_the_run_naming_the_path_and_cause(spec: str) -> None:
    """Permissions, credentials or network failing while listing is an error, not 'no images'."""
    _denied_filesystem()
    from pipelines.sources import check_spec

    with pytest.raises(ConfigError, match=re.escape(f"cannot list '{spec}'") + ".*PermissionError: 403"):
        check_spec(spec)
    with pytest.raises(ConfigError, match="cannot list"):
        list_inputs(spec)


def test_an_unreadable_directory_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipelines.sources import check_spec

    (tmp_path / "in").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "in") else real_access(p, mode))
    with pytest.raises(ConfigError, match="cannot list .*permission denied"):
        check_spec(str(tmp_path / "in"))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_huge_manifest_row_becomes_a_named_failure(tmp_path: Path, kind: str) -> None:
    from pipelines.sources import MAX_ROW_BYTES

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    huge = json.dumps([{"size": [40, 40], "counts": "x" * (MAX_ROW_BYTES + 10)}])
    rows = [{"key": "big", "path": "a.png", "masks": huge}, {"key": "fine", "path": "a.png"}]
    manifest = tmp_path / f"m.{kind}"
    if kind == "jsonl":
        manifest.write_text("\n".join(json.dumps(dict(r, masks=json.loads(r["masks"])) if "masks" in r else r)
                                      for r in rows))
    elif kind == "csv":
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "path", "masks"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist([dict(r, masks=r.get("masks", "")) for r in rows]), manifest)
    refs = {r.key: r for r in list_inputs(str(manifest))}
    assert set(refs) == {"big", "fine"}
    assert refs["big"].loader["kind"] == "invalid" and refs["big"].loader["reason"] == "row_too_large"
    assert refs["fine"].loader["kind"] == "file"


# --------------------------------------------------------------------------- .jsonl reading


def test_read_lines_keeps_short_lines_and_summarises_long_ones() -> None:
    import hashlib

    from pipelines.sources import LongLine, read_lines

    long = b"x" * 50
    text = b'{"a": 1}\r\n\n' + long + b"\r\n" + b"short\n" + b"last, no line feed"
    got = list(read_lines(io.BytesIO(text), limit=20, chunk=7))   # chunks cut lines anywhere
    lines = [line for _, line in got]
    assert lines[:2] + lines[3:] == [b'{"a": 1}', b"", b"short", b"last, no line feed"]
    summary = lines[2]
    assert isinstance(summary, LongLine) and summary.size == 50
    assert summary.sha1 == hashlib.sha1(long).hexdigest() and long.startswith(summary.head) and summary.head
    assert sum(consumed for consumed, _ in got) == len(text)


def test_jsonl_source_reads_every_line_once_across_ranges(tmp_path: Path) -> None:
    """Split into byte ranges smaller than a line, every line is read exactly once."""
    from pipelines.sources import JsonlSource

    lines = [json.dumps({"path": f"{i}.png", "pad": "p" * (i * 7 % 40)}).encode() for i in range(30)]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = JsonlSource(str(path))
    for size in (1, 13, 50, 10**6):
        read = [line for bundle in source.split(size)
                for _, line in bundle.source.read(bundle.source.get_range_tracker(
                    bundle.start_position, bundle.stop_position))]
        assert read == lines, size


# --------------------------------------------------------------------------- odd names and damaged tars


def test_non_ascii_names_keep_apart(tmp_path: Path) -> None:
    import unicodedata

    names = ["café.png", "cafè.png", "写真.png", "照片.png"]
    for name in names:
        _write(tmp_path / name)
    keys = {Path(ref.uri).name: ref.key for ref in list_inputs(str(tmp_path))}
    assert len(set(keys.values())) == 4 and all(KEY.match(k) for k in keys.values())
    assert keys["café.png"].startswith("cafe-")
    from pipelines.sources import safe_key

    assert safe_key(unicodedata.normalize("NFD", "café")) == safe_key("café")   # macOS spelling
    assert safe_key("plain name") == "plain_name"                               # ASCII keys unchanged


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_tar_member_names_are_never_paths(tmp_path: Path) -> None:
    """Members are read by offset: '../' and '/' names only shape a safe key; a repeated name is a
    second input with the same key (the first keeps it)."""
    path = _tar(tmp_path / "t.tar", [("../x.jpg", _png((1, 0, 0))), ("/etc/x.jpg", _png((2, 0, 0))),
                                     ("same.png", _png((3, 0, 0))), ("same.png", _png((4, 0, 0)))])
    refs = list_inputs(str(path))
    by_uri = {ref.uri.split("#", 1)[1]: ref for ref in refs}
    assert len(by_uri) == 4
    assert by_uri["../x.jpg"].key == "t___x" and by_uri["/etc/x.jpg"].key == "t__etc_x"
    [first, second] = sorted((r for r in refs if r.key == "t_same"), key=lambda r: r.uri)
    assert first.uri.endswith("#same.png") and re.search(r"#same\.png@\d+$", second.uri)
    assert read_bytes(first, 10**6)[0] == _png((3, 0, 0)) and read_bytes(second, 10**6)[0] == _png((4, 0, 0))


def test_a_damaged_tar_keeps_its_members_and_names_the_damage(tmp_path: Path) -> None:
    whole = _tar(tmp_path / "whole.tar", [("a.png", _png((1, 0, 0))), ("b.png", _png((2, 0, 0)))])
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("b.png").offset_data + 50          # inside b.png's data
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:cut_at])
    whole.unlink()
    (tmp_path / "text.tar").write_bytes(b"not a tar at all\n" * 100)
    refs = {ref.key: ref for ref in list_inputs(str(tmp_path / "*.tar"))}
    assert refs["cut_a"].loader["kind"] == refs["cut_b"].loader["kind"] == "tar"
    assert refs["cut"].loader["reason"] == refs["text"].loader["reason"] == "bad_tar"


@pytest.mark.parametrize("name", ["zipped.tar", "zipped.tar.gz", "zipped.tgz"])
def test_a_compressed_tar_is_one_named_failure(tmp_path: Path, name: str) -> None:
    import gzip

    from pipelines.sources import check_spec

    plain = _tar(tmp_path / "plain.tar", [("a.png", _png())]).read_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(plain))
    assert check_spec(str(path)) == "tar"
    [ref] = list_inputs(str(path))
    assert ref.key == "zipped" and ref.loader["reason"] == "compressed_tar"
    assert "gunzip" in ref.loader["detail"]


def test_manifest_paths_climbing_out_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _manifest_images(tmp_path)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.write_text(json.dumps({"path": "../images/./cat.png"}) + "\n")
    [ref] = list_inputs(str(manifest))
    assert ref.uri == str(tmp_path / "images" / "cat.png") == ref.loader["path"]
    from apache_beam.io.filesystems import FileSystems

    from pipelines.sources import _resolve

    # as Beam's GCS filesystem joins (not installed here)
    monkeypatch.setattr(FileSystems, "join", lambda base, *paths: "/".join([base.rstrip("/"), *paths]))
    assert _resolve("gs://bucket/lists", "../images/./a.png") == "gs://bucket/images/a.png"
