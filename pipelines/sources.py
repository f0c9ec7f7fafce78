"""Input sources, read inside the pipeline: ``ReadInputs(spec)`` → a PCollection of ImageRefs.

Supported ``--input`` forms: a directory (recursive), a glob, manifests (.jsonl/.csv/.parquet, one
file or a glob of them), WebDataset tars (a .tar path or a glob of them), ``samples`` (photographs
bundled with scikit-image) and ``synthetic://N[?seed=S&size=PX]``. File matching, manifest reading
and tar-member listing run in workers (Beam's ``fileio.MatchFiles`` and ``ReadAll…`` transforms):
the driver never holds the list of inputs and the submitted pipeline does not grow with it.

A manifest row that cannot become an input (no path, not JSON) is still an input: it travels as an
ImageRef whose loader kind is ``invalid`` and ends as a failure row. Keys are derived from the
input alone (relative path, manifest ``key`` column, tar member name), never from other inputs.
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
import unicodedata
import urllib.parse
from typing import Any, Iterable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filebasedsource import FileBasedSource, ReadAllFiles
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from settings import ConfigError
from pipelines.types import ImageRef

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
# .tar.gz / .tgz are tar inputs too, so that they end as a named failure (compressed_tar), not as
# an empty "directory"
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
SAMPLE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                 "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                 "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_WILDCARD = re.compile(r"[*?\[]")


def safe_key(text: str, max_len: int = 120) -> str:
    """Map text to the key alphabet [A-Za-z0-9_-]; long names keep a hash suffix.

    A name with non-ASCII characters is spelled in ASCII where Unicode can (é → e) and always keeps
    a hash of the name (in NFC, so a macOS NFD name gives the same key) as a suffix: replacing the
    characters alone gave ``café`` and ``cafè``, or any two names in another script, one key, and
    all but one of those inputs were lost as duplicate keys."""
    if not text.isascii():
        composed = unicodedata.normalize("NFC", text)
        spelled = unicodedata.normalize("NFKD", composed).encode("ascii", "ignore").decode()
        key = _UNSAFE.sub("_", spelled).strip("_") or "x"
        return f"{key[: max_len - 9]}-{hashlib.sha1(composed.encode()).hexdigest()[:8]}"
    key = _UNSAFE.sub("_", text).strip("_") or "x"
    if len(key) > max_len:
        key = key[: max_len - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return key


def is_image(path: str) -> bool:
    """Whether a path has an image extension (case-insensitive)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _relative_key(path: str, root: str) -> str:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
    return safe_key(os.path.splitext(rel)[0])


def file_ref(path: str, root: str, dataset: str | None = None) -> ImageRef:
    """An image file; its key is its path relative to ``root`` without the extension."""
    return ImageRef(key=_relative_key(path, root), uri=path, loader={"kind": "file", "path": path},
                    dataset=dataset)


def invalid_ref(key: str, uri: str, reason: str, detail: str) -> ImageRef:
    """An input that cannot be read (e.g. a bad manifest row): it ends as a failure row."""
    return ImageRef(key=key, uri=uri, loader={"kind": "invalid", "reason": reason, "detail": detail})


def glob_root(pattern: str) -> str:
    """The fixed directory prefix of a glob (keys are relative to it)."""
    prefix = _WILDCARD.split(pattern, maxsplit=1)[0]
    return prefix if prefix.endswith("/") else posixpath.dirname(prefix) + "/"


def sample_refs() -> list[ImageRef]:
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


def parse_synthetic(spec: str) -> tuple[int, int, int]:
    """``synthetic://N?seed=S&size=PX`` → (N, seed, size); ConfigError names the problem."""
    parsed = urllib.parse.urlparse(spec)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    try:
        count = int(parsed.netloc or parsed.path.strip("/"))
        seed, size = int(query.get("seed", 0)), int(query.get("size", 256))
    except ValueError as exc:
        raise ConfigError(f"--input: '{spec}' is not synthetic://N[?seed=S&size=PX] with integers") from exc
    if count < 1 or size < 32:
        raise ConfigError(f"--input: '{spec}' needs N >= 1 and size >= 32")
    return count, seed, size


