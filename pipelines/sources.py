"""Input sources → a sorted list of ImageRefs with deterministic keys and shard assignment.

Supported ``--input`` forms: a directory (recursive), a glob, a manifest (.jsonl/.csv/.parquet),
WebDataset tars (a .tar path or a glob of them), ``samples`` (photographs bundled with
scikit-image) and ``synthetic://N[?seed=S&size=PX]``. Paths go through Beam's filesystems.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import urllib.parse
from typing import Any, Iterable

from apache_beam.io.filesystems import FileSystems

from annotators.base import ConfigError
from pipelines.types import ImageRef

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
SAMPLE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                 "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                 "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str, max_len: int = 120) -> str:
    """Map text to the key alphabet [A-Za-z0-9_-]; long names keep a hash suffix."""
    key = _UNSAFE.sub("_", text).strip("_") or "x"
    if len(key) > max_len:
        key = key[: max_len - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return key


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _match(pattern: str) -> list[str]:
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:   # BeamIOError when nothing matches
        return []
    return sorted(m.path for m in result.metadata_list)


def _relative_key(path: str, root: str) -> str:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
    return safe_key(os.path.splitext(rel)[0])


def _file_ref(path: str, root: str, dataset: str | None = None) -> ImageRef:
    return ImageRef(key=_relative_key(path, root), uri=path, loader={"kind": "file", "path": path},
                    dataset=dataset)


def from_directory(root: str) -> list[ImageRef]:
    """All image files under ``root`` (recursive; extensions case-insensitive)."""
    root = root.rstrip("/")
    paths = [p for p in _match(FileSystems.join(root, "**")) if _is_image(p)]
    return [_file_ref(p, root + "/") for p in paths]


def from_glob(pattern: str) -> list[ImageRef]:
    """Image files matching a glob; keys relative to the glob's fixed prefix."""
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    root = prefix if prefix.endswith("/") else posixpath.dirname(prefix) + "/"
    return [_file_ref(p, root) for p in _match(pattern) if _is_image(p)]


def from_samples() -> list[ImageRef]:
    """Real photographs shipped inside scikit-image (no download)."""
    import skimage

    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    refs = []
    for name in SAMPLE_PHOTOS:
        path = os.path.join(root, name)
        if os.path.exists(path):
            refs.append(ImageRef(key=safe_key(os.path.splitext(name)[0]), uri=f"samples://{name}",
                                 loader={"kind": "file", "path": path}, dataset="skimage-samples"))
    return refs


def from_synthetic(spec: str) -> list[ImageRef]:
    """``synthetic://N?seed=S&size=PX``: N generated scenes."""
    parsed = urllib.parse.urlparse(spec)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    try:
        count = int(parsed.netloc or parsed.path.strip("/"))
        seed, size = int(query.get("seed", 0)), int(query.get("size", 256))
    except ValueError as exc:
        raise ConfigError(f"--input: '{spec}' is not synthetic://N[?seed=S&size=PX] with integers") from exc
    if count < 1 or size < 32:
        raise ConfigError(f"--input: '{spec}' needs N >= 1 and size >= 32")
    return [ImageRef(key=f"synthetic-{seed}-{i:06d}", uri=f"synthetic://{seed}/{i}?size={size}",
                     loader={"kind": "synthetic", "seed": seed, "index": i, "size": size},
                     dataset="synthetic") for i in range(count)]


def _tar_members(path: str) -> Iterable[tuple[str, tarfile.TarInfo]]:
    with FileSystems.open(path) as handle:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if info.isfile() and _is_image(info.name):
                    yield info.name, info


def from_tars(pattern: str) -> list[ImageRef]:
    """Image members of WebDataset tars (uncompressed); each member is read by offset later."""
    refs = []
    for path in _match(pattern):
        stem = safe_key(os.path.splitext(posixpath.basename(path))[0])
        for name, info in _tar_members(path):
            member_key = name.split("/")[-1].split(".")[0]
            prefix = posixpath.dirname(name)
            key = safe_key(f"{stem}_{prefix}_{member_key}" if prefix else f"{stem}_{member_key}")
            refs.append(ImageRef(key=key, uri=f"{path}#{name}",
                                 loader={"kind": "tar", "path": path, "offset": info.offset_data,
                                         "size": info.size}))
    return refs


