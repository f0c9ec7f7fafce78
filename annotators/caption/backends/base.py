"""What the caption-program engine asks of a model backend: ``generate(requests) -> answers``.

A backend turns ``GenerationRequest``s (a text, images, a system prompt, an optional JSON
schema) into one ``ChatAnswer`` or ``AnnotatorFailure`` each, in input order, and never raises
for one bad request. Failure reasons are the answer checks' (``checks.ANSWER_REASONS``), the
transport's (``http_503``, ``timeout``, ...) or ``prompt_error`` / ``client_error``.

Images arrive as the pipeline holds them (encoded bytes, arrays, PIL images or ready URLs), or
as ``Encoded`` bytes the caption engine already fit and encoded for this backend (the whole image
and the visual prompts: sent as they are); the same object in several requests of one call (the
whole image, shared by all of its regions) is prepared once (``prepare_images``).
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
class GenerationRequest:
    """One model call of a caption program.

    ``images`` go before ``text`` in this order (the whole image first, so a server's prefix
    cache reuses it across regions). ``json_schema`` asks for structured output, parsed and
    validated into ``ChatAnswer.parsed``. ``max_tokens`` / ``temperature`` override the
    backend's defaults; ``region_id`` is copied into the answer or failure.
    """

    text: str
    images: Sequence[ImageLike] = ()
    system: str | None = None
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    max_tokens: int | None = None
    temperature: float | None = None
    region_id: str | None = None


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