def synthetic_refs(spec: str, start: int = 0, stop: int | None = None) -> Iterator[ImageRef]:
    """Generated scenes ``start``..``stop`` of ``synthetic://N``."""
    count, seed, size = parse_synthetic(spec)
    for i in range(start, min(count, count if stop is None else stop)):
        yield ImageRef(key=f"synthetic-{seed}-{i:06d}", uri=f"synthetic://{seed}/{i}?size={size}",
                       loader={"kind": "synthetic", "seed": seed, "index": i, "size": size},
                       dataset="synthetic")


# Leading bytes of compressed streams: members cannot be read by offset inside them.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _tar_stem(path: str) -> str:
    name = posixpath.basename(path)
    ext = next((e for e in TAR_EXTENSIONS if name.lower().endswith(e)), "")
    return safe_key(name[: len(name) - len(ext)] if ext else os.path.splitext(name)[0])


def tar_refs(path: str) -> Iterator[ImageRef]:
    """Image members of one uncompressed WebDataset tar, streamed; each is read by offset later.

    Members are never extracted, so names like ``../x.jpg`` or ``/etc/x.jpg`` are harmless: their
    keys are made safe like any other (``{stem}___x``, ``{stem}__etc_x``) and the uri keeps the
    name. A member name repeated in the tar gets ``@{offset}`` in its uri: another input with the
    same key, so the first member keeps the key and the later ones are ``duplicate_key`` rows.
    A tar that cannot be read to its end (cut short, a broken header) keeps the members listed
    before the damage and adds one ``bad_tar`` input for itself; a compressed tar is one
    ``compressed_tar`` input that names the fix. Neither stops the run."""
    stem = _tar_stem(path)
    seen: set[str] = set()
    listed = 0
    # opened as stored: Beam would decompress a .tar.gz by its name, and reading members by offset
    # inside a compressed stream means decompressing from the start for every member
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        head = handle.read(8)
        compression = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
        if compression:
            yield invalid_ref(stem, path, "compressed_tar",
                              f"{compression}-compressed tar: members are read by offset, which needs an "
                              f"uncompressed tar; decompress it (e.g. gunzip, zstd -d) and read the .tar")
            return
        handle.seek(0)
        try:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                for info in tar:
                    if not (info.isfile() and is_image(info.name)):
                        continue
                    member_key = info.name.split("/")[-1].split(".")[0]
                    prefix = posixpath.dirname(info.name)
                    key = safe_key(f"{stem}_{prefix}_{member_key}" if prefix else f"{stem}_{member_key}")
                    uri = f"{path}#{info.name}" + (f"@{info.offset}" if info.name in seen else "")
                    seen.add(info.name)
                    listed += 1
                    yield ImageRef(key=key, uri=uri,
                                   loader={"kind": "tar", "path": path, "offset": info.offset_data,
                                           "size": info.size})
        except (tarfile.TarError, EOFError) as exc:
            yield invalid_ref(stem, path, "bad_tar",
                              f"{type(exc).__name__}: {exc} after {listed} image members (those are "
                              f"inputs of their own); the rest of the tar cannot be listed")


def _base(path: str) -> str:
    return posixpath.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]


def _resolve(base: str, location: str) -> str:
    """A relative manifest path against the manifest's folder, with ``.`` and ``..`` resolved, so
    the uri (the input's identity across runs and manifests) names the file as a listing would:
    ``lists/../images/a.png`` is ``images/a.png``."""
    joined = FileSystems.join(base, location)
    scheme, sep, rest = joined.partition("://")
    if not sep:
        return posixpath.normpath(joined)
    bucket, _, name = rest.partition("/")
    return f"{scheme}://{bucket}/{posixpath.normpath(name)}" if name else joined


MAX_LABEL_CHARS = 1000      # a given label or phrase
MAX_CAPTION_CHARS = 10_000  # a given image caption


