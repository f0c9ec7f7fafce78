"""What the caption-program engine asks of a model backend: ``generate(requests) -> answers``.

A backend turns ``GenerationRequest``s (a text, images, a system prompt, an optional JSON
schema) into one ``ChatAnswer`` or ``AnnotatorFailure`` each, in input order, and never raises
for one bad request. Failure reasons are the answer checks' (``checks.ANSWER_REASONS``), the
transport's (``http_503``, ``timeout``, ...) or ``prompt_error`` / ``client_error``.

Images arrive as the pipeline holds them (encoded bytes, arrays, PIL images or ready URLs), or
as ``Encoded`` bytes the caption engine already fit and encoded for this backend (the whole image
and the visual prompts: sent as they are); the same object in several requests of one call (the
whole image, shared by all of its regions) is prepared once (``prepare_images``).

Cost: a backend adds what answering each request cost to that request's ``cost`` (a
``CallCost``: model calls including retries and failed ones, tokens from the model's own
count, bytes over the wire), so the engine can sum it per image whatever the backend is.
"""
from __future__ import annotations

import threading

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from annotators.base import AnnotatorFailure

if TYPE_CHECKING:
    from PIL import Image

ChatResult = Union["ChatAnswer", AnnotatorFailure]


class Encoded:
    """Image bytes already fit to a backend's pixel budget and encoded as its settings say:
    backends send them as they are. Made once per image (the whole image) or per visual prompt
    and shared by every request that shows it; the data URL is built once, on first use."""

    __slots__ = ("data", "format", "size", "_url")

    def __init__(self, data: bytes, fmt: str, size: tuple[int, int]) -> None:
        self.data = data
        self.format = fmt.upper()          # JPEG, PNG or WEBP
        self.size = size                   # (width, height) in pixels
        self._url: str | None = None

    def __repr__(self) -> str:
        return f"Encoded({self.format}, {self.size[0]}x{self.size[1]}, {len(self.data)} B)"

    def data_url(self) -> str:
        """``data:image/...;base64,...`` of the bytes (computed once)."""
        if self._url is None:
            import base64

            mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
            self._url = (f"data:{mime.get(self.format, 'image/png')};base64,"
                         f"{base64.b64encode(self.data).decode('ascii')}")
        return self._url


ImageLike = Union[bytes, np.ndarray, "Image.Image", str, Encoded]


@dataclass
class CallCost:
    """What answering requests cost a backend; filled in by the backend as it works.

    ``calls`` are model calls made (an HTTP attempt, a row of a generated chunk), retries
    included; ``failed_calls`` those that gave no accepted answer (an HTTP error, a timeout, an
    answer failing its checks). Tokens are the model's own count (the server's OpenAI ``usage``,
    or the input and generated ids of an in-process model), summed over the calls that reported
    them: a call that got a completion without ``usage`` is counted in ``calls_without_usage``
    and its tokens are unknown, not zero. Bytes are request and response bodies (JSON, no HTTP
    headers; 0 in process): every attempt's request body, and the bodies of the completions read.
    """

    requests: int = 0
    calls: int = 0
    failed_calls: int = 0
    calls_without_usage: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, other: "CallCost") -> None:
        """Add ``other``'s counts to these."""
        for name in COST_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def add_usage(self, usage: Any) -> dict[str, int]:
        """Count a completion's OpenAI ``usage``: its tokens when it has ``prompt_tokens`` and
        ``completion_tokens`` as counts, else one more call without usage. Returns the counts
        found ({} when none)."""
        if isinstance(usage, dict):
            counts = {k: v for k, v in usage.items()
                      if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
            if "prompt_tokens" in counts and "completion_tokens" in counts:
                self.prompt_tokens += counts["prompt_tokens"]
                self.completion_tokens += counts["completion_tokens"]
                return counts
        self.calls_without_usage += 1
        return {}

    def as_dict(self) -> dict[str, int]:
        """The counts by field name (``COST_FIELDS``)."""
        return {name: getattr(self, name) for name in COST_FIELDS}


COST_FIELDS: tuple[str, ...] = ("requests", "calls", "failed_calls", "calls_without_usage",
                                "prompt_tokens", "completion_tokens", "bytes_sent",
                                "bytes_received")


@dataclass
class GenerationRequest:
    """One model call of a caption program.

    ``images`` go before ``text`` in this order (the whole image first, so a server's prefix
    cache reuses it across regions). ``json_schema`` asks for structured output, parsed and
    validated into ``ChatAnswer.parsed``. ``max_tokens`` / ``temperature`` override the
    backend's defaults; ``region_id`` is copied into the answer or failure; the backend adds
    what the request cost to ``cost``.
    """

    text: str
    images: Sequence[ImageLike] = ()
    system: str | None = None
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    max_tokens: int | None = None
    temperature: float | None = None
    region_id: str | None = None
    cost: CallCost = field(default_factory=CallCost)   # filled in by the backend that answers


@dataclass
class ChatAnswer:
    """A checked answer: text, parsed JSON (when a schema was given) and how it was obtained."""

    text: str
    parsed: Any = None
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    latency_s: float = 0.0          # of the attempt that answered
    total_s: float = 0.0            # from the first attempt to the answer, waits included
    attempts: int = 1
    endpoint: str = ""
    region_id: str | None = None


class Backend(ABC):
    """A model that answers generation requests; built from settings, pickles as its settings.

    Beam use: ``setup()`` once per worker (load a model, start an event loop), ``generate`` per
    batch, ``teardown()`` at the end.
    """

    def setup(self) -> None:
        """Load or connect. Called before the first ``generate``; calling it again is harmless."""

    def teardown(self) -> None:
        """Release what ``setup`` took; a later ``generate`` sets up again."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[ChatResult]:
        """One answer or failure per request, same order."""


def prepare_images(requests: Sequence[GenerationRequest],
                   prepare: Callable[[ImageLike], Any]) -> list[list[Any] | AnnotatorFailure]:
    """Each request's images through ``prepare``, each image object once; a request whose image
    cannot be read becomes a ``prompt_error`` failure."""
    done: dict[int, Any] = {}       # by id(): the requests keep every image alive meanwhile
    out: list[list[Any] | AnnotatorFailure] = []
    for request in requests:
        try:
            for image in request.images:
                if id(image) not in done:
                    done[id(image)] = prepare(image)
        except (ValueError, OSError) as exc:
            out.append(AnnotatorFailure("prompt_error", f"{type(exc).__name__}: {exc}"[:500],
                                        request.region_id))
            continue
        out.append([done[id(image)] for image in request.images])
    return out


class _InFlight:
    """Requests this process has sent to a model and not yet had answered (for progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        """Count ``n`` more (negative: answered)."""
        with self._lock:
            self.value += n


IN_FLIGHT = _InFlight()
