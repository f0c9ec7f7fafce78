"""The HTTP backend: an async chat client for OpenAI-compatible servers (vLLM, SGLang, TGI).

Captioners send many small chat requests (one per region) to one or more servers.
``VllmChatClient`` does that well:

* ``generate(requests)`` (the backend interface) and ``run_many(chat_requests)`` work from
  synchronous code (a Beam DoFn) on the client's own event loop, bounded by ``max_in_flight``,
  results in input order; ``await chat(request)`` works from any event loop. None of them raises
  for one request: each result is a ``ChatAnswer`` or an ``AnnotatorFailure``.
* Transient faults (5xx, 429, timeouts, dropped or refused connections, unreadable bodies) are
  retried with jittered exponential backoff, spread across endpoints, and an endpoint failing
  repeatedly is skipped for a cooldown (``endpoints``); other 4xx fail at once (``http_400``, ...;
  ``transports``). Answers failing a check (``checks``) listed in ``retry_answer_reasons`` are
  asked again.
* An answer is data: a response body is parsed only up to ``max_body_bytes``, invalid UTF-8 in
  it becomes U+FFFD, and the text is cleaned, bounded and parsed strictly by ``check_answer``.
* Messages put the parts shared by all regions of an image (system prompt, whole image) first,
  for the server's prefix cache (``messages``); images are fit to a pixel budget and sent as data
  URLs (``images``).
* Cost: each request's ``cost`` (``CallCost``) counts its HTTP attempts (failed ones apart), the
  request body bytes of each attempt (serialised here, once, and sent as they are: the count is
  exactly what went over the wire, headers excluded), the bodies of the completions read, and
  the tokens of the server's ``usage`` (a completion without it is counted as such, its tokens
  unknown).

The API key is read from an environment variable when the connection state is built; it is
held only by the SDK client objects, never in settings, logs or provenance.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import threading
import time
from typing import Any, Mapping, Sequence

from annotators.base import AnnotatorFailure
from annotators.caption.backends.base import (
    IN_FLIGHT,
    Backend,
    CallCost,
    ChatAnswer,
    ChatResult,
    GenerationRequest,
    ImageLike,
    prepare_images,
)
from annotators.caption.backends.checks import AnswerChecks, check_answer
from annotators.caption.backends.images import encode_image
from annotators.caption.backends.openai_api.endpoints import Endpoint, Pool, backoff_delay
from annotators.caption.backends.openai_api.messages import ChatRequest, build_messages
from annotators.caption.backends.openai_api.settings import ClientSettings
from annotators.caption.backends.openai_api.transports import (
    Fault,
    classify_error,
    max_body_bytes,
)
from settings import ConfigError, parse_settings

log = logging.getLogger(__name__)

CLIENT_VERSION = "1"


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


def _json_body(content: bytes) -> Any:
    """A response body as JSON; invalid UTF-8 (a server cutting a character in two) becomes
    U+FFFD instead of failing the whole answer."""
    try:
        return json.loads(content)
    except UnicodeDecodeError:
        return json.loads(content.decode("utf-8", errors="replace"))


def request_bytes(body: dict[str, Any]) -> bytes:
    """The JSON bytes of a request body, as the OpenAI SDK and httpx would write them (compact,
    UTF-8, no NaN)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _new_metrics() -> dict[str, Any]:
    return {"requests": 0, "attempts": 0, "retries": 0, "answers": 0, "endpoint_cooldowns": 0,
            "failures": {}, "retry_reasons": {}}