def _texts(value: Any, name: str, count: int | None) -> list[str | None]:
    """A list of labels (strings or nulls), as long as the list it labels."""
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise ValueError(f"'{name}' must be a list of strings (or nulls)")
    if count is not None and len(value) != count:
        raise ValueError(f"'{name}' has {len(value)} entries for {count} "
                         f"{'boxes' if name == 'labels' else 'masks'}; give one per entry (null for none)")
    for v in value:
        if v is not None and len(v) > MAX_LABEL_CHARS:
            raise ValueError(f"a '{name}' entry is longer than {MAX_LABEL_CHARS} characters")
    return [" ".join(v.split()) if v else None for v in value]


def _given(row: dict[str, Any], base: str) -> dict[str, Any] | None:
    given: dict[str, Any] = {}
    for name in ("boxes", "masks", "labels", "mask_labels"):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            value = json.loads(value)   # csv cells hold JSON
        if value:
            given[name] = value
    if "labels" in given:
        given["labels"] = _texts(given["labels"], "labels", len(given.get("boxes") or []))
    if "mask_labels" in given:
        given["mask_labels"] = _texts(given["mask_labels"], "mask_labels", len(given.get("masks") or []))
    caption = row.get("caption")
    if caption not in (None, ""):
        if not isinstance(caption, str):
            raise ValueError("'caption' must be a string")
        if len(caption) > MAX_CAPTION_CHARS:
            raise ValueError(f"'caption' is longer than {MAX_CAPTION_CHARS} characters")
        given["caption"] = " ".join(caption.split())
    for name in ("sa1b", "coco"):
        if row.get(name):
            value = row[name]
            given[name] = value if "://" in value or value.startswith("/") else _resolve(base, value)
    if row.get("image_id") not in (None, ""):
        given["image_id"] = row["image_id"]
    return given or None


def manifest_ref(path: str, row: Any, where: str) -> ImageRef:
    """One manifest row → an input: ``path``/``uri`` (relative to the manifest) and optional
    ``key``, ``dataset``, ``boxes`` ([[x,y,w,h],...]) with ``labels`` (a label or phrase per box,
    GRIT style), ``masks`` (COCO RLE list) with ``mask_labels``, ``caption`` (the image's),
    ``sa1b`` (per-image SA-1B json) or ``coco`` (instances json) with ``image_id``.
    A relative path may climb out of the manifest's folder (``../images/a.png``); it is resolved
    (see ``_resolve``). A row that is not usable becomes an ``invalid`` input named after the row."""
    fallback = safe_key(f"{posixpath.basename(path)}-{where}")
    uri = f"{path}#{where}"
    if not isinstance(row, dict):
        return invalid_ref(fallback, uri, "bad_manifest_row", f"{where} is not an object: {str(row)[:200]}")
    key_cell = row.get("key")
    location = row.get("path") or row.get("uri") or row.get("url")
    if not location:
        key = safe_key(str(key_cell)) if key_cell not in (None, "") else fallback
        return invalid_ref(key, uri, "bad_manifest_row",
                           f"{where} has no 'path' or 'uri' column; add one")
    base = _base(path)
    if "://" not in location and not location.startswith("/"):
        location = _resolve(base, location)
    key = safe_key(str(key_cell)) if key_cell not in (None, "") else safe_key(
        os.path.splitext(posixpath.basename(location))[0])
    try:
        given = _given(row, base)
    except json.JSONDecodeError as exc:
        return invalid_ref(key, location, "bad_manifest_row", f"{where}: a cell is not JSON ({exc})")
    except ValueError as exc:
        return invalid_ref(key, location, "bad_manifest_row", f"{where}: {exc}")
    return ImageRef(key=key, uri=location, loader={"kind": "file", "path": location},
                    dataset=row.get("dataset") or None, given=given)


# A manifest row above this is refused before it is parsed or carried through the pipeline
# (e.g. a masks cell of 100 MB); real rows, even SA-1B images with hundreds of masks, are far below.
MAX_ROW_BYTES = 16 * 1024 * 1024
_KEY_AT_START = re.compile(r'\s*\{\s*"key"\s*:\s*"([^"]{1,200})"')


