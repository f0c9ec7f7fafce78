"""Model output is data: hostile answers from the fault server (far too long, control
characters, prompt injection, invalid UTF-8, JSON bombs, wrong shapes) end bounded, cleaned and
stored as they are, or as a failure with a reason, through the real client, the caption engine
and a whole pipeline build; nothing an answer says is evaluated or expanded."""
from __future__ import annotations

import json
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
import yaml

from annotators.base import AnnotatorFailure
from annotators.caption.backends.base import ChatAnswer
from annotators.caption.backends.checks import (
    ANSWER_REASONS, MAX_ANSWER_CHARS, MAX_JSON_DEPTH, check_answer, clean_text, too_deep,
)
from annotators.caption.backends.openai_api.client import VllmChatClient, max_body_bytes
from annotators.caption.backends.openai_api.messages import ChatRequest
from annotators.caption.engine import target_fields
from annotators.caption.program import load_program
from annotators.registry import build_captioner
from pipelines import validate
from pipelines.types import failure_class
from tests.conftest import build, records
from tests.fault_server import (
    BOMB_DEPTH, CONTROL_TAGS, CONTROL_TEXT, HOSTILE, INJECTION_TAGS, INJECTION_TEXT, FaultConfig,
    FaultServer, hostile_content, serve_faults,
)
from tests.helpers import make_item

# umg's tags schema: strings of 1..24 characters, 1..8 of them
TAGS_SCHEMA = load_program("umg").steps["region"][1].json_schema
FAST = {"timeout_s": 10.0, "backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_in_flight": 16}
OK = "ok"
# hostile answer -> outcome of a free-text request, of a structured (tags) request
OUTCOMES: dict[str, tuple[str, str]] = {
    "huge": ("answer_too_large", "answer_too_large"),
    "huge_body": ("answer_too_large", "answer_too_large"),
    "control_chars": (OK, OK),
    "injection": (OK, OK),
    "bad_utf8": (OK, OK),
    "json_bomb": (OK, "answer_too_deep"),        # free text: 10 000 brackets are just text
    "deep_json": (OK, "answer_too_deep"),
    "wrong_schema": (OK, "answer_schema"),
}


def expected_clean(text: str) -> str:
    """The oracle of cleaning, written apart from the code under test: every character of
    Unicode category Cc (C0, DEL, C1) but tab and line feed removed; surrogates -> U+FFFD."""
    out = []
    for char in text:
        if unicodedata.category(char) == "Cs":
            out.append("\ufffd")
        elif unicodedata.category(char) != "Cc" or char in "\n\t":
            out.append(char)
    return "".join(out)


def assert_safe_text(text: str) -> None:
    """Bounded, no control characters but tab and line feed, writable as UTF-8."""
    assert len(text) <= MAX_ANSWER_CHARS
    assert all(unicodedata.category(c) != "Cc" or c in "\n\t" for c in text), repr(text[:200])
    text.encode("utf-8")   # raises on a lone surrogate


def request(text: str, schema: dict[str, Any] | None, region_id: str) -> ChatRequest:
    """A one-message chat request."""
    return ChatRequest([{"role": "user", "content": [{"type": "text", "text": text}]}],
                       json_schema=schema, region_id=region_id)


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    """A healthy fault server in a background thread (faults come from markers)."""
    with serve_faults(FaultConfig(latency_s=0.001)) as srv:
        yield srv


