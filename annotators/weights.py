"""Model weight files: their sha256, streamed through Beam's filesystems (local paths or any
remote one), for provenance without loading the model."""
from __future__ import annotations

import hashlib

from settings import ConfigError


def file_sha256(path: str, field: str = "checkpoint") -> str:
    """Hex sha256 of the file at ``path``; ConfigError naming ``field`` when it cannot be read."""
    from apache_beam.io.filesystems import FileSystems

    digest = hashlib.sha256()
    try:
        with FileSystems.open(path) as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot read {path!r} ({exc}); fix the path") from exc
    return digest.hexdigest()