def _row_too_large(path: str, size: int, key: str | None, where: str) -> ImageRef:
    name = safe_key(key) if key else safe_key(f"{posixpath.basename(path)}-{where}")
    return invalid_ref(name, f"{path}#{where}", "row_too_large",
                       f"manifest row of {size} bytes > {MAX_ROW_BYTES}; split its annotations "
                       f"into per-image files (e.g. 'sa1b' or 'coco' columns)")


class LongLine(NamedTuple):
    """A .jsonl line over MAX_ROW_BYTES, as read without keeping it: size, start and sha1."""

    size: int
    head: bytes
    sha1: str


class _Line:
    """The line being read: kept up to ``limit`` bytes; past that only its size, its first 1000
    bytes and its sha1 (over the line without its line break, as Beam's text source gives it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.parts: list[bytes] | None = []
        self.head, self.digest, self.held = b"", hashlib.sha1(), b""

    def add(self, piece: bytes) -> None:
        if not piece:
            return
        self.size += len(piece)
        if self.parts is not None:
            self.parts.append(piece)
            if self.size <= self.limit:
                return
            piece, self.parts = b"".join(self.parts), None
            self.head = piece[:1000]
        self.digest.update(self.held + piece[:-1])   # the last byte waits: it may be the \r of \r\n
        self.held = piece[-1:]

    def done(self) -> bytes | LongLine:
        if self.parts is not None:
            return b"".join(self.parts).removesuffix(b"\r")
        if self.held != b"\r":
            self.digest.update(self.held)
        return LongLine(self.size - (self.held == b"\r"), self.head, self.digest.hexdigest())


def read_lines(handle: Any, limit: int = MAX_ROW_BYTES,
               chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | LongLine]]:
    """(bytes consumed, line) for each line of ``handle`` from where it stands, read in chunks:
    time linear in the file's size and memory below ``limit`` + ``chunk`` however long a line is
    (a longer line comes as a LongLine). Lines end at a line feed; a carriage return before it
    is dropped."""
    line = _Line(limit)
    while True:
        data = handle.read(chunk)
        if not data:
            if line.size:
                yield line.size, line.done()
            return
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line.add(data[start:end])
            consumed = line.size + 1
            yield consumed, line.done()
            line, start = _Line(limit), end + 1
        line.add(data[start:])


class JsonlSource(FileBasedSource):
    """(path, line) of .jsonl manifests, split across workers by byte ranges like Beam's text
    source. Beam's text source grows its buffer by 8 KB copies, so one 100 MB line took it minutes
    (and a 1 GB line would never end); lines here cost time linear in their size (read_lines)."""

    def __init__(self, file_pattern: str) -> None:
        super().__init__(file_pattern, compression_type=CompressionTypes.AUTO, validate=False)

    def read_records(self, file_name: str, range_tracker: Any) -> Iterator[tuple[str, bytes | LongLine]]:
        start = range_tracker.start_position()
        with self.open_file(file_name) as handle:
            # a range's first line is the first that starts inside it: the line holding byte
            # start - 1 belongs to the range before
            position = max(start - 1, 0)
            handle.seek(position)
            lines = read_lines(handle)
            if start > 0:
                position += next(lines, (0, b""))[0]
            for consumed, line in lines:
                if not range_tracker.try_claim(position):
                    return
                yield file_name, line
                position += consumed


def jsonl_ref(path_and_line: tuple[str, bytes | str | LongLine]) -> Iterator[ImageRef]:
    """One line of a .jsonl manifest (blank lines are skipped)."""
    path, line = path_and_line
    if isinstance(line, LongLine):
        found = _KEY_AT_START.match(line.head.decode("utf-8", "replace"))
        yield _row_too_large(path, line.size, found.group(1) if found else None,
                             f"line-{line.sha1[:10]}")
        return
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            digest = hashlib.sha1(line).hexdigest()[:10]
            yield invalid_ref(safe_key(f"{posixpath.basename(path)}-line-{digest}"), f"{path}#{digest}",
                              "bad_manifest_row", f"not UTF-8 ({exc})")
            return
    if not line.strip():
        return
    if len(line) > MAX_ROW_BYTES:
        found = _KEY_AT_START.match(line[:1000])
        digest = hashlib.sha1(line.encode()).hexdigest()[:10]
        yield _row_too_large(path, len(line), found.group(1) if found else None, f"line-{digest}")
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        digest = hashlib.sha1(line.encode()).hexdigest()[:10]
        yield invalid_ref(safe_key(f"{posixpath.basename(path)}-line-{digest}"), f"{path}#{digest}",
                          "bad_manifest_row", f"not JSON ({exc}): {line[:200]}")
        return
    where = f"row key={row.get('key')!r}" if isinstance(row, dict) and row.get("key") else \
        f"line {hashlib.sha1(line.encode()).hexdigest()[:10]}"
    yield manifest_ref(path, row, where)


def csv_refs(path: str) -> Iterator[ImageRef]:
    """Rows of one .csv manifest, streamed."""
    csv.field_size_limit(2**31 - 1)   # the size check below names a huge row; csv's own limit crashes
    with FileSystems.open(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        for number, row in enumerate(csv.DictReader(text), 1):
            size = sum(len(v) for v in row.values() if isinstance(v, str))
            if size > MAX_ROW_BYTES:
                yield _row_too_large(path, size, row.get("key"), f"row-{number}")
            else:
                yield manifest_ref(path, row, f"row {number}")


def parquet_ref(path_and_row: tuple[str, dict[str, Any]]) -> ImageRef:
    """One row of a .parquet manifest."""
    path, row = path_and_row
    size = sum(len(v) for v in row.values() if isinstance(v, (str, bytes)))
    if size > MAX_ROW_BYTES:
        return _row_too_large(path, size, str(row.get("key") or "") or None,
                              f"row-{hashlib.sha1(repr(sorted(row)).encode()).hexdigest()[:10]}")
    where = f"row key={row.get('key')!r}" if row.get("key") not in (None, "") else \
        f"row path={row.get('path') or row.get('uri')!r}"
    return manifest_ref(path, row, where)


def check_spec(spec: str) -> str:
    """Which kind of input ``spec`` is; ConfigError (before any work) when it cannot be one."""
    if spec in ("samples", "samples://skimage", "samples://"):
        return "samples"
    if spec.startswith("synthetic://"):
        parse_synthetic(spec)
        return "synthetic"
    lowered = spec.lower()
    wildcard = bool(_WILDCARD.search(spec))
    if not wildcard and not _probe(spec, lambda: FileSystems.exists(spec)):
        raise ConfigError(f"--input: '{spec}' does not exist; give a directory, glob, manifest "
                          f"(.jsonl/.csv/.parquet), .tar shards, 'samples' or synthetic://N")
    # list one entry now: a listing that fails (permissions, credentials, network) must stop the
    # run naming the cause, not look like an input with no images
    pattern = FileSystems.join(spec.rstrip("/"), "*") if not wildcard and not is_image(spec) and \
        not lowered.endswith((*TAR_EXTENSIONS, *MANIFEST_EXTENSIONS)) else spec
    _probe(spec, lambda: FileSystems.match([pattern], limits=[1]))
    if "://" not in spec and os.path.isdir(spec) and not os.access(spec, os.R_OK | os.X_OK):
        raise ConfigError(f"--input: cannot list '{spec}': permission denied")
    for ext in MANIFEST_EXTENSIONS:
        if lowered.endswith(ext):
            return ext.lstrip(".")
    if lowered.endswith(TAR_EXTENSIONS):
        return "tar"
    if wildcard:
        return "glob"
    return "file" if is_image(spec) else "directory"


def _probe(spec: str, call: Any) -> Any:
    """``call()``; any error of the filesystem becomes a ConfigError naming the input and cause."""
    try:
        return call()
    except Exception as exc:
        cause = exc
        details = getattr(exc, "exception_details", None)
        if isinstance(details, dict) and details:
            cause = next(iter(details.values()))
        raise ConfigError(f"--input: cannot list '{spec}': {type(cause).__name__}: {cause}") from exc


class ReadInputs(beam.PTransform):
    """``--input`` → ImageRefs, read by workers (nothing is listed on the driver)."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        self.spec = spec
        self.kind = check_spec(spec)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        spec, kind = self.spec, self.kind
        if kind == "samples":
            return pbegin | "Samples" >> beam.Create(sample_refs())
        if kind == "synthetic":
            count = parse_synthetic(spec)[0]
            step = 10_000   # ranges are made in a worker, so the graph does not grow with N
            return (pbegin | "Count" >> beam.Create([count])
                    | "Ranges" >> beam.FlatMap(lambda n: range(0, n, step))
                    | "SpreadRanges" >> beam.Reshuffle()
                    | "Scenes" >> beam.FlatMap(lambda s: synthetic_refs(spec, s, s + step)))
        if kind == "file":
            return pbegin | "File" >> beam.Create([file_ref(spec, posixpath.dirname(spec) + "/")])
        pattern = spec
        if kind == "directory":
            root = spec.rstrip("/") + "/"
            pattern = FileSystems.join(spec.rstrip("/"), "**")
        else:
            root = glob_root(spec)
        paths = (pbegin | "Match" >> fileio.MatchFiles(pattern, empty_match_treatment="ALLOW")
                 | "Paths" >> beam.Map(lambda m: m.path))
        if kind in ("directory", "glob"):
            return (paths | "Images" >> beam.Filter(is_image)
                    | "Refs" >> beam.Map(lambda p: file_ref(p, root)))
        paths = paths | "SpreadFiles" >> beam.Reshuffle()
        if kind == "tar":
            return paths | "TarMembers" >> beam.FlatMap(tar_refs)
        if kind == "jsonl":
            return (paths | "Lines" >> ReadAllFiles(True, CompressionTypes.AUTO, 64 * 1024 * 1024, 0,
                                                    JsonlSource)
                    | "Rows" >> beam.FlatMap(jsonl_ref))
        if kind == "csv":
            return paths | "Rows" >> beam.FlatMap(csv_refs)
        return (paths | "Rows" >> beam.io.ReadAllFromParquet(with_filename=True)
                | "Refs" >> beam.Map(parquet_ref))


