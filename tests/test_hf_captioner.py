"""Tests of the `transformers` captioner (in-process caption programs) with a tiny, randomly
initialised Qwen2-VL built in a temporary folder: random weights produce nonsense, so the tests
check contracts (text or a failure of the model's answer for every target, and answers that were
really generated), not wording."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")

from annotators.base import CaptionInput, CaptionResult
from annotators.caption.backends.base import ChatAnswer, GenerationRequest
from annotators.caption.backends.checks import ANSWER_REASONS
from annotators.caption.backends.transformers_local import (
    LocalChatClient,
    TransformersCaptioner,
    processor_messages,
)
from annotators.registry import build_captioner
from settings import ConfigError
from tests.helpers import make_item

BUILDER = Path(__file__).resolve().parents[1] / "tools" / "vllm_cpu" / "make_tiny_qwen2vl.py"
# What a model's answer can fail with. Not client_error (generation itself failed) nor
# prompt_error (the program could not build a request): those are bugs here, never nonsense.
ANSWER_FAILURES = set(ANSWER_REASONS) | {"judge_rejected"}
FAST = {"device": "cpu", "dtype": "float32", "batch_size": 8, "max_new_tokens_cap": 12,
        "answer_retries": 0}
MIXED_PROGRAM = {   # free text, except the regions' tags
    "id": "mixed", "version": "1", "system": "Describe what you see.",
    "visual_prompts": {"region": [{"name": "box", "kind": "box"}],
                       "pixel": [{"name": "contour", "kind": "contour"}]},
    "steps": {"image": [{"name": "caption", "prompt": "Caption this {width}x{height} image."}],
              "region": [{"name": "caption", "prompt": "What is in the box at {bbox}?",
                          "images": ["image", "box"]},
                         {"name": "tags", "prompt": "Tags for: {caption}", "images": ["box"],
                          "json_schema": {"type": "object", "required": ["tags"],
                                          "properties": {"tags": {"type": "array"}}}}],
              "pixel": [{"name": "caption", "prompt": "What is outlined?",
                         "images": ["contour"]}]},
}


def load_builder() -> ModuleType:
    """tools/vllm_cpu/make_tiny_qwen2vl.py as a module."""
    spec = importlib.util.spec_from_file_location("make_tiny_qwen2vl", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny random Qwen2-VL, its tokenizer and processor (nothing downloaded)."""
    out = tmp_path_factory.mktemp("tiny-qwen2vl")
    load_builder().build(out)
    return out


def captioner(model: Path, program: str, **extra: Any) -> TransformersCaptioner:
    """A transformers captioner on the tiny model with fast settings."""
    cap = build_captioner({"name": "transformers", "model": str(model), "program": program,
                           **FAST, **extra})
    assert isinstance(cap, TransformersCaptioner)
    return cap


def run(cap: TransformersCaptioner, count: int = 2,
        metrics: dict[str, dict[str, Any]] | None = None) -> tuple[list[CaptionInput],
                                                                  list[CaptionResult]]:
    """caption_batch of ``count`` synthetic items between setup and teardown; each client's
    metrics are copied into ``metrics`` (by client name) before the clients are dropped."""
    items = [make_item(f"img{i}", cap.prompt_specs()) for i in range(count)]
    cap.setup()
    try:
        return items, cap.caption_batch(items)
    finally:
        if metrics is not None:
            metrics.update({name: dict(client.metrics) for name, client in cap.clients.items()})
        cap.teardown()


def assert_contract(item: CaptionInput, result: CaptionResult) -> None:
    """Every target has text or a failure of the model's answer."""
    assert all(f.reason in ANSWER_FAILURES for f in result.failures), result.failures
    if result.image_level is None:
        assert len(result.failures) == 1 and result.failures[0].region_id is None
        return
    failed = {f.region_id for f in result.failures}
    assert set(result.regions) | failed == {r.id for r in item.regions}
    assert not set(result.regions) & failed
    for text in [result.image_level, *result.regions.values()]:
        assert isinstance(text.caption, str) and isinstance(text.long_caption, str)
        assert isinstance(text.tags, list) and all(isinstance(t, str) for t in text.tags)
        assert text.provenance["backend"] == "transformers"


@pytest.mark.parametrize("program", ["umg", "longgrit"])
def test_programs_give_text_or_an_answer_failure(tiny_model: Path, program: str) -> None:
    metrics: dict[str, dict[str, Any]] = {}
    items, results = run(captioner(tiny_model, program, allow_truncated=True), metrics=metrics)
    assert len(results) == len(items) == 2
    for item, result in zip(items, results):
        assert_contract(item, result)
    # The model answered: at least the first step (free text, kept even when cut) of every image
    # and region, and whatever failed, failed on an answer it generated.
    default = metrics["default"]
    assert default["chunks"] >= 1
    assert default["answers"] >= len(items) * (1 + len(items[0].regions)), default
    assert set(default["failures"]) <= set(ANSWER_REASONS), default["failures"]


