"""The ``asyncio`` transport: the chat-completions POST over HTTP/1.1 on asyncio's own sockets.

At hundreds of requests per second an HTTP client's own CPU decides how many requests one
event loop keeps in flight: every answer of a wave waits for the ones parsed before it. On aiohttp
(its request and response objects, multidicts, cookie jar, tracing hooks) the caption client
needs ~0.3 ms of CPU per request; on this client, which does what a chat request needs and no
more, ~0.13 ms (``bench/caption_client_bench.py``, 2-core machine):

* one POST per connection at a time, connections kept alive and reused last-in first-out (at
  most ``limit`` idle ones; the caller bounds the requests under way, as the client's pool
  does with ``max_in_flight``);
* responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the
  connection; gzip / deflate bodies decoded (``Accept-Encoding: identity`` is asked for);
  ``1xx`` interim responses skipped;
* TLS (the system's trust store; ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` are honoured), and the
  proxy of ``HTTP(S)_PROXY`` / ``NO_PROXY``: an http target through an absolute-form request,
  an https one through a ``CONNECT`` tunnel; credentials in the proxy URL are sent as Basic
  ``Proxy-Authorization``;
* one deadline per attempt (connecting, sending and reading), as aiohttp's ``total`` timeout.

Errors come out as the other transports' do, so ``transports.classify_error`` reads them the
same way: connection problems as ``OSError`` (``ConnectionError``, ``TimeoutError``, SSL
errors), an HTTP status >= 400 as ``DirectStatusError``, a malformed response as
``ValueError``. A body is read up to ``body_limit`` bytes: past it the first ``body_limit + 1``
bytes are returned (the caller rejects them as too large) and the connection is closed.
"""
from __future__ import annotations

import asyncio
import base64
import ssl
import sys
import urllib.parse
import zlib
from typing import Any, Awaitable

from annotators.caption.backends.openai_api.transports import DirectStatusError

MAX_HEAD_BYTES = 64 * 1024          # status line and headers of one response
_NO_BODY = (204, 304)