def list_inputs(spec: str) -> list[ImageRef]:
    """The refs ReadInputs makes for ``spec``, listed here in one process (for tests and small
    tools; the pipeline never calls this). Sorted by key and uri."""
    kind = check_spec(spec)
    refs: Iterable[ImageRef]
    if kind == "samples":
        refs = sample_refs()
    elif kind == "synthetic":
        refs = synthetic_refs(spec)
    elif kind == "file":
        refs = [file_ref(spec, posixpath.dirname(spec) + "/")]
    else:
        pattern = FileSystems.join(spec.rstrip("/"), "**") if kind == "directory" else spec
        root = spec.rstrip("/") + "/" if kind == "directory" else glob_root(spec)
        paths = sorted(m.path for m in _probe(spec, lambda: FileSystems.match([pattern]))[0].metadata_list)
        refs = _list_kind(kind, paths, root)
    return sorted(refs, key=lambda r: (r.key, r.uri))


def _list_kind(kind: str, paths: list[str], root: str) -> Iterator[ImageRef]:
    for path in paths:
        if kind in ("directory", "glob"):
            if is_image(path):
                yield file_ref(path, root)
        elif kind == "tar":
            yield from tar_refs(path)
        elif kind == "csv":
            yield from csv_refs(path)
        elif kind == "jsonl":
            with FileSystems.open(path) as handle:
                for _, line in read_lines(handle):
                    yield from jsonl_ref((path, line))
        else:
            import pyarrow.parquet as pq

            with FileSystems.open(path) as handle:
                table = pq.read_table(io.BytesIO(handle.read()), use_threads=False)
            for row in table.to_pylist():
                yield parquet_ref((path, row))