class VllmChatClient(Backend):
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
        self._pools: dict[asyncio.AbstractEventLoop, Pool] = {}
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
                schema_name: str = "answer", region_id: str | None = None,
                max_tokens: int | None = None, temperature: float | None = None,
                cost: CallCost | None = None) -> ChatRequest:
        """A ChatRequest built with ``build_messages`` under this client's image settings; its
        cost is counted into ``cost`` when given."""
        messages = build_messages(system=system, shared_text=shared_text,
                                  shared_images=shared_images, region_images=region_images,
                                  text=text, max_pixels=self.settings.image_max_pixels,
                                  image_format=self.settings.image_format,
                                  jpeg_quality=self.settings.jpeg_quality)
        return ChatRequest(messages, json_schema=json_schema, schema_name=schema_name,
                           region_id=region_id, max_tokens=max_tokens, temperature=temperature,
                           cost=CallCost() if cost is None else cost)

    def encode_image(self, image: ImageLike) -> str:
        """``encode_image`` with this client's settings; encode a shared image once per image."""
        return encode_image(image, self.settings.image_max_pixels, self.settings.image_format,
                            self.settings.jpeg_quality)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[ChatResult]:
        """Answer caption-program requests (the backend interface): each image encoded once per
        call, requests run together by ``run_many``; results in input order, each request's
        cost counted into its ``cost``."""
        prepared = prepare_images(requests, self.encode_image)
        chats = [self.request(system=r.system, shared_images=images, text=r.text,
                              json_schema=r.json_schema, schema_name=r.schema_name,
                              region_id=r.region_id, max_tokens=r.max_tokens,
                              temperature=r.temperature, cost=r.cost)
                 for r, images in zip(requests, prepared, strict=True)
                 if not isinstance(images, AnnotatorFailure)]
        answers = iter(self.run_many(chats))
        return [images if isinstance(images, AnnotatorFailure) else next(answers)
                for images in prepared]

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
        """``chat`` of each request, in input order. At most 2 × ``max_in_flight`` are under way
        at once (the semaphore bounds what is on the wire; the others keep it full while some
        back off): a batch of thousands of requests does not become thousands of live tasks,
        which would cost the garbage collector more CPU than the requests themselves."""
        results: list[Any] = [None] * len(requests)
        order = iter(range(len(requests)))

        async def worker() -> None:
            for i in order:   # shared: each index is taken by one worker
                results[i] = await self.chat(requests[i])

        await asyncio.gather(*(worker() for _ in range(min(len(requests), 2 * self.settings.max_in_flight))))
        return results

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Ask one chat completion: a ChatAnswer, or an AnnotatorFailure with a reason.

        Never raises, except when cancelled.
        """
        self._bump("requests")
        request.cost.requests += 1
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

    def _pool(self) -> Pool:
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
            pool = self._pools[loop] = Pool(self.settings, api_key)
        return pool

    async def _chat(self, pool: Pool, request: ChatRequest) -> ChatResult:
        s = self.settings
        started = time.perf_counter()
        attempts = transport_retries = answer_retries = 0
        endpoint: Endpoint | None = None
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

    async def _attempt(self, pool: Pool, endpoint: Endpoint, request: ChatRequest,
                       answer_retry: int) -> ChatAnswer | Fault:
        data = request_bytes(self._body(request, answer_retry))
        self._bump("attempts")
        cost = request.cost
        cost.calls += 1
        cost.bytes_sent += len(data)
        started = time.perf_counter()
        endpoint.in_flight += 1
        IN_FLIGHT.add(1)
        try:
            # The raw response (not the typed ChatCompletion): we check and parse it ourselves.
            response = await endpoint.client.post("/chat/completions", content=data,
                                                  cast_to=pool.raw_response)
            content: bytes = response.content
        except Exception as exc:  # classified below; anything unknown is not retried
            fault = classify_error(exc, time.perf_counter() - started, endpoint.url,
                                   self.settings.timeout_s)
        else:
            fault = None
        finally:
            endpoint.in_flight -= 1
            IN_FLIGHT.add(-1)
        if fault is None:
            cost.bytes_received += len(content)
            result = self._read(content, request, time.perf_counter() - started, endpoint.url)
        else:
            result = fault
        if isinstance(result, Fault):
            cost.failed_calls += 1
        self._note_health(pool, endpoint, result)
        return result

    def _note_health(self, pool: Pool, endpoint: Endpoint, result: ChatAnswer | Fault) -> None:
        """Reset the endpoint's failure run on an answer; count a transport fault against it."""
        if not isinstance(result, Fault) or not result.endpoint_fault:
            endpoint.failures = 0
        elif pool.failed(endpoint):
            self._bump("endpoint_cooldowns")
            log.warning("endpoint %s failed %d times in a row (%s); skipping it for %.0f s",
                        endpoint.url, endpoint.failures, result.reason,
                        self.settings.endpoint_cooldown_s)

    def _read(self, content: bytes, request: ChatRequest, latency: float,
              url: str) -> ChatAnswer | Fault:
        """The checked answer in a response body, or why there is none.

        A body over ``max_body_bytes`` is not parsed (``answer_too_large``); invalid UTF-8 is
        decoded with U+FFFD replacements (the answer's characters are then checked like any
        other); a body that is not a chat completion is ``bad_response``. The completion's
        ``usage`` is counted into ``request.cost`` whether or not its answer passes the checks
        (the tokens were spent); an unparsed completion's tokens are unknown."""
        limit = max_body_bytes(self.settings.max_answer_chars)
        if len(content) > limit:
            request.cost.calls_without_usage += 1
            return Fault("answer_too_large", f"a {len(content)}-byte response from {url}, more "
                         f"than the {limit} bytes an answer of at most "
                         f"{self.settings.max_answer_chars} characters needs", "answer")
        try:
            data = _json_body(content)
        except (ValueError, RecursionError) as exc:
            return Fault("bad_response", f"unreadable response body from {url}: {exc}"[:500],
                         "transport", endpoint_fault=True)
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        text = (message.get("content") if isinstance(message, dict) else None) or ""
        if not isinstance(message, dict) or not isinstance(text, str):
            return Fault("bad_response", f"no chat answer (choices[0].message.content as text) "
                         f"in the response from {url}", "transport", endpoint_fault=True)
        usage = request.cost.add_usage(data.get("usage"))
        finish = choice.get("finish_reason")
        finish = finish if isinstance(finish, str) else ""
        text, parsed, problem = check_answer(text, finish, request.json_schema, self.checks)
        if problem:
            return Fault(problem[0], problem[1], "answer")
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