class _Response:
    """A complete response: status, headers (lower-case names) and body."""

    __slots__ = ("status", "headers", "content")

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.status = status
        self.headers = headers
        self.content = content


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; ``exchange`` sends a request and waits for its response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, body_limit: int) -> None:
        self.loop = loop
        self.body_limit = body_limit
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[_Response] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._framing = ""           # "length" / "chunked" / "close" / "none"
        self._remaining = 0          # of a Content-Length body
        self._body = bytearray()     # decoded chunks so far
        self._keep_alive = True
        self._head_only = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()             # bytes nobody asked for: the connection is out of step
            return
        self._buffer += data
        try:
            self._advance()
        except ValueError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return False                 # let the transport close; connection_lost decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._head is not None and self._framing == "close":
            self._finish(bytes(self._buffer))
            return
        got = "before the response" if self._head is None else "in the middle of the body"
        error = ConnectionError(f"server closed the connection {got}"
                                + (f": {exc}" if exc else ""))
        self._fail(error)

    # -- use
    async def exchange(self, request: bytes, head_only: bool = False) -> _Response:
        """Send ``request`` (head and body) and wait for the whole response (with
        ``head_only``, for its head: the answer to CONNECT has no body)."""
        self._waiter = self.loop.create_future()
        self._head, self._framing, self._keep_alive = None, "", True
        self._head_only = head_only
        self._body.clear()
        self.reusable = False
        if self.closed or self.transport is None or self.transport.is_closing():
            self._waiter = None
            raise ConnectionError("the connection closed before the request was sent")
        self.transport.write(request)
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- parsing
    def _advance(self) -> None:
        while self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise ValueError(f"response head over {MAX_HEAD_BYTES} bytes")
                return
            status, headers = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[:end + 4]
            if 100 <= status < 200:
                continue             # an interim response: the real one follows
            self._start_body(status, headers)
        if self._framing == "length":
            if self._remaining > self.body_limit:
                if len(self._buffer) > self.body_limit:
                    self._keep_alive = False
                    self._finish(bytes(self._buffer[:self.body_limit + 1]))
            elif len(self._buffer) >= self._remaining:
                body = bytes(self._buffer[:self._remaining])
                del self._buffer[:self._remaining]
                self._finish(body)
        elif self._framing == "chunked":
            self._advance_chunks()
        elif self._framing == "close":
            if len(self._buffer) > self.body_limit:
                self._finish(bytes(self._buffer[:self.body_limit + 1]))
        else:
            self._finish(b"")

    def _start_body(self, status: int, headers: dict[str, str]) -> None:
        self._head = (status, headers)
        connection = headers.get("connection", "").lower()
        self._keep_alive = "close" not in connection
        if status in _NO_BODY or self._head_only:
            self._framing = "none"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise ValueError(f"bad Content-Length {headers['content-length']!r}") from None
            if self._remaining < 0:
                raise ValueError(f"bad Content-Length {self._remaining}")
            self._framing = "length"
        else:
            self._framing = "close"
            self._keep_alive = False

    def _advance_chunks(self) -> None:
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > 1024:
                    raise ValueError("chunk size line over 1024 bytes")
                return
            size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError(f"bad chunk size {size_text[:40]!r}") from None
            if size == 0:            # the last chunk, then trailer lines up to an empty line
                start = line_end + 2
                if buffer[start:start + 2] == b"\r\n":
                    end = start + 2
                else:
                    found = buffer.find(b"\r\n\r\n", start)
                    if found < 0:
                        return
                    end = found + 4
                del buffer[:end]
                self._finish(bytes(self._body))
                return
            if len(buffer) < line_end + 2 + size + 2:
                if len(self._body) + len(buffer) > self.body_limit:
                    self._keep_alive = False
                    self._finish(bytes((self._body + buffer[line_end + 2:])
                                       [:self.body_limit + 1]))
                return
            data_end = line_end + 2 + size
            if buffer[data_end:data_end + 2] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            self._body += buffer[line_end + 2:data_end]
            del buffer[:data_end + 2]
            if len(self._body) > self.body_limit:
                self._keep_alive = False
                self._finish(bytes(self._body[:self.body_limit + 1]))
                return

    def _finish(self, body: bytes) -> None:
        assert self._head is not None and self._waiter is not None
        status, headers = self._head
        self.reusable = (self._keep_alive and self._framing != "close" and not self._buffer
                         and not self.closed)
        waiter, self._waiter = self._waiter, None
        try:
            body = _decode(body, headers.get("content-encoding", ""), self.body_limit)
        except ValueError as exc:
            self.reusable = False
            waiter.set_exception(exc)
            return
        waiter.set_result(_Response(status, headers, body))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    if parts[0] == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
        headers.setdefault("connection", "close")
    return int(parts[1]), headers


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        try:
            inflater = zlib.decompressobj(wbits)
            return inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise ValueError(f"undecodable {encoding} body: {exc}") from None
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class _Target:
    """Where a request goes: the endpoint's scheme, host, port and path prefix, and the hop to
    connect to first (the endpoint itself, or its proxy)."""

    def __init__(self, url: str, proxy: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = _netloc(self.host, parts.port)
        self.prefix = parts.path.rstrip("/")
        self.proxy: tuple[str, int, bool] | None = None
        self.proxy_auth = ""
        if proxy:
            if "://" not in proxy:
                proxy = "http://" + proxy
            p = urllib.parse.urlsplit(proxy)
            if p.scheme not in ("http", "https"):
                raise ValueError(f"proxy scheme {p.scheme!r} is not supported (http or https)")
            self.proxy = (p.hostname or "", p.port or (443 if p.scheme == "https" else 80),
                          p.scheme == "https")
            if p.username is not None:
                user = urllib.parse.unquote(p.username)
                password = urllib.parse.unquote(p.password or "")
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                self.proxy_auth = f"Proxy-Authorization: Basic {token}\r\n"

    def request_target(self, path: str) -> str:
        """The request line's target: origin-form, or absolute-form to a plain-HTTP proxy."""
        if self.proxy is not None and not self.tls:
            return f"http://{self.netloc}{self.prefix}{path}"
        return self.prefix + path


def _netloc(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


class Http1Client:
    """POSTs to one endpoint over kept-alive HTTP/1.1 connections (``post``, ``close``).

    Presents what the caption client uses of the SDK client: ``await post(path, content=...)``
    returns an object with the raw body in ``.content``."""

    def __init__(self, url: str, headers: dict[str, str], limit: int, timeout_s: float,
                 body_limit: int, proxy: str | None = None) -> None:
        self._target = _Target(url, proxy)
        self._timeout_s = timeout_s
        self._body_limit = body_limit
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._limit = limit
        for name, value in headers.items():
            # a line break would start another header; the value (a key) is never shown
            if any(c in f"{name}{value}" for c in "\r\n\0") or not f"{name}{value}".isascii():
                raise ValueError(f"the {name} header holds a line break or a non-ASCII "
                                 f"character; check where its value comes from")
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._fixed_headers = (f"Host: {self._target.netloc}\r\n{extra}"
                               f"Accept-Encoding: identity\r\n"
                               + (self._target.proxy_auth if not self._target.tls else ""))
        self._ssl: ssl.SSLContext | None = None

    async def post(self, path: str, content: bytes, cast_to: Any = None) -> _Response:
        """POST ``content`` (a JSON body) to ``path``; the response, or an exception."""
        head = (f"POST {self._target.request_target(path)} HTTP/1.1\r\n{self._fixed_headers}"
                f"Content-Length: {len(content)}\r\n\r\n").encode("latin-1")
        held: list[_Connection] = []
        try:
            response = await _within(self._timeout_s, self._exchange(held, head + content))
        except (TimeoutError, asyncio.TimeoutError):
            for connection in held:
                connection.abort()
            raise TimeoutError(f"no complete response within {self._timeout_s:g} s") from None
        except BaseException:
            for connection in held:
                connection.abort()
            raise
        finally:
            for connection in held:
                self._release(connection)
        if response.status >= 400:
            raise DirectStatusError.of(response.status, response.headers, response.content)
        return response

    async def close(self) -> None:
        """Close every connection (and let the loop finish closing them)."""
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)

    async def _exchange(self, held: list[_Connection], request: bytes) -> _Response:
        connection = await self._connection()
        held.append(connection)
        return await connection.exchange(request)

    # -- connections
    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._open.discard(connection)
        return await self._connect()

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and len(self._idle) < self._limit:
            self._idle.append(connection)
        else:
            connection.close()
            self._open.discard(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        target = self._target

        def factory() -> _Connection:
            return _Connection(loop, self._body_limit)

        if target.proxy is None:
            _, connection = await loop.create_connection(
                factory, target.host, target.port,
                ssl=self._context() if target.tls else None,
                server_hostname=target.host if target.tls else None)
        else:
            host, port, proxy_tls = target.proxy
            _, connection = await loop.create_connection(
                factory, host, port, ssl=self._context() if proxy_tls else None,
                server_hostname=host if proxy_tls else None)
            if target.tls:
                try:
                    await self._tunnel(loop, connection)
                except BaseException:
                    connection.abort()
                    raise
        self._open.add(connection)
        return connection

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        """CONNECT through the proxy, then TLS to the endpoint on the same connection."""
        target = self._target
        authority = _netloc(target.host, target.port)
        response = await connection.exchange(
            (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{target.proxy_auth}\r\n")
            .encode("latin-1"), head_only=True)
        if not 200 <= response.status < 300:
            raise ConnectionError(f"proxy refused the tunnel to {authority}: "
                                  f"HTTP {response.status}")
        assert connection.transport is not None
        transport = await loop.start_tls(connection.transport, connection, self._context(),
                                         server_hostname=target.host)
        connection.transport = transport  # type: ignore[assignment]

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl



if sys.version_info >= (3, 11):
    async def _within(seconds: float, awaitable: Awaitable[Any]) -> Any:
        """``awaitable``'s result, or TimeoutError after ``seconds`` (one deadline for all)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    def _within(seconds: float, awaitable: Awaitable[Any]) -> Awaitable[Any]:
        return asyncio.wait_for(awaitable, seconds)