# --------------------------------------------------------------------------- the client


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_each_hostile_answer_is_bounded_cleaned_or_rejected(server: FaultServer,
                                                           transport: str) -> None:
    assert set(OUTCOMES) == set(HOSTILE)
    client = VllmChatClient({"model": "fake-vlm", "endpoints": [server.base_url], **FAST,
                             "transport": transport})
    cases = [(name, schema) for name in HOSTILE for schema in (None, TAGS_SCHEMA)]
    results = client.run_many([request(f"Describe. [[fault:{name}]]", schema,
                                       f"{name}/{'json' if schema else 'text'}")
                               for name, schema in cases])
    client.teardown()
    got = {r.region_id: r for r in results}
    for name, (text_outcome, json_outcome) in OUTCOMES.items():
        for kind, outcome in (("text", text_outcome), ("json", json_outcome)):
            result = got[f"{name}/{kind}"]
            if outcome == OK:
                assert isinstance(result, ChatAnswer), (name, kind, result)
                assert_safe_text(result.text)
            else:
                assert isinstance(result, AnnotatorFailure), (name, kind, result)
                assert result.reason == outcome and result.reason in ANSWER_REASONS
                assert failure_class(result.reason) == "permanent"
                assert result.detail and len(result.detail) <= 1000
                assert_safe_text(result.detail)
    answer = {k: r for k, r in got.items() if isinstance(r, ChatAnswer)}
    # control characters removed, the rest kept
    assert answer["control_chars/text"].text == expected_clean(CONTROL_TEXT) == \
        "A red chair[2J beside a lamp,\nlit\tfrom the left."
    assert answer["control_chars/json"].parsed["tags"] == [expected_clean(t)
                                                           for t in CONTROL_TAGS[:2]]
    # injection text is stored exactly as written, braces and all
    assert answer["injection/text"].text == INJECTION_TEXT
    assert answer["injection/json"].parsed["tags"] == list(INJECTION_TAGS[:2])
    # invalid UTF-8 bytes and a lone surrogate escape become U+FFFD
    bad = answer["bad_utf8/text"].text
    assert bad == "A wooden chair \ufffd\ufffd\ufffd( next to a lamp \ufffd by the door."
    assert answer["bad_utf8/json"].parsed["tags"] == ["red \ufffd\ufffd\ufffd(", "lamp \ufffd"]
    # a bracket bomb asked for as free text is only text, and bounded
    assert answer["json_bomb/text"].text == hostile_content("json_bomb", None)
    wrong = [r for r in server.requests if "[[fault:wrong_schema]]" in json.dumps(r.body)
             and r.body.get("response_format")]
    assert len(wrong) % 2 == 0 and wrong   # answer_schema is asked again once (the default)
    assert client.metrics["failures"] == dict(Counter(
        outcome for pair in OUTCOMES.values() for outcome in pair if outcome != OK))


def test_a_body_that_is_a_bomb_or_no_chat_answer_is_a_bad_response() -> None:
    client = VllmChatClient({"model": "m"})
    plain = request("x", None, "r")
    bomb = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert len(bomb) < max_body_bytes(MAX_ANSWER_CHARS)
    for body in (bomb, b'{"choices": [{"message": {"content": {"text": 1}}}]}',
                 b'{"choices": [{"message": "hello"}]}', b'{"choices": "x"}', b"[1, 2]"):
        fault = client._read(body, plain, 0.0, "http://x/v1")
        assert fault.reason == "bad_response" and fault.kind == "transport", body[:40]
    too_big = b" " * (max_body_bytes(MAX_ANSWER_CHARS) + 1)
    fault = client._read(too_big, plain, 0.0, "http://x/v1")
    assert (fault.reason, fault.kind) == ("answer_too_large", "answer")


# --------------------------------------------------------------------------- the checks


def test_cleaning_matches_the_oracle_over_all_of_unicode() -> None:
    every = "".join(map(chr, range(0x110000)))
    assert clean_text(every) == expected_clean(every)
    assert clean_text("plain {text} <b>kept</b>") == "plain {text} <b>kept</b>"
    assert clean_text("crlf\r\nline") == "crlf\nline"


