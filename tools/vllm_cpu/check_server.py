"""Smoke-check an OpenAI-compatible vLLM server that serves a vision-language model.

Checks, each against contracts only (a model with random weights writes nonsense):

1. ``GET /v1/models`` lists the served model name.
2. Image chat: a chat completion whose user message has an image (a PNG built
   here, sent as a base64 ``data:`` URL in an ``image_url`` part) and text,
   ``max_tokens=16``. The answer must be a string, use at most 16 tokens, and the
   prompt must count more tokens than the same request without the image (so the
   image really reached the model).
3. Structured output, in both request forms vLLM 0.32 accepts:
   ``response_format={"type": "json_schema", "json_schema": {"name", "schema"}}``
   (the OpenAI form) and ``structured_outputs={"json": schema}`` (vLLM's own field,
   sent via ``extra_body`` with the openai client). The answer must finish with
   ``stop`` and parse as JSON that matches :data:`TAGS_SCHEMA` (leniently:
   ``json.loads(..., strict=False)``, see :func:`check_structured`).

Uses the ``openai`` package when the running python has it, otherwise ``urllib``.
Needs nothing else outside the standard library. Exit status 0 when every check
passes; the last line reads ``N passed, N failed``.

Example::

    python tools/vllm_cpu/check_server.py --base-url http://127.0.0.1:8000/v1 --wait 120
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The tags schema. ``minItems: 1`` makes the constraint visible: a random model
# would never write ``{"tags":["...`` on its own. Item length and count are bounded on purpose: with random
# weights an unbounded string only ends when max_tokens runs out, and truncated JSON
# does not parse. Worst case: 5 items x (16 chars x 6 bytes for a \uXXXX escape + 3)
# + 12 bytes of framing = 507 bytes, and a token is at least one byte, so
# STRUCTURED_MAX_TOKENS always suffices. The server must also run with
# `--structured-outputs-config '{"disable_any_whitespace": true}'` (serve.sh does),
# or a random model can emit JSON whitespace until max_tokens.
TAGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 5,
        }
    },
    "required": ["tags"],
    "additionalProperties": False,
}
STRUCTURED_MAX_TOKENS = 512
IMAGE_MAX_TOKENS = 16


# ---------------------------------------------------------------------------- image


def png_bytes(width: int = 224, height: int = 224) -> bytes:
    """A deterministic RGB gradient as PNG bytes, encoded with zlib only."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type "none" for this scanline
        for x in range(width):
            rows += bytes((x * 255 // width, y * 255 // height, 128))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")
    )


def data_url(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URL for ``png``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -------------------------------------------------------------------- JSON schema


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Violations of ``schema`` by ``value``; an empty list when it matches.

    Covers the JSON-schema subset used here: type (object, array, string), properties,
    required, additionalProperties, items, minItems, maxItems and maxLength.
    """
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
    }
    if kind is not None and not checks[kind](value):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    errors: list[str] = []
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected {key!r}" for key in value if key not in properties]
        for key, sub in properties.items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items < minItems {schema['minItems']}")
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items > maxItems {schema['maxItems']}")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{index}]")
    elif kind == "string" and len(value) > schema.get("maxLength", len(value)):
        errors.append(f"{path}: length {len(value)} > maxLength {schema['maxLength']}")
    return errors


# ------------------------------------------------------------------------- client


class Client:
    """Minimal OpenAI-compatible client: the openai package if present, else urllib."""

    def __init__(self, base_url: str, timeout: float, backend: str = "auto") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._openai: Any = None
        if backend in ("auto", "openai"):
            try:
                import openai
            except ImportError:
                if backend == "openai":
                    raise
            else:
                self._openai = openai.OpenAI(base_url=self.base_url, api_key="unused", timeout=timeout, max_retries=0)
        self.name = "openai" if self._openai is not None else "urllib"

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One HTTP request with urllib; returns the decoded JSON body."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"HTTP {error.code} on {path}: {error.read().decode(errors='replace')}") from error

    def models(self) -> list[str]:
        """Ids of the models the server serves."""
        if self._openai is not None:
            return [model.id for model in self._openai.models.list().data]
        return [model["id"] for model in self._request("GET", "/models")["data"]]

    def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /chat/completions; vLLM-only fields go through ``extra_body``."""
        if self._openai is None:
            return self._request("POST", "/chat/completions", payload)
        standard = {key: value for key, value in payload.items() if key != "structured_outputs"}
        extra = {key: value for key, value in payload.items() if key == "structured_outputs"}
        response = self._openai.chat.completions.create(**standard, extra_body=extra or None)
        dumped: dict[str, Any] = response.model_dump()
        return dumped


def wait_until_healthy(base_url: str, seconds: float) -> None:
    """Poll ``GET /health`` (next to ``/v1``) until it answers 200 or time runs out."""
    health = base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"server at {health} not healthy after {seconds:.0f} s")
        time.sleep(1)


# ------------------------------------------------------------------------- checks


@dataclass
class Outcome:
    """Result of one check."""

    name: str
    ok: bool
    seconds: float
    detail: str


def user_message(text: str, image_url: str | None) -> list[dict[str, Any]]:
    """A one-message conversation: optional image part, then the text part."""
    parts: list[dict[str, Any]] = []
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def check_models(client: Client, model: str) -> str:
    """The served model name is listed."""
    names = client.models()
    if model not in names:
        raise AssertionError(f"{model!r} not in {names}")
    return f"models={names}"


def check_image_chat(client: Client, model: str) -> str:
    """An image + text chat answers within max_tokens and counts the image tokens."""
    url = data_url(png_bytes())
    text = "Describe the image in a few words."
    base = {"model": model, "max_tokens": IMAGE_MAX_TOKENS, "temperature": 0.0}
    with_image = client.chat({**base, "messages": user_message(text, url)})
    text_only = client.chat({**base, "messages": user_message(text, None)})
    choice, usage = with_image["choices"][0], with_image["usage"]
    if not isinstance(choice["message"]["content"], str):
        raise AssertionError(f"content is not a string: {choice['message']!r}")
    if choice["finish_reason"] not in ("stop", "length"):
        raise AssertionError(f"finish_reason {choice['finish_reason']!r}")
    if not 0 < usage["completion_tokens"] <= IMAGE_MAX_TOKENS:
        raise AssertionError(f"completion_tokens {usage['completion_tokens']} outside 1..{IMAGE_MAX_TOKENS}")
    extra = usage["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    if extra <= 0:
        raise AssertionError("the image added no prompt tokens")
    return (
        f"prompt_tokens={usage['prompt_tokens']} (image adds {extra}), "
        f"completion_tokens={usage['completion_tokens']}, content={choice['message']['content']!r}"
    )


def structured_payload(model: str, form: str) -> dict[str, Any]:
    """A chat request constrained to :data:`TAGS_SCHEMA` in the given request form."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": user_message("List up to five tags for this image as JSON.", data_url(png_bytes())),
        "max_tokens": STRUCTURED_MAX_TOKENS,
        "temperature": 0.0,
    }
    if form == "response_format":
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "tags", "schema": TAGS_SCHEMA}}
    elif form == "structured_outputs":
        payload["structured_outputs"] = {"json": TAGS_SCHEMA}
    else:
        raise ValueError(form)
    return payload


def check_structured(client: Client, model: str, form: str) -> str:
    """A schema-constrained answer stops by itself and parses into a valid object."""
    response = client.chat(structured_payload(model, form))
    choice = response["choices"][0]
    content = choice["message"]["content"]
    if choice["finish_reason"] != "stop":
        raise AssertionError(f"finish_reason {choice['finish_reason']!r} (truncated JSON?): {content!r}")
    # strict=False: xgrammar's JSON string rule lets raw control characters (tab,
    # backspace, ...) through, which strict json.loads rejects. Clients must parse
    # leniently too.
    errors = schema_errors(json.loads(content, strict=False), TAGS_SCHEMA)
    if errors:
        raise AssertionError("; ".join(errors))
    raw_controls = sum(ord(char) < 0x20 for char in content)
    return (
        f"completion_tokens={response['usage']['completion_tokens']}, "
        f"raw control chars={raw_controls}, content={content!r}"
    )


def run_check(name: str, check: Callable[[], str]) -> Outcome:
    """Run one check, timing it and turning any exception into a failed outcome."""
    start = time.perf_counter()
    try:
        detail, ok = check(), True
    except Exception as error:  # a failed check is reported, not raised
        detail, ok = f"{type(error).__name__}: {error}", False
    outcome = Outcome(name, ok, time.perf_counter() - start, detail)
    print(f"{'PASS' if ok else 'FAIL'} {name} ({outcome.seconds:.2f} s): {detail}", flush=True)
    return outcome


def main() -> int:
    """Parse arguments, run the checks, print a summary; 0 if all passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server URL ending in /v1")
    parser.add_argument("--model", default="tiny-qwen2vl", help="served model name")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for /health first")
    parser.add_argument("--client", choices=("auto", "openai", "urllib"), default="auto")
    parser.add_argument(
        "--form",
        choices=("response_format", "structured_outputs", "both"),
        default="both",
        help="structured-output request form(s) to check",
    )
    args = parser.parse_args()

    if args.wait > 0:
        wait_until_healthy(args.base_url, args.wait)
    client = Client(args.base_url, args.timeout, args.client)
    print(f"client: {client.name}; server: {args.base_url}; model: {args.model}")
    forms = ("response_format", "structured_outputs") if args.form == "both" else (args.form,)
    outcomes = [
        run_check("models", lambda: check_models(client, args.model)),
        run_check("image_chat", lambda: check_image_chat(client, args.model)),
    ]
    for form in forms:
        outcomes.append(
            run_check(f"json_schema[{form}]", functools.partial(check_structured, client, args.model, form))
        )
    passed = sum(outcome.ok for outcome in outcomes)
    print(f"{passed} passed, {len(outcomes) - passed} failed")
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