def _manifest_rows(path: str) -> list[dict[str, Any]]:
    with FileSystems.open(path) as handle:
        data = handle.read()
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data), use_threads=False).to_pylist()
    text = data.decode("utf-8")
    if path.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--input: {path} line {number} is not JSON ({exc})") from exc
    return rows


def _given(row: dict[str, Any], base: str) -> dict[str, Any] | None:
    given = {}
    for name in ("boxes", "masks", "labels"):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            value = json.loads(value)   # csv cells hold JSON
        if value:
            given[name] = value
    for name in ("sa1b", "coco"):
        if row.get(name):
            value = row[name]
            given[name] = value if "://" in value or value.startswith("/") else FileSystems.join(base, value)
    if row.get("image_id") not in (None, ""):
        given["image_id"] = row["image_id"]
    return given or None


def from_manifest(path: str) -> list[ImageRef]:
    """One input per manifest row: ``path``/``uri`` (relative to the manifest) and optional
    ``key``, ``dataset``, ``boxes`` ([[x,y,w,h],...]), ``masks`` (COCO RLE list), ``labels``,
    ``sa1b`` (per-image SA-1B json) or ``coco`` (instances json) with ``image_id``."""
    base = posixpath.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    refs = []
    for number, row in enumerate(_manifest_rows(path), 1):
        location = row.get("path") or row.get("uri") or row.get("url")
        if not location:
            raise ConfigError(f"--input: {path} row {number} has no 'path' or 'uri' column; add one")
        if "://" not in location and not location.startswith("/"):
            location = FileSystems.join(base, location)
        key = safe_key(str(row["key"])) if row.get("key") not in (None, "") else safe_key(
            os.path.splitext(posixpath.basename(location))[0])
        refs.append(ImageRef(key=key, uri=location, loader={"kind": "file", "path": location},
                             dataset=row.get("dataset") or None, given=_given(row, base)))
    return refs


def enumerate_inputs(spec: str) -> list[ImageRef]:
    """Resolve ``--input`` into refs (unsorted, keys possibly colliding)."""
    if spec in ("samples", "samples://skimage", "samples://"):
        return from_samples()
    if spec.startswith("synthetic://"):
        return from_synthetic(spec)
    lowered = spec.lower()
    if lowered.endswith(MANIFEST_EXTENSIONS):
        if not FileSystems.exists(spec):
            raise ConfigError(f"--input: manifest '{spec}' does not exist")
        return from_manifest(spec)
    if lowered.endswith(".tar"):
        refs = from_tars(spec)
    elif any(c in spec for c in "*?["):
        refs = from_glob(spec)
    elif FileSystems.exists(spec) and _is_image(spec):
        refs = [_file_ref(spec, posixpath.dirname(spec) + "/")]
    elif FileSystems.exists(spec):
        refs = from_directory(spec)
    else:
        raise ConfigError(f"--input: '{spec}' does not exist; give a directory, glob, manifest "
                          f"(.jsonl/.csv/.parquet), .tar shards, 'samples' or synthetic://N")
    if not refs:
        raise ConfigError(f"--input: no images found at '{spec}' (extensions: "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return refs


def assign_shards(refs: list[ImageRef], samples_per_shard: int, split: str) -> list[ImageRef]:
    """Make keys unique, sort by key and assign shards: same inputs → same shards."""
    counts: dict[str, int] = {}
    for ref in refs:
        counts[ref.key] = counts.get(ref.key, 0) + 1
    for ref in refs:
        if counts[ref.key] > 1:
            ref.key = safe_key(f"{ref.key}-{hashlib.sha1(ref.uri.encode()).hexdigest()[:8]}")
    refs = sorted(refs, key=lambda r: (r.key, r.uri))
    seen: set[str] = set()
    for index, ref in enumerate(refs):
        if ref.key in seen:   # same uri listed twice: keep keys unique, dedup will catch the bytes
            ref.key = safe_key(f"{ref.key}-{index}")
        seen.add(ref.key)
        ref.shard = f"{split}-{index // samples_per_shard:06d}"
    return refs
