"""Robust async chat client for vLLM's OpenAI-compatible server (multimodal, structured output).

Captioners send many small chat requests (one per region) to one or more vLLM servers. This
module does that well:

* ``ClientSettings``: validated settings (endpoints, model, retries, image budget, checks).
* ``ChatRequest`` / ``build_messages``: OpenAI-format messages with the parts shared by all
  regions of an image (system prompt, whole image) first and the region's parts last, so vLLM's
  prefix cache can reuse the shared prefix; images resized to a pixel budget and sent as data URLs.
* ``VllmChatClient``: ``await chat(req)`` gives a ``ChatAnswer`` or an ``AnnotatorFailure``, never
  raises; ``run_many(reqs)`` does a batch from synchronous code (a Beam DoFn) on the client's own
  event loop, bounded by ``max_in_flight``, results in input order. Transient faults (5xx, 429,
  timeouts, dropped or refused connections, unreadable bodies) are retried with jittered
  exponential backoff, spread across endpoints, and an endpoint failing repeatedly is skipped for a
  cooldown. Other 4xx fail at once (``http_400``, ...).
* Answer checks (pure functions): empty, refusal, repetition loop, truncation, malformed JSON or
  JSON not matching the requested schema.

Transport: ``AsyncOpenAI`` over the SDK's aiohttp transport, calling ``client.post`` with the
request body as built here and the raw response parsed here. The SDK's typed
``chat.completions.create`` walks every message part with typing introspection and builds a
pydantic answer (about 0.6 ms more CPU per request, measured), and httpx's own connection pool
scans all its connections on each request (about 2 ms per request at 256 connections); both
matter at hundreds of requests per second.

The API key is read from an environment variable when the connection state is built; it is
held only by the SDK client objects, never in settings, logs or provenance.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence, Union

import numpy as np

from annotators.base import AnnotatorFailure, ConfigError, parse_settings, require

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

CLIENT_VERSION = "1"
ANSWER_REASONS: tuple[str, ...] = ("empty", "refusal", "repetition", "truncated", "bad_json")
DEFAULT_REFUSALS: tuple[str, ...] = (
    "i'm sorry", "i am sorry", "sorry, i", "i cannot", "i can't", "i can not", "i'm unable",
    "i am unable", "i'm not able", "i am not able", "i apologize", "as an ai",
    "i won't be able", "unfortunately, i can",
)

ImageLike = Union[bytes, np.ndarray, "Image.Image", str]
ChatResult = Union["ChatAnswer", AnnotatorFailure]


# --------------------------------------------------------------------------- settings


@dataclass
class ClientSettings:
    """Settings of the chat client; build with ``parse_settings`` (or ``VllmChatClient(dict)``)."""

    model: str
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    api_key_env: str = "VLLM_API_KEY"       # env var holding the key; unset -> "EMPTY"
    max_in_flight: int = 256                # requests on the wire at once (per event loop)
    balance: Literal["least_in_flight", "round_robin"] = "least_in_flight"
    endpoint_fail_threshold: int = 3        # consecutive transport failures before a cooldown
    endpoint_cooldown_s: float = 10.0
    # "aiohttp": AsyncOpenAI over the SDK's aiohttp transport (default); "httpx": the SDK's
    # default transport; "direct": the same requests on a bare aiohttp session, for the highest
    # request rates (about a third of the client CPU per request; see bench/caption_client_bench.py).
    transport: Literal["aiohttp", "httpx", "direct"] = "aiohttp"
    quiet_http_logs: bool = True            # raise the httpx2 logger (INFO per request) to WARNING
    timeout_s: float = 120.0                # per attempt
    max_retries: int = 4                    # retries of transient faults (after the 1st try)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    image_max_pixels: int = 1024 * 1024     # client-side resize budget, aspect kept
    image_format: Literal["auto", "jpeg", "png"] = "auto"
    jpeg_quality: int = 90
    temperature: float = 0.0
    max_tokens: int = 512
    seed: int | None = 0
    extra_body: dict[str, Any] = field(default_factory=dict)   # e.g. {"repetition_penalty": 1.05}
    answer_retries: int = 1                 # re-asks for answers failing a check listed below
    retry_answer_reasons: list[str] = field(default_factory=lambda: ["bad_json"])
    answer_retry_temperature: float | None = 0.5   # greedy decoding would repeat the same answer
    refusal_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
    repetition_ngram: int = 4
    repetition_max_repeats: int = 8         # the same n-gram this often -> repetition
    repetition_min_tokens: int = 40         # below this, the unique-ratio rule is not applied
    repetition_min_unique_ratio: float = 0.2
    # Keep free-text answers cut at max_tokens instead of failing them. Only for models that
    # never stop on their own (randomly initialised test models); structured answers still fail.
    allow_truncated: bool = False

    # Where requests go and how hard the client tries: none of it reaches an answer that is kept.
    # Timeouts and retries of transient faults only decide whether an image is redone by a later
    # run. Everything from image_max_pixels on (what the model sees, sampling, answer checks and
    # re-asks) changes captions or which answers are rejected, so it is hashed.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({
        "endpoints", "api_key_env", "max_in_flight", "balance", "endpoint_fail_threshold",
        "endpoint_cooldown_s", "transport", "quiet_http_logs", "timeout_s", "max_retries",
        "backoff_base_s", "backoff_max_s"})

    def check(self) -> None:
        """Reject values that cannot work, naming the field and the fix."""
        require(bool(self.model), "model", "must name the served model (vLLM --served-model-name)")
        require(bool(self.endpoints), "endpoints", "give at least one base URL, e.g. "
                "http://127.0.0.1:8000/v1")
        for url in self.endpoints:
            require(url.startswith(("http://", "https://")), "endpoints",
                    f"{url!r} is not an http(s) base URL; use e.g. http://HOST:PORT/v1")
        require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
                "api_key_env", "must be the name of an environment variable (the key itself "
                "never goes into settings)")
        self._check_numbers()
        unknown = sorted(set(self.retry_answer_reasons) - set(ANSWER_REASONS))
        require(not unknown, "retry_answer_reasons",
                f"unknown reason(s) {unknown}; use some of {list(ANSWER_REASONS)}")

    def _check_numbers(self) -> None:
        require(self.max_in_flight >= 1, "max_in_flight", "must be at least 1")
        require(self.endpoint_fail_threshold >= 1, "endpoint_fail_threshold", "must be >= 1")
        require(self.endpoint_cooldown_s >= 0, "endpoint_cooldown_s", "must be >= 0")
        require(self.timeout_s > 0, "timeout_s", "must be > 0 seconds")
        require(self.max_retries >= 0, "max_retries", "must be >= 0")
        require(self.backoff_base_s > 0, "backoff_base_s", "must be > 0 seconds")
        require(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s",
                "must be >= backoff_base_s")
        require(self.image_max_pixels >= 1024, "image_max_pixels", "must be at least 1024 "
                "(32x32); typical values are 401408 to 1048576")
        require(1 <= self.jpeg_quality <= 95, "jpeg_quality", "must be within 1..95")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        require(self.answer_retries >= 0, "answer_retries", "must be >= 0")
        require(self.repetition_ngram >= 1, "repetition_ngram", "must be >= 1")
        require(self.repetition_max_repeats >= 2, "repetition_max_repeats", "must be >= 2")
        require(0 <= self.repetition_min_unique_ratio <= 1, "repetition_min_unique_ratio",
                "must be within 0..1")


# --------------------------------------------------------------------------- answer checks


@dataclass(frozen=True)
class AnswerChecks:
    """Thresholds of the answer checks (taken from ClientSettings by the client)."""

    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSALS
    ngram: int = 4
    max_repeats: int = 8
    min_tokens: int = 40
    min_unique_ratio: float = 0.2
    allow_truncated: bool = False

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> AnswerChecks:
        """The checks configured in ``settings``."""
        return cls(tuple(p.lower() for p in settings.refusal_phrases), settings.repetition_ngram,
                   settings.repetition_max_repeats, settings.repetition_min_tokens,
                   settings.repetition_min_unique_ratio, settings.allow_truncated)


def is_empty(text: str | None) -> bool:
    """True when the answer has no visible characters."""
    return not (text or "").strip()


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def refusal_phrase(text: str, phrases: Sequence[str] = DEFAULT_REFUSALS) -> str | None:
    """The refusal phrase ``text`` opens with (case-insensitive), else None.

    Only the opening is checked: a caption may legitimately quote "I cannot" later on.
    """
    opening = text.translate(_QUOTES).strip().lstrip("\"'`*#>- \n").lower()[:200]
    for phrase in phrases:
        if opening.startswith(phrase.lower()):
            return phrase
    return None


def repetition(text: str, ngram: int = 4, max_repeats: int = 8, min_tokens: int = 40,
               min_unique_ratio: float = 0.2) -> str | None:
    """Describe a repetition loop in ``text`` (an n-gram repeated often, or few distinct words).

    Returns None for normal text. Words are ``\\w+`` runs, lower-cased.
    """
    tokens = re.findall(r"\w+", text.lower())
    if len(tokens) >= min_tokens:
        ratio = len(set(tokens)) / len(tokens)
        if ratio < min_unique_ratio:
            return f"only {ratio:.0%} of {len(tokens)} words are distinct"
    if len(tokens) >= ngram * max_repeats:
        grams = Counter(tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1))
        gram, count = grams.most_common(1)[0]
        if count >= max_repeats:
            return f"{' '.join(gram)!r} repeated {count} times"
    return None


def is_truncated(finish_reason: str | None) -> bool:
    """True when generation stopped at the token limit."""
    return finish_reason == "length"


_VALIDATORS: dict[str, Any] = {}


def parse_json_answer(text: str, schema: Mapping[str, Any] | None = None) -> tuple[Any, str | None]:
    """Parse ``text`` as JSON (a ```json fence is tolerated) and validate it against ``schema``.

    Returns (value, None) when fine, (None, what is wrong) otherwise.
    """
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body, strict=False)   # xgrammar may emit raw control chars in strings
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if schema is not None:
        error = _schema_error(value, schema)
        if error:
            return None, f"does not match the schema: {error}"
    return value, None


def _schema_error(value: Any, schema: Mapping[str, Any]) -> str | None:
    import jsonschema

    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        cls = jsonschema.validators.validator_for(schema)
        validator = _VALIDATORS[key] = cls(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message[:200]}"


def check_answer(text: str, finish_reason: str | None, schema: Mapping[str, Any] | None = None,
                 checks: AnswerChecks = AnswerChecks()) -> tuple[Any, tuple[str, str] | None]:
    """Run every answer check; returns (parsed JSON or None, (reason, detail) or None).

    Order: empty, refusal, repetition, truncated, bad_json; the first that fails is reported
    (a looping answer usually also hits the token limit; "repetition" says more).
    """
    if is_empty(text):
        return None, ("empty", f"no text (finish_reason={finish_reason})")
    phrase = refusal_phrase(text, checks.refusal_phrases)
    if phrase:
        return None, ("refusal", f"answer opens with {phrase!r}: {text[:120]!r}")
    loop = repetition(text, checks.ngram, checks.max_repeats, checks.min_tokens,
                      checks.min_unique_ratio)
    if loop:
        return None, ("repetition", loop)
    if is_truncated(finish_reason) and not (checks.allow_truncated and schema is None):
        return None, ("truncated", f"stopped at the token limit after {len(text)} characters")
    if schema is None:
        return None, None
    parsed, error = parse_json_answer(text, schema)
    if error:
        return None, ("bad_json", f"{error}; answer starts {text[:120]!r}")
    return parsed, None


# --------------------------------------------------------------------------- images, messages


def fit_to_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and w * h <= max_pixels (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def encode_image(image: ImageLike, max_pixels: int, image_format: str = "auto",
                 jpeg_quality: int = 90) -> str:
    """A data URL of ``image`` resized to at most ``max_pixels`` pixels (aspect kept).

    ``image`` is encoded bytes (JPEG/PNG/...), an (H, W[, C]) uint8 array, a PIL image, or a
    ready URL string (returned unchanged). Encoded bytes already within budget and in the wanted
    format pass through without re-encoding. "auto" keeps PNG for PNG sources and images with
    alpha, JPEG otherwise.
    """
    if isinstance(image, str):
        if image.startswith(("data:", "http://", "https://")):
            return image
        raise ValueError("image strings must be data: or http(s): URLs")
    from PIL import Image

    source_format = None
    raw = None
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        pil = Image.open(io.BytesIO(raw))
        source_format = pil.format
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(np.ascontiguousarray(image))
    else:
        pil = image
    fmt = _output_format(image_format, pil, source_format)
    target = fit_to_pixels(pil.width, pil.height, max_pixels)
    if raw is not None and target == pil.size and source_format == fmt:
        return _data_url(raw, fmt)
    return _data_url(_reencode(pil, target, fmt, jpeg_quality, source_format), fmt)


def _output_format(image_format: str, pil: Image.Image, source_format: str | None) -> str:
    if image_format != "auto":
        return image_format.upper()
    has_alpha = pil.mode in ("RGBA", "LA", "PA") or "transparency" in pil.info
    return "PNG" if has_alpha or source_format == "PNG" else "JPEG"


def _reencode(pil: Image.Image, size: tuple[int, int], fmt: str, quality: int,
              source_format: str | None) -> bytes:
    from PIL import Image

    if source_format == "JPEG" and size != pil.size:
        pil.draft("RGB", size)          # DCT-domain downscale while decoding: much cheaper
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    if fmt == "JPEG" and pil.mode not in ("RGB", "L"):
        pil = pil.convert("RGB")
    elif fmt == "PNG" and pil.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        pil = pil.convert("RGBA")
    out = io.BytesIO()
    if fmt == "JPEG":
        pil.save(out, format="JPEG", quality=quality)
    else:
        pil.save(out, format=fmt, compress_level=1)
    return out.getvalue()


def _data_url(data: bytes, fmt: str) -> str:
    mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}.get(fmt, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def build_messages(*, system: str | None = None, shared_text: str = "",
                   shared_images: Sequence[ImageLike] = (), region_images: Sequence[ImageLike] = (),
                   text: str = "", max_pixels: int = 1024 * 1024, image_format: str = "auto",
                   jpeg_quality: int = 90) -> list[dict[str, Any]]:
    """OpenAI chat messages ordered for prefix caching: shared parts first, region parts last.

    Order: system message; then one user message with ``shared_text``, ``shared_images`` (the
    whole image), ``region_images`` (crops, visual prompts), and the region's ``text``. Encode a
    shared image once with ``encode_image`` and pass the URL to every region's request.
    """
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = []
    if shared_text:
        content.append({"type": "text", "text": shared_text})
    for image in [*shared_images, *region_images]:
        url = encode_image(image, max_pixels, image_format, jpeg_quality)
        content.append({"type": "image_url", "image_url": {"url": url}})
    if text:
        content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages


# --------------------------------------------------------------------------- requests, answers


@dataclass
class ChatRequest:
    """One chat completion to ask for.

    ``json_schema`` asks vLLM for structured output (``response_format`` json_schema, strict) and
    makes the answer's JSON parsed and validated. ``region_id`` is copied into a failure.
    ``extra`` is merged into the request body (vLLM sampling extras).
    """

    messages: list[dict[str, Any]]
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    region_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class _Fault:
    """Why one attempt failed, and whether to try again (kind "transport"/"answer"/"final")."""

    reason: str
    detail: str
    kind: Literal["transport", "answer", "final"]
    retry_after: float | None = None
    endpoint_fault: bool = False    # counts against the endpoint's health


def backoff_delay(retry: int, base_s: float, max_s: float, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): exponential, capped, jittered.

    Half the capped exponential delay is fixed and half random ("equal jitter"); a server's
    Retry-After is honoured up to ``max_s``.
    """
    delay = min(max_s, base_s * (2 ** (retry - 1)))
    delay = delay / 2 + (rng or random).uniform(0, delay / 2)
    if retry_after_s:
        delay = min(max_s, max(delay, retry_after_s))
    return delay


# --------------------------------------------------------------------------- connection state


class _Endpoint:
    """One server: its SDK client, requests in flight, and health."""

    __slots__ = ("url", "client", "in_flight", "failures", "down_until")

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.client = client
        self.in_flight = 0
        self.failures = 0
        self.down_until = 0.0


class _Pool:
    """Connection state bound to one event loop: endpoints and the in-flight semaphore."""

    def __init__(self, settings: ClientSettings, api_key: str) -> None:
        import httpx2

        self.settings = settings
        self.endpoints = [_Endpoint(url, _sdk_client(settings, url, api_key))
                          for url in settings.endpoints]
        self.semaphore = asyncio.Semaphore(settings.max_in_flight)
        self.turn = 0
        self.raw_response = httpx2.Response

    def pick(self, avoid: _Endpoint | None) -> _Endpoint:
        """The endpoint for the next attempt: a healthy one, not ``avoid`` if there is a choice."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        now = time.monotonic()
        up = [e for e in endpoints if e.down_until <= now]
        if not up:
            return min(endpoints, key=lambda e: e.down_until)
        if avoid is not None and len(up) > 1:
            up = [e for e in up if e is not avoid]
        self.turn += 1
        start = self.turn % len(up)
        if self.settings.balance == "round_robin":
            return up[start]
        return min(up[start:] + up[:start], key=lambda e: e.in_flight)

    def failed(self, endpoint: _Endpoint) -> bool:
        """Record a transport failure; True when this starts a cooldown."""
        endpoint.failures += 1
        if endpoint.failures < self.settings.endpoint_fail_threshold:
            return False
        now = time.monotonic()
        starts = endpoint.down_until <= now
        endpoint.down_until = now + self.settings.endpoint_cooldown_s
        return starts and len(self.endpoints) > 1

    async def close(self) -> None:
        """Close every SDK client (and its HTTP connections)."""
        for endpoint in self.endpoints:
            await endpoint.client.close()


class _DirectStatusError(Exception):
    """An HTTP error status from the direct transport (same fields _status_fault reads)."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.response = type("_Response", (), {"headers": headers})()
        self.body = body
        self.message = message


class _DirectResponse:
    """The raw body of a direct-transport answer."""

    def __init__(self, content: bytes) -> None:
        self.content = content


class _DirectClient:
    """The OpenAI chat-completions call on a bare aiohttp session: no SDK request building.

    Presents the subset of AsyncOpenAI the client uses (``post``, ``close``). Connection problems
    surface as OSError (ConnectionError / TimeoutError) and HTTP errors as _DirectStatusError,
    so the client's fault classification is the same as for the SDK transports.
    """

    def __init__(self, settings: ClientSettings, url: str, api_key: str) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_in_flight, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s))

    async def post(self, path: str, body: dict[str, Any], cast_to: Any = None) -> _DirectResponse:
        """POST ``body`` as JSON to ``path``; the raw answer, or an exception."""
        aiohttp = self._aiohttp
        try:
            async with self._session.post(self._url + path, data=json.dumps(body),
                                          headers=self._headers) as response:
                content = await response.read()
                if response.status >= 400:
                    raise _DirectStatusError(response.status, dict(response.headers),
                                             _json_or_none(content), content[:300].decode(errors="replace"))
                return _DirectResponse(content)
        except asyncio.TimeoutError as exc:
            raise TimeoutError(str(exc) or "request timed out") from exc
        except aiohttp.ClientPayloadError as exc:
            raise ValueError(f"unreadable body: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _sdk_client(settings: ClientSettings, url: str, api_key: str) -> Any:
    """An AsyncOpenAI for ``url`` with its own connection pool sized to ``max_in_flight``
    (or, with transport "direct", a bare aiohttp session speaking the same API)."""
    import httpx2
    import openai

    if settings.transport == "direct":
        return _DirectClient(settings, url, api_key)

    limits = httpx2.Limits(max_connections=settings.max_in_flight,
                           max_keepalive_connections=settings.max_in_flight)
    if settings.transport == "aiohttp":
        http = openai.DefaultAioHttpClient(limits=limits, timeout=settings.timeout_s)
    else:
        http = httpx2.AsyncClient(limits=limits, timeout=settings.timeout_s)
    return openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0,
                              timeout=settings.timeout_s, http_client=http)


class _LoopThread:
    """A private event loop running in a daemon thread, for synchronous callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-chat-client",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("run_many was called from the client's own event loop; "
                               "use 'await client.chat(...)' there")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Stop the loop, end the thread, close the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------- the client


def _new_metrics() -> dict[str, Any]:
    return {"requests": 0, "attempts": 0, "retries": 0, "answers": 0, "endpoint_cooldowns": 0,
            "failures": {}, "retry_reasons": {}}


class VllmChatClient:
    """Async chat client for vLLM servers: retries, endpoint spreading, answer checks, metrics.

    Beam use: build it in the DoFn's constructor (it pickles as its settings), call ``setup()``
    in ``DoFn.setup``, ``run_many(requests)`` per batch, ``teardown()`` in ``DoFn.teardown``.
    Async use: ``await client.chat(req)`` from any event loop (connection state is kept per loop;
    ``await client.aclose()`` when done with that loop).

    ``metrics`` counts requests, attempts, retries, answers, endpoint cooldowns, failures by
    reason and retries by reason, across all loops.
    """

    def __init__(self, settings: ClientSettings | Mapping[str, Any], where: str = "client") -> None:
        if isinstance(settings, ClientSettings):
            try:
                settings.check()
            except ConfigError as exc:
                raise ConfigError(f"{where}.{exc}") from None
        else:
            settings = parse_settings(ClientSettings, settings, where)
        self.settings: ClientSettings = settings
        self.checks = AnswerChecks.from_settings(settings)
        self.metrics: dict[str, Any] = _new_metrics()
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._pools: dict[asyncio.AbstractEventLoop, _Pool] = {}
        self._runner: _LoopThread | None = None
        self._rng = random.Random()

    def __repr__(self) -> str:
        s = self.settings
        return (f"VllmChatClient(model={s.model!r}, endpoints={s.endpoints!r}, "
                f"max_in_flight={s.max_in_flight})")

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def provenance(self) -> dict[str, Any]:
        """Client name, version and settings (no secrets: only the key's env var name)."""
        return {"name": "vllm-chat-client", "version": CLIENT_VERSION,
                "settings": dataclasses.asdict(self.settings)}

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """Start the client's event loop thread (connections open lazily on first request)."""
        with self._setup_lock:
            if self._runner is None:
                self._runner = _LoopThread()

    def teardown(self) -> None:
        """Close connections and stop the loop thread; ``run_many`` afterwards starts anew.

        Call it after the last batch has returned (Beam: ``DoFn.teardown``).
        """
        with self._setup_lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            pool = self._pools.pop(runner.loop, None)
            if pool is not None:
                runner.run(pool.close())
            runner.stop()
        self._pools.clear()

    async def aclose(self) -> None:
        """Close the connection state of the running event loop."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------ requests

    def request(self, *, system: str | None = None, shared_text: str = "",
                shared_images: Sequence[ImageLike] = (), region_images: Sequence[ImageLike] = (),
                text: str = "", json_schema: dict[str, Any] | None = None,
                schema_name: str = "answer", region_id: str | None = None) -> ChatRequest:
        """A ChatRequest built with ``build_messages`` under this client's image settings."""
        messages = build_messages(system=system, shared_text=shared_text,
                                  shared_images=shared_images, region_images=region_images,
                                  text=text, max_pixels=self.settings.image_max_pixels,
                                  image_format=self.settings.image_format,
                                  jpeg_quality=self.settings.jpeg_quality)
        return ChatRequest(messages, json_schema=json_schema, schema_name=schema_name,
                           region_id=region_id)

    def encode_image(self, image: ImageLike) -> str:
        """``encode_image`` with this client's settings; encode a shared image once per image."""
        return encode_image(image, self.settings.image_max_pixels, self.settings.image_format,
                            self.settings.jpeg_quality)

    def run_many(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Run ``requests`` concurrently (bounded by max_in_flight); results in input order.

        Synchronous: runs on the client's own loop thread (started if needed), so it can be
        called from a Beam DoFn, repeatedly and from several threads.
        """
        if not requests:
            return []
        self.setup()
        assert self._runner is not None
        return self._runner.run(self._gather(list(requests)))

    async def _gather(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return list(await asyncio.gather(*(self.chat(r) for r in requests)))

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Ask one chat completion: a ChatAnswer, or an AnnotatorFailure with a reason.

        Never raises, except when cancelled.
        """
        self._bump("requests")
        try:
            result = await self._chat(self._pool(), request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # an unexpected error must cost one request, not the batch
            log.warning("chat request failed unexpectedly", exc_info=True)
            result = AnnotatorFailure("client_error", f"{type(exc).__name__}: {exc}"[:500],
                                      request.region_id)
        if isinstance(result, AnnotatorFailure):
            self._bump("failures", result.reason)
        else:
            self._bump("answers")
        return result

    def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for old in [lp for lp in self._pools if lp.is_closed()]:
                del self._pools[old]
            api_key = os.environ.get(self.settings.api_key_env) or "EMPTY"
            if api_key == "EMPTY":
                log.info("env var %s is not set; sending no real API key",
                         self.settings.api_key_env)
            if self.settings.quiet_http_logs:
                logging.getLogger("httpx2").setLevel(logging.WARNING)
            pool = self._pools[loop] = _Pool(self.settings, api_key)
        return pool

    async def _chat(self, pool: _Pool, request: ChatRequest) -> ChatResult:
        s = self.settings
        started = time.perf_counter()
        attempts = transport_retries = answer_retries = 0
        endpoint: _Endpoint | None = None
        while True:
            attempts += 1
            async with pool.semaphore:
                endpoint = pool.pick(avoid=endpoint)
                outcome = await self._attempt(pool, endpoint, request, answer_retries)
            if isinstance(outcome, ChatAnswer):
                outcome.attempts, outcome.total_s = attempts, time.perf_counter() - started
                return outcome
            if outcome.kind == "transport" and transport_retries < s.max_retries:
                transport_retries += 1
                self._bump("retry_reasons", outcome.reason)
                await asyncio.sleep(backoff_delay(transport_retries, s.backoff_base_s,
                                                  s.backoff_max_s, outcome.retry_after, self._rng))
                continue
            if (outcome.kind == "answer" and outcome.reason in s.retry_answer_reasons
                    and answer_retries < s.answer_retries):
                answer_retries += 1
                self._bump("retry_reasons", outcome.reason)
                continue
            detail = f"{outcome.detail} (after {attempts} attempt(s))"
            return AnnotatorFailure(outcome.reason, detail, request.region_id)

    def _body(self, request: ChatRequest, answer_retry: int) -> dict[str, Any]:
        s = self.settings
        temperature = s.temperature if request.temperature is None else request.temperature
        seed = s.seed
        if answer_retry:
            temperature = s.answer_retry_temperature if s.answer_retry_temperature is not None \
                else temperature
            seed = None if seed is None else seed + answer_retry
        body: dict[str, Any] = {"model": s.model, "messages": request.messages,
                                "temperature": temperature,
                                "max_tokens": request.max_tokens or s.max_tokens,
                                **s.extra_body, **request.extra}
        if seed is not None:
            body["seed"] = seed
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": request.schema_name, "schema": request.json_schema, "strict": True}}
        return body

    async def _attempt(self, pool: _Pool, endpoint: _Endpoint, request: ChatRequest,
                       answer_retry: int) -> ChatAnswer | _Fault:
        body = self._body(request, answer_retry)
        self._bump("attempts")
        started = time.perf_counter()
        endpoint.in_flight += 1
        try:
            # The raw response (not the typed ChatCompletion): we check and parse it ourselves.
            response = await endpoint.client.post("/chat/completions", body=body,
                                                  cast_to=pool.raw_response)
            data = json.loads(response.content)
        except Exception as exc:  # classified below; anything unknown is not retried
            fault = self._classify_error(exc, time.perf_counter() - started, endpoint.url)
        else:
            fault = None
        finally:
            endpoint.in_flight -= 1
        if fault is None:
            result = self._read(data, request, time.perf_counter() - started, endpoint.url)
        else:
            result = fault
        self._note_health(pool, endpoint, result)
        return result

    def _note_health(self, pool: _Pool, endpoint: _Endpoint, result: ChatAnswer | _Fault) -> None:
        """Reset the endpoint's failure run on an answer; count a transport fault against it."""
        if not isinstance(result, _Fault) or not result.endpoint_fault:
            endpoint.failures = 0
        elif pool.failed(endpoint):
            self._bump("endpoint_cooldowns")
            log.warning("endpoint %s failed %d times in a row (%s); skipping it for %.0f s",
                        endpoint.url, endpoint.failures, result.reason,
                        self.settings.endpoint_cooldown_s)

    def _classify_error(self, exc: Exception, elapsed: float, url: str) -> _Fault:
        import openai

        if isinstance(exc, (openai.APIStatusError, _DirectStatusError)):
            return _status_fault(exc, url)
        if isinstance(exc, (openai.APIConnectionError, OSError)):
            # The aiohttp transport reports refused/dropped connections as timeouts too: tell
            # them apart by the time taken. (OSError covers TimeoutError and socket errors.)
            timed_out = elapsed >= 0.9 * self.settings.timeout_s
            reason = "timeout" if timed_out else "connection"
            cause = exc.__cause__ or exc
            what = "timed out" if timed_out else "connection failed"
            detail = (f"{what} after {elapsed:.2f} s talking to {url}: "
                      f"{type(cause).__name__}: {cause}")
            return _Fault(reason, detail[:500], "transport", endpoint_fault=True)
        if isinstance(exc, (ValueError, UnicodeDecodeError)):
            return _Fault("bad_response", f"unreadable response body from {url}: {exc}"[:500],
                          "transport", endpoint_fault=True)
        return _Fault("client_error", f"{type(exc).__name__}: {exc}"[:500], "final")

    def _read(self, data: Any, request: ChatRequest, latency: float,
              url: str) -> ChatAnswer | _Fault:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices[0], dict):
            return _Fault("bad_response", f"no choices in the answer from {url}",
                          "transport", endpoint_fault=True)
        choice = choices[0]
        text = (choice.get("message") or {}).get("content") or ""
        finish = choice.get("finish_reason") or ""
        parsed, problem = check_answer(text, finish, request.json_schema, self.checks)
        if problem:
            return _Fault(problem[0], problem[1], "answer")
        usage = {k: v for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
        return ChatAnswer(text=text, parsed=parsed, finish_reason=finish, usage=usage,
                          latency_s=latency, endpoint=url, region_id=request.region_id)

    def _bump(self, key: str, sub: str | None = None) -> None:
        with self._lock:
            if sub is None:
                self.metrics[key] += 1
            else:
                table = self.metrics[key]
                table[sub] = table.get(sub, 0) + 1
                if key == "retry_reasons":
                    self.metrics["retries"] += 1


def _status_fault(exc: Any, url: str) -> _Fault:
    """An HTTP error: 408, 429 and 5xx are transient; any other status fails at once."""
    status = int(exc.status_code)
    detail = f"HTTP {status} from {url}: {_error_message(exc)}"[:500]
    transient = status in (408, 429) or status >= 500
    retry_after = _retry_after(exc.response.headers.get("retry-after")) if transient else None
    return _Fault(f"http_{status}", detail, "transport" if transient else "final",
                  retry_after=retry_after, endpoint_fault=status >= 500)


def _error_message(exc: Any) -> str:
    """The server's error message (vLLM: {"message": ...}; OpenAI: {"error": {"message": ...}})."""
    body = exc.body if isinstance(exc.body, dict) else {}
    nested = body.get("error")
    if isinstance(nested, dict) and nested.get("message"):
        return str(nested["message"])
    return str(body.get("message") or exc.message)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
