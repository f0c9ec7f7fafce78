"""The ``asyncio`` transport's HTTP/1.1 client against scripted servers: every framing a server
may choose (delivered whole and byte by byte), keep-alive and when a connection is not reused,
malformed responses, deadlines, oversized bodies, HTTP errors, TLS and proxies (plain and
``CONNECT`` with credentials). The caption client's own tests (``test_vllm_client.py``) run the
same transport against the fault server, and ``test_vllm_real.py`` against a real vLLM."""
from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from annotators.caption.backends.openai_api.http1 import Http1Client
from annotators.caption.backends.openai_api.transports import (
    DirectStatusError,
    classify_error,
    status_fault,
)

CLOSE = object()            # in a script: close the connection here
Script = Callable[[int], list[Any]]   # request index -> pieces (bytes, a delay in s, CLOSE)


class ScriptedServer:
    """A raw HTTP/1.1 server answering request ``i`` with ``script(i)``; it records every
    request's head and body and counts connections."""

    def __init__(self, script: Script, split: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.script, self.split, self.tls = script, split, tls
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0

    async def __aenter__(self) -> "ScriptedServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                index = len(self.requests)
                self.requests.append((head, body))
                for piece in self.script(index):
                    if piece is CLOSE:
                        return
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    for part in ([piece[i:i + 1] for i in range(len(piece))] if self.split
                                 else [piece]):
                        writer.write(part)
                        await writer.drain()
                        if self.split:
                            await asyncio.sleep(0.001)
        finally:
            writer.close()


def client(url: str, **kw: Any) -> Http1Client:
    options = {"limit": 4, "timeout_s": 5.0, "body_limit": 1000, "proxy": None} | kw
    return Http1Client(url, {"Authorization": "Bearer sk-secret", "Content-Type":
                             "application/json"}, **options)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


GZ = gzip.compress(b"hello")
FRAMINGS = {   # name -> (response, reused afterwards)
    "length": (ok(b"hello"), True),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n", True),
    "chunked+trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", True),
    "interim 100": (b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"hello"), True),
    "gzip": (ok(GZ, "Content-Encoding: gzip\r\n"), True),
    "connection close": (ok(b"hello", "Connection: close\r\n"), False),
    "http/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", False),
    "until close": (b"HTTP/1.1 200 OK\r\n\r\nhello", False),
}


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_every_framing_gives_the_body_and_reuses_only_kept_alive_connections(
        name: str, split: bool) -> None:
    response, reused = FRAMINGS[name]
    closes = name == "until close"

    async def main() -> tuple[list[bytes], int, list[tuple[bytes, bytes]]]:
        script: Script = lambda i: [response, CLOSE] if closes else [response]
        async with ScriptedServer(script, split=split) as server:
            http = client(server.url())
            bodies = [(await http.post("/chat/completions", content=b'{"n": %d}' % i)).content
                      for i in range(3)]
            await http.close()
            return bodies, server.connections, server.requests

    bodies, connections, requests = run(main())
    assert bodies == [b"hello"] * 3
    assert connections == (1 if reused else 3)
    head, body = requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Host: 127.0.0.1:" in head and b"Content-Length: 8\r\n" in head
    assert b"Authorization: Bearer sk-secret\r\n" in head and body == b'{"n": 0}'


