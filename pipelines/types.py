"""Elements that flow between the pipeline's stages."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from settings.secrets import mask_text

# Infrastructure, not the input: a rerun of the same command redoes these images.
TRANSIENT_REASONS = frozenset({
    "timeout", "connection", "bad_response", "http_408", "http_429", "server_not_ready",
    "out_of_memory", "worker_lost", "read_unavailable"})
_HTTP_5XX = re.compile(r"^http_5\d\d$")


def failure_class(reason: str) -> Literal["transient", "permanent"]:
    """*transient* (infrastructure: timeouts, 5xx/429, connection refused, server not ready,
    out of memory, lost worker) or *permanent* (the input or a model's answer is bad)."""
    return "transient" if reason in TRANSIENT_REASONS or _HTTP_5XX.match(reason) else "permanent"


@dataclass
class ImageRef:
    """One input: where to read it, its key and the shard it is assigned to.

    ``loader`` says how to get the bytes: {"kind": "file", "path"} | {"kind": "tar", "path",
    "offset", "size"} | {"kind": "synthetic", "seed", "index"}.
    """

    key: str
    uri: str
    loader: dict[str, Any]
    shard: str = ""
    dataset: str | None = None
    given: dict[str, Any] | None = None   # boxes / masks given with the input


@dataclass
class Failure:
    """A rejected input (region_id None) or region, with the stage and reason."""

    key: str
    source: str
    stage: str
    reason: str
    detail: str = ""
    region_id: str | None = None
    shard: str = ""

    @property
    def transient(self) -> bool:
        """True when a rerun should redo the input (see failure_class)."""
        return failure_class(self.reason) == "transient"

    def row(self) -> dict[str, Any]:
        """Row of failures/*.parquet."""
        return {"key": self.key, "source": self.source, "stage": self.stage, "reason": self.reason,
                "class": failure_class(self.reason), "detail": mask_text(self.detail)[:2000],
                "region_id": self.region_id, "shard": self.shard}


@dataclass
class ImageItem:
    """One image travelling through the stages. Fields fill in as stages run."""

    ref: ImageRef
    data: bytes = b""                     # input bytes as read, then the stored image bytes
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""                      # "jpg" | "png" once decoded
    image_info: dict[str, Any] = field(default_factory=dict)
    ground_truth: list[dict[str, Any]] | None = None
    candidates: list[Any] = field(default_factory=list)      # annotators.base.Candidate
    segment_dropped: dict[str, int] = field(default_factory=dict)
    regions: list[Any] = field(default_factory=list)         # annotators.base.RegionView
    prompts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    captions: Any = None                                     # annotators.base.CaptionResult
    region_failures: list[Failure] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    # stage -> {"cpu_s", "gpu_s", [model calls, tokens, bytes]}: see pipelines.cost
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    segmenter_provenance: dict[str, Any] | None = None       # as set up in the worker that ran it
    rgb: Any = None                                          # decoded pixels of ``data`` (numpy), once
    previous: dict[str, Any] | None = None                   # make recaption: the earlier record

    def __getstate__(self) -> dict[str, Any]:
        # the pixels are a cache: a shuffle or a worker hand-over carries the encoded bytes only
        return {k: v for k, v in self.__dict__.items() if k != "rgb"} | {"rgb": None}

    @property
    def given_caption(self) -> str:
        """The image caption that came with the input (a manifest's ``caption``), or ""."""
        caption = (self.ref.given or {}).get("caption")
        return caption if isinstance(caption, str) else ""

    def fail(self, stage: str, reason: str, detail: str = "") -> Failure:
        """A Failure for this whole input."""
        return Failure(self.ref.key, self.ref.uri, stage, reason, detail, None, self.ref.shard)


@dataclass
class ShardOutcome:
    """What the writer receives per input: a finished sample or the input's failures."""

    key: str
    shard: str
    record: dict[str, Any] | None
    image: bytes | None
    failures: list[Failure]
    timings: dict[str, float]
    uri: str = ""
    sha256: str = ""
    dropped: dict[str, int] = field(default_factory=dict)  # candidate regions dropped, by reason
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # see ImageItem.costs

    @property
    def transient(self) -> bool:
        """True when the input (or one of its regions) hit an infrastructure failure."""
        return any(f.transient for f in self.failures)
