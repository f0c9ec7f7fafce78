"""Settings of the HTTP chat client (``client`` / ``clients`` of the ``vllm`` captioner)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from annotators.caption.backends.checks import (
    ANSWER_REASONS,
    DEFAULT_REFUSALS,
    MAX_ANSWER_CHARS,
)
from settings import require


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
    # "asyncio": HTTP/1.1 on asyncio's own sockets (default; under half of aiohttp's client CPU
    # per request, see http1.py and bench/caption_client_bench.py); "direct": the same call on a
    # bare aiohttp session; "aiohttp": AsyncOpenAI over the SDK's aiohttp transport; "httpx":
    # the SDK's default transport. All four honour HTTP(S)_PROXY / NO_PROXY.
    transport: Literal["asyncio", "direct", "aiohttp", "httpx"] = "asyncio"
    quiet_http_logs: bool = True            # raise the httpx2 logger (INFO per request) to WARNING
    timeout_s: float = 120.0                # per attempt
    max_retries: int = 4                    # retries of transient faults (after the 1st try)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    image_max_pixels: int = 1024 * 1024     # client-side resize budget, aspect kept
    # The whole image when it must be re-encoded (over budget): "auto" keeps PNG sources PNG.
    image_format: Literal["auto", "jpeg", "png"] = "auto"
    jpeg_quality: int = 90
    # Visual prompts, drawn at the image_max_pixels size, at prompt_quality: "jpeg" (~4 ms per
    # megapixel), "webp" (~45 % fewer bytes, ~4-5x the CPU) or "png" (lossless, slowest); the
    # alpha kind needs an alpha channel: WebP (lossless alpha), or PNG with "png".
    prompt_format: Literal["jpeg", "webp", "png"] = "jpeg"
    prompt_quality: int = 90
    temperature: float = 0.0
    max_tokens: int = 512
    seed: int | None = 0
    extra_body: dict[str, Any] = field(default_factory=dict)   # e.g. {"repetition_penalty": 1.05}
    answer_retries: int = 1                 # re-asks for answers failing a check listed below
    retry_answer_reasons: list[str] = field(
        default_factory=lambda: ["answer_not_json", "answer_schema"])
    answer_retry_temperature: float | None = 0.5   # greedy decoding would repeat the same answer
    refusal_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSALS))
    repetition_ngram: int = 4
    repetition_max_repeats: int = 8         # the same n-gram this often -> repetition
    repetition_min_tokens: int = 40         # below this, the unique-ratio rule is not applied
    repetition_min_unique_ratio: float = 0.2
    # Keep free-text answers cut at max_tokens instead of failing them. Only for models that
    # never stop on their own (randomly initialised test models); structured answers still fail.
    allow_truncated: bool = False
    # A longer answer fails (answer_too_large), never cut: raise it with max_tokens beyond ~8k.
    max_answer_chars: int = MAX_ANSWER_CHARS

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
        require(1 <= self.prompt_quality <= 95, "prompt_quality", "must be within 1..95 (JPEG / "
                "WebP quality of visual prompts; 90 keeps thin outlines crisp)")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        require(self.answer_retries >= 0, "answer_retries", "must be >= 0")
        require(self.max_answer_chars >= 256, "max_answer_chars", "must be at least 256 "
                "characters (the default, 32768, is far above what max_tokens=512 writes)")
        require(self.repetition_ngram >= 1, "repetition_ngram", "must be >= 1")
        require(self.repetition_max_repeats >= 2, "repetition_max_repeats", "must be >= 2")
        require(0 <= self.repetition_min_unique_ratio <= 1, "repetition_min_unique_ratio",
                "must be within 0..1")