def test_free_text_succeeds_with_allow_truncated(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(MIXED_PROGRAM))
    cap = captioner(tiny_model, str(path), allow_truncated=True, max_new_tokens_cap=24)
    items, results = run(cap)
    for item, result in zip(items, results):
        assert_contract(item, result)
    texts = [r.image_level for r in results if r.image_level is not None]
    texts += [t for r in results for t in r.regions.values()]
    assert sum(bool(t.caption) for t in texts) >= 2
    # structured answers are never kept cut: random weights fail the regions' tags step
    tag_failures = [f for r in results for f in r.failures if f.detail.startswith("step tags")]
    assert tag_failures and {f.reason for f in tag_failures} <= {
        "truncated", "answer_not_json", "answer_schema", "empty", "repetition"}


def test_valid_json_answers_fill_every_target(tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With a model that answers valid JSON at once, umg gives text and tags for all targets."""
    cap = captioner(tiny_model, "umg")
    cap.setup()
    client = cap.clients["default"]
    monkeypatch.setattr(client, "_eos", set(range(len(client.processor.tokenizer))))
    monkeypatch.setattr(client.processor.tokenizer, "decode",
                        lambda *a, **k: '{"tags": ["Red car", " road.", "red car"]}')
    items, results = run(cap)
    for item, result in zip(items, results):
        assert result.failures == [] and set(result.regions) == {r.id for r in item.regions}
        for text in [result.image_level, *result.regions.values()]:
            assert text is not None and text.tags == ["red car", "road"]
    assert client.metrics["answers"] == 2 * (3 + 2 + 2 * 3)


def test_client_answers_in_order_and_sampling_is_seeded(tiny_model: Path) -> None:
    client = LocalChatClient({"model": str(tiny_model), **FAST, "allow_truncated": True,
                              "batch_size": 2})
    image = np.full((40, 56, 3), 200, np.uint8)
    requests = [GenerationRequest(f"Caption {i}.", [image], region_id=f"r{i}") for i in range(3)]
    requests[1].max_tokens = 5
    answers = client.generate(requests)
    assert [a.region_id for a in answers] == ["r0", "r1", "r2"]
    # free text with allow_truncated: every request is answered, within its token limit
    assert all(isinstance(a, ChatAnswer) for a in answers), answers
    assert [a.usage["completion_tokens"] <= limit for a, limit in zip(answers, (12, 5, 12))] \
        == [True] * 3
    assert all(a.finish_reason in ("stop", "length") and a.usage["prompt_tokens"] > 0
               for a in answers)
    sampled = [GenerationRequest("Say something."), GenerationRequest("Say more.")]
    for request in sampled:
        request.temperature = 1.0
    first, second = client.generate(sampled), client.generate(sampled)
    assert all(isinstance(a, ChatAnswer) for a in first + second), first + second
    assert [a.text for a in first] == [a.text for a in second]
    assert client.metrics["requests"] == 7
    client.teardown()


def test_structured_answers_are_asked_again(tiny_model: Path) -> None:
    client = LocalChatClient({"model": str(tiny_model), **FAST, "answer_retries": 1,
                              "retry_answer_reasons": ["answer_not_json", "answer_schema",
                                                       "truncated"]})
    request = GenerationRequest("Tags?", json_schema={"type": "object", "required": ["tags"]})
    [answer] = client.generate([request])
    assert not isinstance(answer, ChatAnswer) and answer.reason in ANSWER_REASONS, answer
    assert client.metrics["retries"] == 1, answer
    assert client.metrics["failures"][answer.reason] == 1


def test_schema_goes_into_the_prompt_and_images_become_parts() -> None:
    client = LocalChatClient({"model": "some/model", "device": "cpu"})
    request = GenerationRequest("Tags?", [np.zeros((8, 8, 3), np.uint8)], system="sys",
                                json_schema={"type": "object", "required": ["tags"]})
    images = [client.picture(image) for image in request.images]
    messages = processor_messages(request, images)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image", "text", "text"]
    assert '"required":["tags"]' in parts[-1]["text"]
    assert len(images) == 1 and images[0].size == (8, 8)
    with pytest.raises(ValueError, match="data URL"):
        client.picture("http://example.com/a.png")


def test_bad_model_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"captioner\.model"):
        build_captioner({"name": "transformers", "model": str(tmp_path / "missing")})
    cap = build_captioner({"name": "transformers", "model": str(tmp_path), "device": "cpu"})
    with pytest.raises(ConfigError, match=r"captioner\.model: cannot load"):
        cap.setup()
    with pytest.raises(ConfigError, match=r"captioner\.device"):
        build_captioner({"name": "transformers", "model": str(tmp_path), "device": "gpu0"})


def test_provenance(tiny_model: Path) -> None:
    import transformers

    cap = captioner(tiny_model, "umg")
    prov = cap.provenance()
    assert prov["name"] == prov["backend"] == "transformers"
    assert prov["model"] == str(tiny_model)
    assert prov["transformers_version"] == transformers.__version__
    assert (prov["device"], prov["dtype"]) == ("cpu", "float32")
    assert prov["program"]["id"] == "umg" and prov["clients"]["default"]["batch_size"] == 8
    assert isinstance(pickle.loads(pickle.dumps(cap)), TransformersCaptioner)
