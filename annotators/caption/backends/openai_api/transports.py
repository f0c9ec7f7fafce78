"""How a request goes over the wire, and what its errors mean.

Transports: "asyncio" (default: HTTP/1.1 on asyncio's own sockets, ``http1``), "direct" (the
same requests on a bare aiohttp session), ``AsyncOpenAI`` over the SDK's aiohttp transport
("aiohttp"), or the SDK's httpx transport ("httpx"). The client calls ``post`` with the
request body already serialised (``content``: the same bytes on every transport, counted as
sent) and parses the raw response itself: the SDK's typed
``chat.completions.create`` walks every message part with typing introspection and builds a
pydantic answer (about 0.6 ms more CPU per request, measured), and httpx's own connection pool
scans all its connections on each request (about 2 ms per request at 256 connections); both
matter at hundreds of requests per second.

Errors become a ``Fault``: HTTP 408, 429 and 5xx, timeouts, refused or dropped connections and
unreadable bodies are transient (retried); other HTTP errors fail at once.
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from annotators.caption.backends.openai_api.settings import ClientSettings


@dataclass
class Fault:
    """Why one attempt failed, and whether to try again (kind "transport"/"answer"/"final")."""

    reason: str
    detail: str
    kind: Literal["transport", "answer", "final"]
    retry_after: float | None = None
    endpoint_fault: bool = False    # counts against the endpoint's health


class DirectStatusError(Exception):
    """An HTTP error status from the asyncio or direct transport (the fields status_fault reads);
    build it with ``of``."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.response = type("_Response", (), {"headers": headers})()
        self.body = body
        self.message = message

    @classmethod
    def of(cls, status: int, headers: Mapping[str, str], content: bytes) -> "DirectStatusError":
        """The error for a response: header names lower-cased (servers write ``Retry-After`` in
        any case), the body as JSON where it is, its start as the message."""
        return cls(status, {name.lower(): value for name, value in headers.items()},
                   _json_or_none(content), content[:300].decode(errors="replace"))


class _DirectResponse:
    """The raw body of a direct-transport answer."""

    def __init__(self, content: bytes) -> None:
        self.content = content


class _DirectClient:
    """The OpenAI chat-completions call on a bare aiohttp session: no SDK request building.

    Presents the subset of AsyncOpenAI the client uses (``post``, ``close``). Connection problems
    surface as OSError (ConnectionError / TimeoutError) and HTTP errors as DirectStatusError,
    so the client's fault classification is the same as for the SDK transports.
    """

    def __init__(self, settings: ClientSettings, url: str, api_key: str) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._proxy = env_proxy(self._url)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.max_in_flight, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s))

    async def post(self, path: str, content: bytes, cast_to: Any = None) -> _DirectResponse:
        """POST ``content`` (a JSON body) to ``path``; the raw answer, or an exception."""
        aiohttp = self._aiohttp
        try:
            async with self._session.post(self._url + path, data=content, headers=self._headers,
                                          proxy=self._proxy) as response:
                content = await response.read()
                if response.status >= 400:
                    raise DirectStatusError.of(response.status, response.headers, content)
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


def env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / ALL_PROXY name for ``url``, None where there is none or NO_PROXY
    exempts its host: as the SDK's clients pick it, decided once per endpoint (aiohttp's
    ``trust_env`` decides it per request, in a thread: a third of the client's CPU here)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxy


def max_body_bytes(max_answer_chars: int) -> int:
    """The largest response body parsed: room for an answer of ``max_answer_chars`` characters
    written as JSON escapes (up to 12 bytes per character: a ``\\uXXXX`` surrogate pair), plus
    1 MiB for the rest of the completion (ids, usage, log-probabilities)."""
    return 12 * max_answer_chars + (1 << 20)


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def connect(settings: ClientSettings, url: str, api_key: str) -> Any:
    """An AsyncOpenAI for ``url`` with its own connection pool sized to ``max_in_flight``
    (or, with transport "asyncio" or "direct", a lighter client speaking the same API)."""
    if settings.transport == "asyncio":
        from annotators.caption.backends.openai_api.http1 import Http1Client

        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                   "User-Agent": "multigran"}
        return Http1Client(url, headers, limit=settings.max_in_flight,
                           timeout_s=settings.timeout_s,
                           body_limit=max_body_bytes(settings.max_answer_chars),
                           proxy=env_proxy(url))
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


def classify_error(exc: Exception, elapsed: float, url: str, timeout_s: float) -> Fault:
    """The fault behind an exception from ``post`` after ``elapsed`` seconds of an attempt."""
    import openai

    if isinstance(exc, (openai.APIStatusError, DirectStatusError)):
        return status_fault(exc, url)
    if isinstance(exc, (openai.APIConnectionError, OSError)):
        # The aiohttp transport reports refused/dropped connections as timeouts too: tell
        # them apart by the time taken. (OSError covers TimeoutError and socket errors.)
        timed_out = elapsed >= 0.9 * timeout_s
        reason = "timeout" if timed_out else "connection"
        cause = exc.__cause__ or exc
        what = "timed out" if timed_out else "connection failed"
        detail = (f"{what} after {elapsed:.2f} s talking to {url}: "
                  f"{type(cause).__name__}: {cause}")
        return Fault(reason, detail[:500], "transport", endpoint_fault=True)
    if isinstance(exc, (ValueError, UnicodeDecodeError)):
        return Fault("bad_response", f"unreadable response body from {url}: {exc}"[:500],
                     "transport", endpoint_fault=True)
    return Fault("client_error", f"{type(exc).__name__}: {exc}"[:500], "final")


def status_fault(exc: Any, url: str) -> Fault:
    """An HTTP error: 408, 429 and 5xx are transient; any other status fails at once."""
    status = int(exc.status_code)
    detail = f"HTTP {status} from {url}: {_error_message(exc)}"[:500]
    transient = status in (408, 429) or status >= 500
    retry_after = _retry_after(exc.response.headers.get("retry-after")) if transient else None
    return Fault(f"http_{status}", detail, "transport" if transient else "final",
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
