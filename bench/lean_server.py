"""A minimal OpenAI-style chat server for timing a client: every POST to ``…/chat/completions``
is answered after a fixed latency with the same small completion, from a child process that
reports its own CPU time.

The fault server (``tests/fault_server.py``) runs aiohttp's request handling and parses every
body as JSON (a caption request carries a base64 image of ~100 KB or more), about a millisecond
of CPU per request. At 256 requests in flight and 100 ms latency (2,560 requests/s) it then needs
more than one core, and on a 2-core machine a client benchmark measures the server. This server
reads each request's bytes without parsing the body (HTTP/1.1, keep-alive, ``Content-Length``
bodies), so nearly all of a core is left to the client.

    python bench/lean_server.py --latency-ms 100     # prints its port; stops when stdin closes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fault_server import ChildServer  # noqa: E402

CAPTION = "A red car stands next to a green bench, lit from the left; the background is grey."


def _response(body: bytes) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"\r\n").encode() + body


def completion(model: str) -> bytes:
    """The one answer, as bytes on the wire."""
    body = {"id": "chatcmpl-lean", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": CAPTION}}],
            "usage": {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320}}
    return _response(json.dumps(body).encode())


class _Server:
    def __init__(self, latency_s: float, model: str, jitter: float = 0.0) -> None:
        self.latency_s, self.requests, self.connections = latency_s, 0, 0
        self.jitter = jitter
        self.random = random.Random(0)
        self.answer = completion(model)
        self.models = _response(json.dumps({"object": "list", "data": [
            {"id": model, "object": "model", "owned_by": "lean", "max_model_len": 32768}]}).encode())

    def delay(self) -> float:
        """The latency of one answer: fixed, or uniform in latency × [1 - jitter, 1 + jitter]."""
        if not self.jitter:
            return self.latency_s
        return self.latency_s * (1.0 + self.jitter * (2.0 * self.random.random() - 1.0))


class _Connection(asyncio.Protocol):
    """One client connection: requests are read one after another (no pipelining needed: an
    HTTP/1.1 client waits for each answer before reusing the connection)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buffer = bytearray()
        self.need: int | None = None     # body bytes still to come for the current request
        self.path = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                line, _, headers = head.partition(b"\r\n")
                parts = line.split(b" ")
                self.path = parts[1] if len(parts) > 1 else b"/"
                self.need = 0
                for header in headers.split(b"\r\n"):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self.need = int(value.strip())
            if len(self.buffer) < self.need:
                return
            del self.buffer[:self.need]
            self.need = None
            self._answer(self.path)

    def _answer(self, path: bytes) -> None:
        server, loop = self.server, asyncio.get_running_loop()
        if path.endswith(b"/chat/completions"):
            server.requests += 1
            loop.call_later(server.delay(), self._send, server.answer)
        elif path.endswith(b"/models"):
            self._send(server.models)
        elif path == b"/stats":
            self._send(_response(json.dumps({"n_requests": server.requests, "connections": server.connections,
                                             "cpu_s": time.process_time()}).encode()))
        else:   # /health and anything else
            self._send(_response(b"{}"))

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve(latency_s: float, model: str, jitter: float) -> None:
    loop = asyncio.get_running_loop()
    server = _Server(latency_s, model, jitter)
    listener = await loop.create_server(lambda: _Connection(server), "127.0.0.1", 0, backlog=4096)
    sys.stdout.write(f"{listener.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.buffer.read)   # until the parent closes stdin
    listener.close()


class LeanServer(ChildServer):
    """The server in a child process (its CPU is not the caller's): ``base_url``,
    ``stats()["cpu_s"]``, ``start``/``stop`` or a ``with`` block."""

    def __init__(self, latency_ms: float, model: str = "fake-vlm", jitter: float = 0.0) -> None:
        super().__init__([str(Path(__file__).resolve()), "--latency-ms", str(latency_ms),
                          "--model", model, "--jitter", str(jitter)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--model", default="fake-vlm")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="latency uniform in latency x [1 - j, 1 + j] (0: fixed)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.jitter < 1.0:
        parser.error("--jitter must be in [0, 1)")
    asyncio.run(_serve(args.latency_ms / 1000.0, args.model, args.jitter))


if __name__ == "__main__":
    main()