def test_json_depth_is_checked_before_parsing_without_recursion() -> None:
    bomb = "[" * BOMB_DEPTH + "]" * BOMB_DEPTH
    with pytest.raises(RecursionError):   # what the check keeps the parser from
        json.loads(bomb)
    assert check_answer(bomb, "stop", {"type": "array"}).problem[0] == "answer_too_deep"
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert check_answer(at_limit, "stop", {"type": "array"}).problem is None
    over = "[" + at_limit + "]"
    assert check_answer(over, "stop", {"type": "array"}).problem[0] == "answer_too_deep"
    # brackets inside strings are text, escaped quotes included
    inside = json.dumps({"tags": ["[" * 50 + '\\"{' * 50]})
    assert not too_deep(inside, MAX_JSON_DEPTH)
    assert check_answer(inside, "stop", {"type": "object"}).problem is None
    # an unterminated string full of escaped quotes is scanned in linear time
    started = time.perf_counter()
    assert too_deep('"' + '\\"[' * 10_000 + "[" * 20, MAX_JSON_DEPTH) is False
    assert time.perf_counter() - started < 0.5


def test_size_is_checked_first_and_never_cut() -> None:
    words = " ".join(f"word{i}" for i in range(MAX_ANSWER_CHARS))[:MAX_ANSWER_CHARS]
    assert check_answer(words, "stop") == (words, None, None)
    longer = words + "x"
    text, parsed, problem = check_answer(longer, "stop")
    assert problem[0] == "answer_too_large" and text == "" and parsed is None
    # JSON over the limit is not parsed at all
    huge_json = json.dumps({"tags": ["x" * MAX_ANSWER_CHARS]})
    assert check_answer(huge_json, "stop", TAGS_SCHEMA).problem[0] == "answer_too_large"
    # strings are cleaned before validation: a control character does not count as a letter
    assert check_answer('{"tags": ["\\u0000"]}', "stop", TAGS_SCHEMA).problem[0] == \
        "answer_schema"


# --------------------------------------------------------------------------- the engine


def marked_program(tmp_path: Path, markers: dict[tuple[str, str], str]) -> str:
    """A copy of umg whose step (level, name) prompts carry ``[[fault:NAME]]`` markers."""
    data = yaml.safe_load(Path(load_program("umg").source).read_text())
    for (level, name), fault in markers.items():
        (step,) = [s for s in data["steps"][level] if s["name"] == name]
        step["prompt"] += f" [[fault:{fault}]]"
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_earlier_answers_go_into_later_prompts_as_text(server: FaultServer,
                                                       tmp_path: Path) -> None:
    program = marked_program(tmp_path, {("image", "caption"): "control_chars",
                                        ("region", "caption"): "injection",
                                        ("pixel", "caption"): "injection"})
    cap = build_captioner({"name": "vllm", "model": "fake-vlm", "endpoints": [server.base_url],
                           "program": program, "client": FAST})
    before = len(server.requests)
    cap.setup()
    try:
        (result,) = cap.caption_batch([make_item("inject", cap.prompt_specs())])
    finally:
        cap.teardown()
    assert result.failures == [] and set(result.regions) == {"r0", "p0", "p1"}
    assert result.image_level.caption == expected_clean(CONTROL_TEXT)
    for text in result.regions.values():
        assert text.caption == INJECTION_TEXT
    sent = [r.body["messages"][-1]["content"][-1]["text"] for r in server.requests[before:]]
    later = [t for t in sent if INJECTION_TEXT in t]
    # region tags, pixel long caption and tags: the answer went in as it was, nothing expanded
    assert len(later) == 1 + 2 * 2
    # exactly the template filled in with the answer as a value (str.format never re-reads it)
    item = make_item("inject", cap.prompt_specs())
    tags_step = load_program(program).steps["region"][1]
    assert tags_step.prompt.format(**target_fields(item, item.regions[0]),
                                   caption=INJECTION_TEXT) in later
    assert all("{caption}" in t and "{0}" in t and "}}{{" in t for t in later)
    image_tags = [t for t in sent if "The image is described as:" in t]
    assert image_tags and expected_clean(CONTROL_TEXT) in image_tags[0]