@pytest.mark.parametrize("response, message", [
    (b"HTTP/2 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "CRLF"),
    (ok(b"hello", "Content-Encoding: br\r\n"), "Content-Encoding"),
    (ok(b"not gzip", "Content-Encoding: gzip\r\n"), "undecodable"),
])
def test_a_malformed_response_is_an_unreadable_body(response: bytes, message: str) -> None:
    async def main() -> Exception:
        async with ScriptedServer(lambda i: [response, 0.5]) as server:
            http = client(server.url())
            started = time.perf_counter()
            with pytest.raises(ValueError, match=message) as caught:
                await http.post("/chat/completions", content=b"{}")
            assert time.perf_counter() - started < 0.4     # not waiting for more bytes
            await http.close()
            return caught.value

    error = run(main())
    fault = classify_error(error, 0.01, "http://x/v1", 5.0)
    assert (fault.reason, fault.kind) == ("bad_response", "transport")


def test_a_connection_closed_before_or_during_the_answer_is_a_connection_fault() -> None:
    scripts = {"before": [CLOSE], "mid-body": [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel",
                                               CLOSE]}

    async def main(pieces: list[Any]) -> Exception:
        async with ScriptedServer(lambda i: pieces) as server:
            http = client(server.url())
            with pytest.raises(ConnectionError) as caught:
                await http.post("/chat/completions", content=b"{}")
            await http.close()
            return caught.value

    for where, pieces in scripts.items():
        error = run(main(pieces))
        assert ("before the response" if where == "before" else "middle of the body") in str(error)
        assert classify_error(error, 0.01, "http://x/v1", 5.0).reason == "connection"


def test_a_refused_connection_is_a_connection_fault() -> None:
    async def main() -> Exception:
        async with ScriptedServer(lambda i: []) as server:
            url = server.url()
        http = client(url)   # the server is gone: nothing listens on its port
        with pytest.raises(OSError) as caught:
            await http.post("/chat/completions", content=b"{}")
        return caught.value

    assert classify_error(run(main()), 0.01, "http://x/v1", 5.0).reason == "connection"


def test_no_answer_within_the_deadline_times_out_and_the_connection_is_dropped() -> None:
    async def main() -> tuple[Exception, float, bytes, int]:
        # the first request is never answered; the next is, on a new connection
        script: Script = lambda i: [30.0] if i == 0 else [ok(b"late")]
        async with ScriptedServer(script) as server:
            http = client(server.url(), timeout_s=0.3)
            started = time.perf_counter()
            with pytest.raises(TimeoutError) as caught:
                await http.post("/chat/completions", content=b"{}")
            elapsed = time.perf_counter() - started
            body = (await http.post("/chat/completions", content=b"{}")).content
            await http.close()
            return caught.value, elapsed, body, server.connections

    error, elapsed, body, connections = run(main())
    assert 0.3 <= elapsed < 2.0
    assert classify_error(error, elapsed, "http://x/v1", 0.3).reason == "timeout"
    assert body == b"late" and connections == 2


@pytest.mark.parametrize("framing", ["length", "chunked", "until close"])
def test_a_body_over_the_limit_is_cut_one_byte_past_it_and_not_reused(framing: str) -> None:
    big = b"x" * 5000
    response = {"length": ok(big),
                "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + b"".join(b"400\r\n" + big[i:i + 1024] + b"\r\n"
                                      for i in range(0, 4096, 1024)) + b"0\r\n\r\n",
                "until close": b"HTTP/1.1 200 OK\r\n\r\n" + big}[framing]

    async def main() -> tuple[list[int], int]:
        async with ScriptedServer(lambda i: [response, CLOSE]) as server:
            http = client(server.url(), body_limit=100)
            sizes = [len((await http.post("/chat/completions", content=b"{}")).content)
                     for _ in range(2)]
            await http.close()
            return sizes, server.connections

    sizes, connections = run(main())
    assert sizes == [101, 101] and connections == 2


def test_an_http_error_carries_status_retry_after_and_message_and_keeps_the_connection() -> None:
    busy = b'{"message": "server busy"}'
    script: Script = lambda i: [ok(busy, "Retry-After: 2\r\n").replace(b"200 OK", b"503 Busy")
                                if i == 0 else ok(b"fine")]

    async def main() -> tuple[DirectStatusError, bytes, int]:
        async with ScriptedServer(script) as server:
            http = client(server.url())
            with pytest.raises(DirectStatusError) as caught:
                await http.post("/chat/completions", content=b"{}")
            body = (await http.post("/chat/completions", content=b"{}")).content
            await http.close()
            return caught.value, body, server.connections

    error, body, connections = run(main())
    fault = status_fault(error, "http://x/v1")
    assert (fault.reason, fault.kind, fault.retry_after) == ("http_503", "transport", 2.0)
    assert "server busy" in fault.detail
    assert body == b"fine" and connections == 1


def test_a_kept_alive_connection_the_server_closed_is_not_used_again() -> None:
    """uvicorn (vLLM's server) closes idle connections after 5 s: the client sees the close and
    opens a new connection instead of writing into the dead one."""
    async def main() -> tuple[list[bytes], int]:
        async with ScriptedServer(lambda i: [ok(b"a"), CLOSE]) as server:
            http = client(server.url())
            first = (await http.post("/chat/completions", content=b"{}")).content
            await asyncio.sleep(0.05)      # the close arrives while the connection is idle
            second = (await http.post("/chat/completions", content=b"{}")).content
            await http.close()
            return [first, second], server.connections

    assert run(main()) == ([b"a", b"a"], 2)


# --------------------------------------------------------------------------- TLS and proxies


