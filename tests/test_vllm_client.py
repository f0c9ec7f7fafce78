"""Fault tests of the vLLM chat client against a local fault-injecting OpenAI-style server."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import pickle
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from annotators.base import AnnotatorFailure
from annotators.caption.backends.base import ChatAnswer, GenerationRequest
from annotators.caption.backends.checks import (
    AnswerChecks, check_answer, is_empty, is_truncated, parse_json_answer, refusal_phrase,
    repetition,
)
from annotators.caption.backends.images import decode_image, encode_image, fit_to_pixels
from annotators.caption.backends.openai_api.client import VllmChatClient
from annotators.caption.backends.openai_api.endpoints import backoff_delay
from annotators.caption.backends.openai_api.messages import ChatRequest, build_messages
from annotators.caption.backends.openai_api.settings import ClientSettings
from settings import ConfigError
from tests.fault_server import FAULTS, FaultConfig, FaultServer, dead_url, serve_faults

TAGS_SCHEMA = {"type": "object",
               "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                       "minItems": 1}},
               "required": ["tags"], "additionalProperties": False}
FAST = {"timeout_s": 0.4, "backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_in_flight": 64}


def make_client(urls: list[str], **overrides: Any) -> VllmChatClient:
    """A client with short timeouts and backoff, for tests."""
    return VllmChatClient({"model": "fake-vlm", "endpoints": urls, **FAST, **overrides})


def text_request(text: str, region_id: str | None = None,
                 schema: dict | None = None) -> ChatRequest:
    """A one-message request."""
    return ChatRequest([{"role": "user", "content": [{"type": "text", "text": text}]}],
                       json_schema=schema, region_id=region_id)


def marker_count(server: Any, marker: str) -> int:
    """How many requests the server received whose body contains ``marker``."""
    return sum(marker in json.dumps(r.body) for r in server.requests)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    """A healthy fault server in a background thread."""
    with serve_faults(FaultConfig(latency_s=0.002, hang_s=5, slow_s=0.05)) as srv:
        yield srv


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_mixed_faults_each_request_ends_once_and_counters_match(transport: str) -> None:
    config = FaultConfig(latency_s=0.002, fault_rate=0.2, seed=7, hang_s=5, slow_s=0.05)
    with serve_faults(config) as srv:
        # A timeout well above any answer time on a loaded machine: only injected hangs time out,
        # so every fault the server counts is one the client saw.
        client = make_client([srv.base_url], transport=transport, timeout_s=2.0)
        requests = [text_request(f"region {i}", f"r{i}", TAGS_SCHEMA if i % 2 else None)
                    for i in range(300)]
        results = client.run_many(requests)
        client.teardown()
        counts, n_server = Counter(srv.counts), srv.app.n_requests

    assert [r.region_id for r in results] == [f"r{i}" for i in range(300)]
    assert all(isinstance(r, (ChatAnswer, AnnotatorFailure)) for r in results)
    failures = Counter(r.reason for r in results if isinstance(r, AnnotatorFailure))
    answers = [r for r in results if isinstance(r, ChatAnswer)]
    # Non-retried outcomes end their request at once: one failure per fault the server sent.
    assert failures["http_400"] == counts["http_400"] > 0
    assert failures["refusal"] == counts["refusal"] > 0
    assert set(failures) <= {"http_400", "refusal", "http_500", "http_503", "timeout",
                             "connection", "bad_response"}
    transient = sum(counts[f] for f in ("http_500", "http_503", "hang", "drop", "bad_body"))
    assert transient > 20 and sum(failures.values()) - counts["http_400"] - counts["refusal"] <= 2
    assert len(answers) >= 0.9 * len(results)
    assert all(a.parsed["tags"] for a in answers if a.region_id and int(a.region_id[1:]) % 2)
    assert any(a.attempts > 1 for a in answers)
    m = client.metrics
    assert m["requests"] == 300 and m["answers"] == len(answers)
    assert m["failures"] == dict(failures)
    assert m["attempts"] == n_server == sum(counts.values())
    assert m["retries"] == m["attempts"] - m["requests"] == sum(m["retry_reasons"].values())
    assert set(m["retry_reasons"]) <= {"http_500", "http_503", "timeout", "connection",
                                       "bad_response"}


EXPECTED = {"http_500": "http_500", "http_503": "http_503", "http_429": "http_429",
            "http_400": "http_400", "hang": "timeout", "bad_body": "bad_response",
            "drop": "connection", "refusal": "refusal", "empty": "empty",
            "repetition": "repetition", "truncated": "truncated", "bad_json": "answer_not_json"}


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_every_fault_is_classified_and_retried_only_when_transient(server: Any, transport: str) -> None:
    assert set(EXPECTED) | {"slow"} == set(FAULTS)
    client = make_client([server.base_url], max_retries=2, transport=transport)
    names = sorted(EXPECTED) + ["slow"]
    results = client.run_many([text_request(f"x [[fault:{n}]]", n, TAGS_SCHEMA) for n in names])
    client.teardown()
    by_name = dict(zip(names, results, strict=True))
    assert isinstance(by_name["slow"], ChatAnswer) and by_name["slow"].latency_s >= 0.05
    transient = {"http_500", "http_503", "http_429", "hang", "bad_body", "drop"}
    for name, reason in EXPECTED.items():
        result = by_name[name]
        assert isinstance(result, AnnotatorFailure) and result.reason == reason, (name, result)
        assert result.region_id == name and result.detail
        sent = marker_count(server, f"[[fault:{name}]]")
        assert sent == (3 if name in transient else 2 if name == "bad_json" else 1), name
    retried = [r for r in server.requests if "[[fault:bad_json]]" in json.dumps(r.body)]
    assert [r.body["seed"] for r in retried] == [0, 1]
    assert [r.body["temperature"] for r in retried] == [0.0, 0.5]
    assert retried[0].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": TAGS_SCHEMA,
                                               "strict": True}}


def test_transient_faults_recover_on_retry(server: Any) -> None:
    client = make_client([server.base_url])
    results = client.run_many([
        text_request("a [[fault:http_503:2]]"), text_request("b [[fault:drop:1]]"),
        text_request("c [[fault:hang:1]]"),
        text_request("d [[fault:bad_json:1]]", None, TAGS_SCHEMA),
        text_request("e [[fault:http_429:3]]")])
    client.teardown()
    assert all(isinstance(r, ChatAnswer) for r in results), results
    assert [r.attempts for r in results] == [3, 2, 2, 2, 4]
    assert results[3].parsed["tags"]
    assert client.metrics["retry_reasons"] == {"http_503": 2, "connection": 1, "timeout": 1,
                                               "answer_not_json": 1, "http_429": 3}


def test_dead_endpoint_is_skipped_and_all_requests_succeed(server: Any) -> None:
    dead = dead_url()
    client = make_client([dead, server.base_url], endpoint_fail_threshold=2,
                         endpoint_cooldown_s=30, max_in_flight=8)
    results = client.run_many([text_request(f"q{i}") for i in range(60)])
    client.teardown()
    assert all(isinstance(r, ChatAnswer) for r in results)
    assert {r.endpoint for r in results} == {server.base_url}
    assert server.app.n_requests == 60
    assert client.metrics["endpoint_cooldowns"] >= 1
    assert client.metrics["retry_reasons"].get("connection", 0) <= 8   # then it is skipped


def test_requests_spread_over_healthy_endpoints() -> None:
    config = FaultConfig(latency_s=0.01)
    with serve_faults(config) as a, serve_faults(config) as b:
        for balance in ("least_in_flight", "round_robin"):
            client = make_client([a.base_url, b.base_url], balance=balance, max_in_flight=16)
            results = client.run_many([text_request(f"q{i}") for i in range(40)])
            client.teardown()
            assert all(isinstance(r, ChatAnswer) for r in results)
        assert a.app.n_requests >= 20 and b.app.n_requests >= 20


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_api_key_from_env_sent_as_bearer_and_never_exposed(server: Any, monkeypatch: Any,
                                                           caplog: Any, transport: str) -> None:
    secret = "sk-test-" + "".join(random.choice("abcdef0123456789") for _ in range(24))
    monkeypatch.setenv("TEST_VLLM_KEY", secret)
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx2", "aiohttp", "annotators.caption.backends"):
        caplog.set_level(logging.DEBUG, logger=name)
    client = make_client([server.base_url], api_key_env="TEST_VLLM_KEY", quiet_http_logs=False,
                         transport=transport)
    results = client.run_many([text_request("ok"), text_request("[[fault:http_400]]"),
                               text_request("[[fault:http_503:1]]")])
    client.teardown()
    assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {secret}"}
    if transport == "aiohttp":   # the SDK logs every request at DEBUG: the check below reads them
        assert "HTTP Request: POST" in caplog.text and "Building HTTP request" in caplog.text
    exposed = [repr(client), str(client), json.dumps(client.provenance()), caplog.text,
               repr(results), repr(client.settings), repr(client.metrics)]
    assert not any(secret in text for text in exposed)
    assert secret.encode() not in pickle.dumps(client)
    assert client.provenance()["settings"]["api_key_env"] == "TEST_VLLM_KEY"


def test_missing_api_key_env_sends_placeholder(server: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    client = make_client([server.base_url])
    assert isinstance(client.run_many([text_request("ok")])[0], ChatAnswer)
    client.teardown()
    assert server.requests[0].headers["Authorization"] == "Bearer EMPTY"


# --------------------------------------------------------------------------- images, messages


def _jpeg(width: int, height: int) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _decode(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_images_resized_to_budget_sent_as_data_urls_shared_parts_first(server: Any) -> None:
    client = make_client([server.base_url], image_max_pixels=100_000)
    whole = client.encode_image(_jpeg(2000, 1000))
    overlay = np.zeros((200, 400, 4), dtype=np.uint8)
    overlay[50:150, 100:300] = (255, 0, 0, 255)
    request = client.request(system="You caption regions.", shared_text="The image:",
                             shared_images=[whole], region_images=[overlay],
                             text="Describe the red box.", region_id="r1")
    assert isinstance(client.run_many([request])[0], ChatAnswer)
    client.teardown()
    messages = server.requests[0].body["messages"]
    assert messages[0] == {"role": "system", "content": "You caption regions."}
    content = messages[1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url", "image_url", "text"]
    assert content[0]["text"] == "The image:" and content[3]["text"] == "Describe the red box."
    assert content[1]["image_url"]["url"] == whole
    shared = _decode(content[1]["image_url"]["url"])
    region = _decode(content[2]["image_url"]["url"])
    assert shared.format == "JPEG" and shared.width * shared.height <= 100_000
    assert abs(shared.width / shared.height - 2.0) < 0.02 and shared.width > 400
    assert region.format == "PNG" and region.mode == "RGBA"
    assert region.size == (400, 200)   # within budget: not resized


def test_encode_image_passes_small_images_through_and_keeps_aspect() -> None:
    small = _jpeg(64, 48)
    url = encode_image(small, 10_000)
    assert base64.b64decode(url.split(",", 1)[1]) == small
    assert encode_image("data:image/png;base64,AAAA", 10) == "data:image/png;base64,AAAA"
    assert _decode(encode_image(small, 1200, "png")).size == (40, 30)
    assert fit_to_pixels(4000, 3000, 1_000_000) == (1154, 866)
    assert fit_to_pixels(10, 10, 1_000_000) == (10, 10)
    for w, h, budget in [(1, 5000, 1024), (5000, 3, 1024), (1920, 1080, 401_408)]:
        fw, fh = fit_to_pixels(w, h, budget)
        assert fw * fh <= budget and fw >= 1 and fh >= 1
    with pytest.raises(ValueError):
        encode_image("not-a-url", 100)


def test_build_messages_without_system_or_images() -> None:
    messages = build_messages(text="hello")
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    rgb = np.random.default_rng(1).integers(0, 255, (height, width, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb, mode).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("image_format", ["auto", "jpeg", "png"])
def test_in_process_pixels_are_what_the_data_url_decodes_to(image_format: str) -> None:
    """An in-process model sees exactly the pixels a server decodes from the data URL."""
    array = np.random.default_rng(2).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for image in (_jpeg(300, 200), _jpeg(40, 30), _png(300, 200), _png(40, 30),
                  _png(200, 100, "RGBA"), array):
        url = encode_image(image, 10_000, image_format, 80)
        expected = np.asarray(_decode(url).convert("RGB"))
        got = np.asarray(decode_image(image, 10_000, image_format, 80))
        assert got.shape == expected.shape and np.array_equal(got, expected)


def test_generate_encodes_each_image_once_and_fails_unreadable_ones(server: Any) -> None:
    client = make_client([server.base_url])
    whole = _jpeg(64, 48)
    requests = [GenerationRequest(f"region {i}", [whole], system="sys", region_id=f"r{i}")
                for i in range(3)]
    requests.insert(1, GenerationRequest("broken", [b"not an image"], region_id="bad"))
    results = client.generate(requests)
    client.teardown()
    assert [r.region_id for r in results] == ["r0", "bad", "r1", "r2"]
    assert isinstance(results[1], AnnotatorFailure) and results[1].reason == "prompt_error"
    assert all(isinstance(r, ChatAnswer) for r in results[:1] + results[2:])
    assert server.app.n_requests == 3 and client.metrics["requests"] == 3
    urls = {json.dumps(r.body["messages"][-1]["content"][0]) for r in server.requests}
    assert len(urls) == 1


# --------------------------------------------------------------------------- pure checks


def test_answer_check_functions() -> None:
    assert is_empty("") and is_empty("  \n") and is_empty(None) and not is_empty("a")
    assert refusal_phrase("I'm sorry, but I can't help.") == "i'm sorry"
    assert refusal_phrase("  \u201cI\u2019m sorry\u201d") == "i'm sorry"
    assert refusal_phrase("As an AI, I cannot see images.") == "as an ai"
    assert refusal_phrase("A sign saying I cannot stop.") is None
    assert refusal_phrase("Nope.", ["nope"]) == "nope"
    assert repetition("the cat sat on the mat " * 40)
    assert repetition("red chair red chair red chair " * 12)
    caption = ("A weathered wooden bench stands beside a narrow gravel path, its green paint "
               "peeling in long strips; behind it, a low stone wall is half hidden by ivy, and "
               "a red bicycle leans against the wall with a wicker basket holding folded "
               "newspapers and a thermos.")
    assert repetition(caption) is None and repetition("short") is None
    assert is_truncated("length") and not is_truncated("stop") and not is_truncated(None)
    fenced = '```json\n{"tags": ["a"]}\n```'
    assert parse_json_answer(fenced, TAGS_SCHEMA) == ({"tags": ["a"]}, None)
    value, error = parse_json_answer('{"tags": ["a"', TAGS_SCHEMA)
    assert value is None and error[0] == "answer_not_json" and error[1].startswith("not JSON")
    value, error = parse_json_answer('{"tags": []}', TAGS_SCHEMA)
    assert value is None and error[0] == "answer_schema" and "tags" in error[1]
    assert parse_json_answer('{"x": 1}') == ({"x": 1}, None)


def test_check_answer_reasons_and_order() -> None:
    checks = AnswerChecks()
    assert check_answer("", "stop").problem[0] == "empty"
    assert check_answer("I cannot do that.", "stop", TAGS_SCHEMA).problem[0] == "refusal"
    assert check_answer("loop " * 100, "length").problem[0] == "repetition"
    assert check_answer('{"tags": ["a"]}', "length", TAGS_SCHEMA).problem[0] == "truncated"
    assert check_answer('{"tags": 3}', "stop", TAGS_SCHEMA, checks).problem[0] == "answer_schema"
    assert check_answer('{"tags": ["a"', "stop", TAGS_SCHEMA).problem[0] == "answer_not_json"
    assert check_answer('{"tags": ["a"]}', "stop", TAGS_SCHEMA) == \
        ('{"tags": ["a"]}', {"tags": ["a"]}, None)
    assert check_answer("A cat.", "stop") == ("A cat.", None, None)


def test_backoff_delay_grows_caps_and_honours_retry_after() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 4.0, rng=rng) for n in range(1, 8)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert all(2.0 <= d <= 4.0 for d in delays[3:])
    assert backoff_delay(1, 0.5, 4.0, retry_after_s=3.0, rng=rng) == 3.0
    assert backoff_delay(1, 0.5, 4.0, retry_after_s=60.0, rng=rng) == 4.0


# --------------------------------------------------------------------------- settings, lifecycle


@pytest.mark.parametrize("values, field", [
    ({"endpoints": []}, "endpoints"), ({"endpoints": ["localhost:8000"]}, "endpoints"),
    ({"max_in_flight": 0}, "max_in_flight"), ({"timeout_s": 0}, "timeout_s"),
    ({"retry_answer_reasons": ["nope"]}, "retry_answer_reasons"),
    ({"api_key_env": "sk-123 456"}, "api_key_env"), ({"max_inflight": 3}, "max_inflight"),
    ({"backoff_max_s": 0.1, "backoff_base_s": 1.0}, "backoff_max_s"),
    ({"image_max_pixels": "big"}, "image_max_pixels"), ({"balance": "random"}, "balance"),
])
def test_bad_settings_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"captioner\.client\.{field}: "):
        VllmChatClient({"model": "m", **values}, where="captioner.client")


def test_model_is_required() -> None:
    with pytest.raises(ConfigError, match="model"):
        VllmChatClient({})
    with pytest.raises(ConfigError, match="model"):
        VllmChatClient(ClientSettings(model=""))


def test_lifecycle_repeated_run_many_pickle_and_async_use(server: Any) -> None:
    client = make_client([server.base_url])
    assert client.run_many([]) == []
    client.setup()
    for _ in range(3):
        assert all(isinstance(r, ChatAnswer) for r in client.run_many([text_request("a")] * 5))
    with ThreadPoolExecutor(2) as pool:   # Beam may call from several threads at once
        batches = list(pool.map(client.run_many, [[text_request(f"t{i}")] * 4 for i in range(2)]))
    assert all(isinstance(r, ChatAnswer) for batch in batches for r in batch)
    client.teardown()
    client.teardown()
    assert isinstance(client.run_many([text_request("after teardown")])[0], ChatAnswer)
    clone = pickle.loads(pickle.dumps(client))
    client.teardown()
    assert clone.settings == client.settings and clone.metrics["requests"] == 0

    async def use_async() -> ChatAnswer | AnnotatorFailure:
        answer = await clone.chat(text_request("from my loop"))
        await clone.aclose()
        return answer

    assert isinstance(asyncio.run(use_async()), ChatAnswer)
    assert client.metrics["requests"] == 24


# --------------------------------------------------------------------------- benchmark smoke


def test_benchmark_smoke_report_fields(tmp_path: Path) -> None:
    from bench import caption_client_bench as bench

    out = tmp_path / "report.json"
    assert bench.main(["--smoke", "--repeat", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    # two timed runs, all answered; the report's figures are the faster run's
    assert report["answers"] == 2 * report["requests"] and report["failures"] == 0
    assert len(report["efficiency_runs"]) == 2
    assert report["efficiency"] == pytest.approx(max(report["efficiency_runs"]), abs=2e-4)
    for key in ("requests", "in_flight", "latency_ms", "wall_s", "rps", "ideal_rps",
                "efficiency", "cpu_per_request_ms", "client_cpu_ms_per_request",
                "render_ms_per_region_request", "sum_ms_per_region_request", "render",
                "server_cpu_per_request_ms", "cpu_bound_ceiling_rps", "ceiling_efficiency",
                "answers", "failures", "targets", "met", "environment"):
        assert key in report, key
    smoke = bench.SMOKE
    assert (report["requests"], report["in_flight"], report["latency_ms"]) == \
        (smoke["requests"], smoke["in_flight"], smoke["latency_ms"])
    # Each answer takes at least latency_ms and at most in_flight are outstanding, so the run
    # cannot be shorter than requests / in_flight * latency, nor its rate above the ideal one: a
    # shorter time means requests went over the in-flight limit or the clock was read wrong.
    floor_s = smoke["requests"] / smoke["in_flight"] * smoke["latency_ms"] / 1000
    assert floor_s * 0.98 <= report["wall_s"] < 60
    assert 0 < report["rps"] <= report["ideal_rps"] * 1.02
    assert 0 < report["efficiency"] <= 1.02 and 0 < report["ceiling_efficiency"] <= 1
    assert report["cpu_per_request_ms"] > 0 and report["cpu_bound_ceiling_rps"] > 0
    assert report["server_cpu_per_request_ms"] >= 0
    assert set(report["met"]) == set(report["targets"]) == {
        "efficiency", "cpu_per_request_ms", "render_ms_per_region_request",
        "sum_ms_per_region_request"}
    assert all(isinstance(v, bool) for v in report["met"].values())
    # rendering: the engine's umg region (box) and pixel (contour + masked crop) requests
    render = report["render"]
    assert render["program"] == "umg" and render["side"] == smoke["render_side"]
    assert render["region"]["images"] == ["image", "box"]
    assert render["pixel"]["images"] == ["image", "contour", "masked"]
    assert render["region"]["requests"] == render["pixel"]["requests"] == smoke["render_masks"]
    assert 0 < report["render_ms_per_region_request"] == render["region"]["cpu_ms"]
    assert report["client_cpu_ms_per_request"] == report["cpu_per_request_ms"]
    assert report["sum_ms_per_region_request"] == pytest.approx(
        report["client_cpu_ms_per_request"] + report["render_ms_per_region_request"], abs=1e-3)
    assert report["environment"]["cpus"] >= 1 and report["environment"]["python"]


# --------------------------------------------------------------------------- proxies


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_every_transport_honours_proxy_variables(server: Any, transport: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY routes requests through the proxy (here the fault server, which answers an
    absolute-form request line like any other), and NO_PROXY exempts a host, for the default
    transport as for the SDK's."""
    assert ClientSettings(model="m").transport == "asyncio"   # the default
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.base_url.rsplit("/v1", 1)[0])
    # a host that does not resolve: only the proxy can answer for it
    client = make_client(["http://captions.invalid/v1"], transport=transport, max_retries=0)
    before = server.app.n_requests
    result = client.run_many([text_request("through the proxy", "r0")])[0]
    client.teardown()
    assert isinstance(result, ChatAnswer), result
    assert server.app.n_requests == before + 1
    monkeypatch.setenv("NO_PROXY", "captions.invalid")
    client = make_client(["http://captions.invalid/v1"], transport=transport, max_retries=0)
    result = client.run_many([text_request("not through the proxy", "r1")])[0]
    client.teardown()
    assert isinstance(result, AnnotatorFailure) and result.reason == "connection", result
    assert server.app.n_requests == before + 1


def test_run_many_keeps_a_bounded_number_of_requests_under_way() -> None:
    """A batch of many requests is worked through by at most 2 × max_in_flight coroutines, in
    input order, not turned into one live task per request."""
    client = make_client(["http://127.0.0.1:9/v1"], max_in_flight=3)
    live = peak = 0

    async def fake_chat(request: ChatRequest) -> Any:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.001 * (int(request.region_id[1:]) % 3))
        live -= 1
        return request.region_id

    client.chat = fake_chat  # type: ignore[method-assign]
    out = client.run_many([text_request("x", f"r{i}") for i in range(500)])
    client.teardown()
    assert out == [f"r{i}" for i in range(500)]
    assert peak == 6
