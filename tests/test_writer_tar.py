"""Shards are written with the standard library's tarfile, byte for byte as webdataset's
TarWriter writes them (and read back by webdataset)."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import webdataset as wds

from pipelines.writer import tar_bytes


def _reference(samples: list[tuple[str, str, bytes, bytes]]) -> bytes:
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False, mtime=0)
    for key, ext, image, record in samples:
        writer.write({"__key__": key, ext: image, "json": record})
    writer.close()
    return buffer.getvalue()


def test_tar_bytes_equal_webdatasets_tar_writer(tmp_path: Path) -> None:
    samples = [("a0001", "jpg", b"\xff\xd8" + bytes(range(256)) * 7, b'{"k":1}'),
               ("b0002", "png", b"\x89PNG" + b"x" * 1000, '{"t":"caf\u00e9 \u6f22"}'.encode()),
               ("c-long-" + "k" * 120, "jpg", b"", b"{}"),          # a name past ustar's 100
               ("d\u00e9\u6f22", "png", b"p" * 513, b"[]")]         # non-ASCII names
    assert tar_bytes(samples) == _reference(samples)
    assert tar_bytes([]) == _reference([])
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes(samples))
    got = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in got] == [k for k, *_ in samples]
    assert got[1]["png"].startswith(b"\x89PNG") and got[0]["json"] == b'{"k":1}'


def test_the_pipeline_does_not_import_torch() -> None:
    """Writing shards needs no torch: a worker's start-up does not pay for importing it."""
    code = "import sys, pipelines.build_dataset; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