def _certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ssl.SSLContext, Path]:
    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def test_https_verifies_the_server_against_the_trust_store(
        tls: tuple[ssl.SSLContext, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    context, cert = tls

    async def main() -> tuple[bytes, Exception]:
        async with ScriptedServer(lambda i: [ok(b"secure")], tls=context) as server:
            trusted = client(server.url("https", "localhost"))
            body = (await trusted.post("/chat/completions", content=b"{}")).content
            await trusted.close()
            monkeypatch.delenv("SSL_CERT_FILE")
            untrusted = client(server.url("https", "localhost"))
            with pytest.raises(ssl.SSLError) as caught:
                await untrusted.post("/chat/completions", content=b"{}")
            return body, caught.value

    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    body, error = run(main())
    assert body == b"secure"
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert classify_error(error, 0.01, "https://x/v1", 5.0).reason == "connection"


class ConnectProxy:
    """A forwarding proxy: absolute-form requests are answered with a canned response, CONNECT
    opens a tunnel to the named host; it records every request head it reads."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.tunnelled = bytearray()

    async def __aenter__(self) -> "ConnectProxy":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://user:p%40ss@127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if not head.startswith(b"CONNECT "):
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            writer.write(ok(b"via proxy"))
            await writer.drain()
            writer.close()
            return
        host, port = head.split(b" ")[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, tap: bool) -> None:
            while data := await src.read(65536):
                if tap:
                    self.tunnelled += data
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False),
                             return_exceptions=True)


def test_plain_http_through_a_proxy_sends_the_absolute_url_and_its_credentials() -> None:
    async def main() -> tuple[bytes, list[bytes]]:
        async with ConnectProxy() as proxy:
            http = client("http://captions.invalid:8000/v1", proxy=proxy.url)
            body = (await http.post("/chat/completions", content=b"{}")).content
            await http.close()
            return body, proxy.heads

    body, heads = run(main())
    assert body == b"via proxy"
    assert heads[0].startswith(b"POST http://captions.invalid:8000/v1/chat/completions HTTP/1.1")
    credentials = base64.b64encode(b"user:p@ss")
    assert b"Proxy-Authorization: Basic " + credentials + b"\r\n" in heads[0]


def test_https_through_a_connect_tunnel_keeps_the_request_from_the_proxy(
        tls: tuple[ssl.SSLContext, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    context, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def main() -> tuple[list[bytes], list[bytes], bytes]:
        async with ScriptedServer(lambda i: [ok(b"tunnelled")], tls=context) as server, \
                ConnectProxy() as proxy:
            http = client(server.url("https", "localhost"), proxy=proxy.url)
            bodies = [(await http.post("/chat/completions", content=b'{"q": 1}')).content
                      for _ in range(2)]
            await http.close()
            return bodies, proxy.heads, bytes(proxy.tunnelled)

    bodies, heads, tunnelled = run(main())
    assert bodies == [b"tunnelled"] * 2
    assert len(heads) == 1            # one tunnel, kept alive for both requests
    assert heads[0].startswith(b"CONNECT localhost:") and b"Proxy-Authorization: Basic " in heads[0]
    assert tunnelled and b"Bearer" not in tunnelled and b'{"q": 1}' not in tunnelled


@pytest.mark.parametrize("key", ["sk-a\r\nX-Injected: 1", "sk-\u00e9t\u00e9"])
def test_a_header_value_that_would_break_the_request_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(ValueError, match="Authorization header") as caught:
        Http1Client("http://127.0.0.1:9/v1", {"Authorization": f"Bearer {key}"}, limit=1,
                    timeout_s=1.0, body_limit=100)
    assert key not in str(caught.value) and "Injected" not in str(caught.value)


@pytest.mark.parametrize("transport", ["asyncio", "direct"])
def test_both_light_transports_read_retry_after_whatever_its_case(transport: str) -> None:
    """A server may write ``Retry-After`` in any case; both transports hand it on."""
    from annotators.caption.backends.openai_api.settings import ClientSettings
    from annotators.caption.backends.openai_api.transports import connect

    busy = ok(b'{"message": "busy"}', "RETRY-after: 3\r\n").replace(b"200 OK", b"429 Slow down")

    async def main() -> DirectStatusError:
        async with ScriptedServer(lambda i: [busy]) as server:
            http = connect(ClientSettings(model="m", transport=transport), server.url(), "k")
            with pytest.raises(DirectStatusError) as caught:
                await http.post("/chat/completions", content=b"{}")
            await http.close()
            return caught.value

    fault = status_fault(run(main()), "http://x/v1")
    assert (fault.reason, fault.retry_after) == ("http_429", 3.0)