# --------------------------------------------------------------------------- a whole build


def outcome_of(recorded: Any) -> str:
    """What the client makes of one recorded request's answer (OUTCOMES), or OK."""
    if recorded.fault not in OUTCOMES:
        return OK
    return OUTCOMES[recorded.fault][1 if recorded.body.get("response_format") else 0]


def prompt_text(recorded: Any) -> str:
    """The text part of a recorded request (after its images)."""
    return recorded.body["messages"][-1]["content"][-1]["text"]


@pytest.mark.slow
def test_hostile_answers_through_a_pipeline_build(tmp_path: Path) -> None:
    program = marked_program(tmp_path, {("image", "caption"): "control_chars",
                                        ("image", "long_caption"): "bad_utf8",
                                        ("image", "tags"): "injection"})
    config = FaultConfig(latency_s=0.002, fault_rate=0.7, seed=3,
                         mix={name: 1.0 for name in HOSTILE})
    with serve_faults(config) as srv:
        client = {**FAST, "answer_retries": 0}   # one request, one outcome: counts reconcile
        captioner = {"name": "vllm", "model": "fake-vlm", "program": program,
                     "endpoints": [srv.base_url], "client": client}
        out, manifest = build(tmp_path, "synthetic://6?size=96", config={
            "segmenter": {"name": "given"}, "regions": {"max_regions": 4, "min_area_frac": 0.0},
            "shards": {"samples_per_shard": 3}, "captioner": captioner})
        sent = list(srv.requests)
    assert Counter(r.fault for r in sent if r.fault in HOSTILE).keys() == set(HOSTILE), \
        Counter(r.fault for r in sent)
    assert validate.validate(str(out)).ok
    counts = manifest["counts"]
    assert counts["inputs"] == 6 == counts["written"] and counts["failed"] == 0
    assert counts["awaiting_retry"] == 0 == counts["held"] and not manifest["incomplete_shards"]

    # every failed region is a permanent caption row with the reason its answer earned
    failures = pq.read_table(out / "failures").to_pylist()
    assert failures and all(f["region_id"] is not None for f in failures)
    assert all(f["stage"] == "caption" and f["class"] == "permanent" for f in failures)
    expected = Counter(outcome_of(r) for r in sent) - Counter({OK: len(sent)})
    assert Counter(f["reason"] for f in failures) == expected
    assert counts["region_failures_by_reason"] == {f"caption/{k}": v for k, v in expected.items()}
    for f in failures:
        assert_safe_text(f["detail"])

    # totals: each region asked for its caption once; it is in its record or a failure row
    got = records(out)
    regions = [r for record in got.values() for r in record["regions"]]
    asked = sum("at most 15 words" in prompt_text(r) for r in sent)
    assert len(regions) + len(failures) == asked > 0

    # what was kept is bounded and clean; image-level answers as their faults make them
    for record in got.values():
        image = record["image_level"]
        assert image["caption"] == expected_clean(CONTROL_TEXT)
        assert "\ufffd" in image["long_caption"]
        assert image["tags"] == [t.lower() for t in INJECTION_TAGS[:2]]
        for text in [image, *record["regions"]]:
            for value in [text["caption"], text["long_caption"], *text["tags"]]:
                assert_safe_text(value)
    index = pq.read_table(out / "index" / "regions").to_pylist()
    assert sorted(r["caption"] for r in index) == sorted(r["caption"] for r in regions)

    # an injected caption went into its later prompts verbatim and, where they were answered,
    # into the record verbatim
    carried = [r for r in sent if INJECTION_TEXT in prompt_text(r)]
    last = [r for r in carried if r.body.get("response_format")]   # each target's tags step
    kept = sum(outcome_of(r) == OK for r in last)
    assert sum(r["caption"] == INJECTION_TEXT for r in regions) == kept
