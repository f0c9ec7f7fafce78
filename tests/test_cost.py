"""Cost accounting: wall, CPU and GPU seconds per stage, and the captioner's model calls, tokens
and bytes — in the client, through a build into stats.json and manifest.json, across an
incremental rerun, and on the dataset card. The fault server says what it saw and reported."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from annotators.base import SegmentInput, SegmentOutput
from annotators.caption.backends.base import COST_FIELDS, CallCost, ChatAnswer, GenerationRequest
from annotators.caption.backends.openai_api.client import VllmChatClient, request_bytes
from annotators.segment.given import GivenSegmenter
from pipelines import card, cost, stages
from pipelines.config import PipelineConfig
from pipelines.types import ImageItem, ImageRef
from tests.conftest import build
from tests.fault_server import NO_USAGE, FaultConfig, serve_faults, start_in_process

REPO = Path(__file__).resolve().parent.parent
FAST_CLIENT = {"timeout_s": 5.0, "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02}
RETRY_ONCE = "[[fault:http_503:1]]"


# --------------------------------------------------------------------------- the client


def _cost_of(requests: list[GenerationRequest]) -> CallCost:
    total = CallCost()
    for request in requests:
        total.add(request.cost)
    return total


def test_call_cost_counts_usage_and_keeps_missing_usage_unknown() -> None:
    c = CallCost()
    assert c.add_usage({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}) == \
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    for missing in (None, {}, {"prompt_tokens": 5}, {"prompt_tokens": "5", "completion_tokens": 1},
                    {"prompt_tokens": -1, "completion_tokens": 1}, "usage"):
        assert c.add_usage(missing) == {}
    assert (c.prompt_tokens, c.completion_tokens, c.calls_without_usage) == (7, 3, 6)
    other = CallCost(requests=1, calls=2, bytes_sent=10)
    other.add(c)
    assert other.as_dict() == {"requests": 1, "calls": 2, "failed_calls": 0,
                               "calls_without_usage": 6, "prompt_tokens": 7,
                               "completion_tokens": 3, "bytes_sent": 10, "bytes_received": 0}
    assert tuple(other.as_dict()) == COST_FIELDS


@pytest.mark.parametrize("transport", ["asyncio", "direct", "aiohttp"])
def test_client_counts_what_the_server_saw_and_reported(transport: str) -> None:
    """Calls (retries included, failed ones apart), request body bytes, tokens summed from
    ``usage``, and completions without usage counted as such, never as zero tokens."""
    texts = ["Caption one.", "Caption two, a little longer than the first.",
             f"Retried once {RETRY_ONCE}.", f"No usage here {NO_USAGE.decode()}.",
             "A refusal [[fault:refusal]].", "A bad request [[fault:http_400]].",
             "Ünïcode text — counted in bytes, not characters."]
    with serve_faults(FaultConfig()) as server:
        client = VllmChatClient({"model": "fake-vlm", "endpoints": [server.base_url],
                                 "transport": transport, **FAST_CLIENT})
        requests = [GenerationRequest(t, region_id=f"r{i}") for i, t in enumerate(texts)]
        try:
            answers = client.generate(requests)
        finally:
            client.teardown()
        seen = server.requests
        totals = dict(server.app.totals)
    got = _cost_of(requests)
    assert [isinstance(a, ChatAnswer) for a in answers] == [True, True, True, True, False, False, True]
    assert got.requests == len(texts)
    assert got.calls == len(seen) == len(texts) + 1                        # one retry
    assert got.failed_calls == 3                                           # 503, refusal, 400
    assert got.bytes_sent == sum(r.size for r in seen) == totals["request_bytes"]
    assert got.prompt_tokens == sum(r.usage["prompt_tokens"] for r in seen if r.usage) > 0
    assert got.completion_tokens == sum(r.usage["completion_tokens"] for r in seen if r.usage) > 0
    assert got.prompt_tokens == totals["prompt_tokens"]
    assert got.calls_without_usage == 1 == totals["without_usage"]
    # the refusal's tokens were spent and are counted; the error statuses carry none
    assert totals["with_usage"] == 5 and got.bytes_received > 0
    # each request's own share: the retried one made two calls, one of them failed
    retried = requests[2].cost
    assert (retried.calls, retried.failed_calls, retried.requests) == (2, 1, 1)
    assert requests[3].cost.calls_without_usage == 1 and requests[3].cost.prompt_tokens == 0


def test_bytes_sent_are_the_serialised_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "é"}], "temperature": 0.0}
    data = request_bytes(body)
    assert json.loads(data) == body and b"\xc3\xa9" in data and b", " not in data


@pytest.mark.slow
def test_transformers_backend_counts_its_own_tokens(tmp_path: Path) -> None:
    """In process: one call per try, prompt tokens = the row's input ids without padding,
    completion tokens = the generated ids, counted for failed answers too; no bytes."""
    pytest.importorskip("transformers")
    import numpy as np

    from annotators.base import AnnotatorFailure
    from annotators.caption.backends.transformers_local import LocalChatClient
    from tests.test_hf_captioner import FAST, load_builder

    load_builder().build(tmp_path / "tiny")
    client = LocalChatClient({"model": str(tmp_path / "tiny"), **FAST, "allow_truncated": True,
                              "batch_size": 3})
    image = np.full((40, 56, 3), 200, np.uint8)
    schema = {"type": "object", "required": ["tags"], "properties": {"tags": {"type": "array"}}}
    requests = [GenerationRequest("Caption this.", [image]),
                GenerationRequest("Caption this image in a few words.", [image], max_tokens=5),
                GenerationRequest("Tags for this image.", [image], json_schema=schema)]
    answers = client.generate(requests)
    for request, answer in zip(requests, answers, strict=True):
        c = request.cost
        failed = isinstance(answer, AnnotatorFailure)
        assert (c.requests, c.calls, c.failed_calls, c.calls_without_usage) == (1, 1, int(failed), 0)
        assert 0 < c.completion_tokens <= (request.max_tokens or FAST["max_new_tokens_cap"])
        assert c.bytes_sent == c.bytes_received == 0
        if not failed:
            assert (c.prompt_tokens, c.completion_tokens) == (answer.usage["prompt_tokens"],
                                                              answer.usage["completion_tokens"])
        # the prompt's length counted apart: the request alone, so without padding
        prepared = client._prepare(0, request, [client.picture(image)], 0)
        alone = client.processor(text=[prepared.prompt], images=prepared.images, return_tensors="pt")
        assert c.prompt_tokens == alone["input_ids"].shape[1]


# --------------------------------------------------------------------------- clocks and GPU


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_thread_clock_ignores_other_threads_and_process_clock_counts_them() -> None:
    def busy_beside(stage: str) -> cost.Meter:
        worker = threading.Thread(target=_spin, args=(0.3,))
        with cost.Meter(stage) as meter:
            worker.start()
            worker.join()
        return meter

    light, model = busy_beside("decode"), busy_beside("caption")
    assert light.wall >= 0.3 and light.cpu < 0.05, (light.wall, light.cpu)
    assert model.cpu > 0.1, (model.wall, model.cpu)          # the helper thread's CPU counts
    assert not light.overlapped and not model.overlapped      # no other measured work meanwhile


def test_process_clock_measurement_is_flagged_when_other_measured_work_overlaps() -> None:
    started, stop = threading.Event(), threading.Event()

    def other_stage() -> None:
        with cost.Meter("read"):
            started.set()
            stop.wait(5)

    worker = threading.Thread(target=other_stage)
    worker.start()
    started.wait(5)
    with cost.Meter("segment") as overlapped:
        pass
    stop.set()
    worker.join()
    with cost.Meter("segment") as alone:
        pass
    assert overlapped.overlapped and not alone.overlapped
    wall, shares = overlapped.share(2)
    assert shares["cpu_overlapped"] == 1 and "cpu_overlapped" not in alone.share(2)[1]


class FakeGpuSegmenter(GivenSegmenter):
    """The `given` segmenter claiming a CUDA device and taking a little time per batch."""

    name = "fake-gpu"
    device = "cuda:0"

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"device": self.device}

    def segment_batch(self, images: list[SegmentInput]) -> list[SegmentOutput | Any]:
        time.sleep(0.02)
        return super().segment_batch(images)


class FakeCpuSegmenter(FakeGpuSegmenter):
    """The same on the CPU."""

    device = "cpu"


@pytest.mark.parametrize("segmenter, gpu", [(FakeGpuSegmenter, True), (FakeCpuSegmenter, False)])
def test_gpu_seconds_are_the_stage_wall_time_on_a_cuda_device(
        monkeypatch: pytest.MonkeyPatch, segmenter: type, gpu: bool) -> None:
    monkeypatch.setattr(stages, "build_segmenter", lambda settings: segmenter())
    dofn = stages.Segment(PipelineConfig())
    dofn.setup()
    items = []
    for i in range(2):
        item = ImageItem(ImageRef(f"k{i}", f"mem://k{i}", {"kind": "file", "path": "x"}))
        item.width, item.height = 8, 8
        items.append(item)
    out = list(dofn.process(items))
    assert out == items
    for item in items:
        wall, spent = item.timings["segment"], item.costs["segment"]
        assert wall >= 0.01 and 0 <= spent["cpu_s"]
        assert spent["gpu_s"] == (wall if gpu else 0.0)


def test_on_gpu_reads_the_device_of_the_model_or_of_any_client() -> None:
    assert cost.on_gpu({"device": "cuda"}) and cost.on_gpu({"device": "cuda:1"})
    assert not cost.on_gpu({"device": "cpu"}) and not cost.on_gpu({}) and not cost.on_gpu(None)
    assert cost.on_gpu({"device": "cpu", "clients": {"default": {"device": "cpu"},
                                                     "judge": {"device": "cuda:0"}}})


# --------------------------------------------------------------------------- the card


def _manifest(costs: dict[str, dict[str, float]], timings: dict[str, float], images: int,
              regions: int) -> dict[str, Any]:
    return {"cost": cost.section(costs, timings, images, regions)}


def test_card_shows_averages_and_an_extrapolation_from_the_measured_images() -> None:
    # 4 images: 0.36 CPU s each (0.3 segment + 0.06 caption), 1.8 GPU s each, 5 calls each
    costs = {"segment": {"cpu_s": 1.2, "gpu_s": 7.2},
             "caption": {"cpu_s": 0.24, "gpu_s": 0.0, "requests": 16, "calls": 20,
                         "failed_calls": 4, "calls_without_usage": 2, "prompt_tokens": 4000,
                         "completion_tokens": 1000, "bytes_sent": 400_000,
                         "bytes_received": 8000}}
    manifest = _manifest(costs, {"segment": 8.0, "caption": 2.0}, images=4, regions=16)
    section = manifest["cost"]
    assert section["per_image"]["cpu_s"] == 0.36 and section["per_region"]["calls"] == 1.25
    assert section["caption"]["calls"] == 20 and section["stages"]["segment"]["gpu_s"] == 7.2
    text = "\n".join(card._cost_lines(manifest))
    # 1M images: 0.36 s x 1e6 / 3600 = 100 CPU-hours; 1.8 s -> 500 GPU-hours; 5M calls;
    # 1000 prompt tokens per image -> 1B; 250 completion tokens -> 250M
    assert "| 1M | 100 | 500 | 694 | 5M | 1B | 250M |" in text, text
    assert "| 10M | 1,000 | 5,000 | 6,944 | 50M | 10B | 2.5B |" in text, text
    assert "Extrapolated linearly from these 4 images" in text
    assert "| model calls | 20 | 5 | 1.25 |" in text
    assert "2 of 20 calls got an answer without token usage" in text
    assert "GPU ms / image" in text and "No GPU was used" not in text
    # milliseconds per image (wall, CPU, GPU), then per region
    assert "| segment | 2,000 | 300 | 1,800 | 500 | 75 | 450 |" in text, text
    assert "| caption | 500 | 60 | 0 | 125 | 15 | 0 |" in text, text
    cpu_only = _manifest({"decode": {"cpu_s": 0.4, "gpu_s": 0.0}}, {"decode": 0.5}, 2, 0)
    text = "\n".join(card._cost_lines(cpu_only))
    assert "No GPU was used by the pipeline's workers" in text and "GPU ms" not in text
    assert "The captioner called no model." in text and "| 1M | 55.6 | 0 |" in text
    assert card._cost_lines({"cost": cost.section({}, {}, 0, 0)}) == \
        ["Nothing was measured (no image was processed)."]


def test_shards_written_before_costs_were_recorded_are_left_out_of_the_averages() -> None:
    from pipelines import finalize

    new = {"shard": "a", "inputs": 2, "regions_by_level": {"pixel": 4}, "timings": {"decode": 1.0},
           "costs": {"decode": {"cpu_s": 0.8, "gpu_s": 0.0}}}
    old = {"shard": "b", "inputs": 3, "regions_by_level": {"pixel": 9}, "timings": {"decode": 5.0}}
    t = finalize.totals({"shards": {"a": new, "b": old}})
    assert t["inputs"] == 5 and t["timings"] == {"decode": 6.0}          # the counts stay whole
    section = cost.section(t["costs"], t["cost_timings"], t["cost_inputs"], t["cost_regions"])
    assert (section["images"], section["regions"]) == (2, 4)
    assert section["stages"]["decode"] == {"wall_s": 1.0, "cpu_s": 0.8, "gpu_s": 0.0,
                                           "cpu_clock": "thread", "cpu_overlapped": 0}
    assert section["per_image"]["cpu_s"] == 0.4


# --------------------------------------------------------------------------- builds


def _program(tmp_path: Path) -> Path:
    """umg with image long captions answered without usage and region tags retried once."""
    text = (REPO / "annotators/caption/programs/umg.yaml").read_text()
    long_caption = "Describe this image in detail in 3 to 6 sentences"
    tags = "List 2 to 8 short lowercase tags for what is inside the red box."
    assert long_caption in text and tags in text
    text = text.replace(long_caption, f"{NO_USAGE.decode()} {long_caption}")
    text = text.replace(tags, f"{tags} {RETRY_ONCE}")
    path = tmp_path / "umg-cost.yaml"
    path.write_text(text)
    return path


def _config(program: Path, url: str) -> dict[str, Any]:
    return {"segmenter": {"name": "given"}, "regions": {"max_regions": 3, "min_area_frac": 0.0},
            "shards": {"samples_per_shard": 4},
            "captioner": {"name": "vllm", "model": "fake-vlm", "program": str(program),
                          "endpoints": [url], "client": FAST_CLIENT}}


def _shard_costs(out: Path) -> dict[str, dict[str, float]]:
    stats = [json.loads(p.read_text()) for p in sorted((out / "_work").glob("*/stats.json"))]
    assert stats and all("costs" in st for st in stats)
    return cost.summed(st["costs"] for st in stats)


def _check_seconds(section: dict[str, Any], stages_run: tuple[str, ...]) -> None:
    for stage, v in section["stages"].items():
        assert set(v) == {"wall_s", "cpu_s", "gpu_s", "cpu_clock", "cpu_overlapped"}
        assert v["gpu_s"] == 0.0 and v["cpu_overlapped"] == 0
        if stage not in stages_run:
            continue
        assert v["wall_s"] > 0 and v["cpu_s"] > 0, (stage, v)
        if v["cpu_clock"] == "thread":     # one thread's CPU cannot pass its wall time
            assert v["cpu_s"] <= v["wall_s"] + 0.005, (stage, v)
        else:                              # every thread of the process: bounded by the cores
            assert v["cpu_s"] <= v["wall_s"] * (os.cpu_count() or 1) + 0.05, (stage, v)
    total = section["total"]
    assert total["cpu_s"] == pytest.approx(sum(v["cpu_s"] for v in section["stages"].values()), abs=0.002)


@pytest.mark.slow
def test_build_cost_matches_the_fault_server_and_survives_an_incremental_run(tmp_path: Path) -> None:
    program = _program(tmp_path)
    # the server in its own process: its CPU is not the caption stage's
    with start_in_process(FaultConfig(deterministic=True)) as server:
        out, first = build(tmp_path, "synthetic://3?size=64", config=_config(program, server.base_url))
        one = server.stats()
    c = first["cost"]["caption"]
    totals = one["totals"]
    regions = sum(first["counts"]["regions_by_level"].values())
    assert first["counts"]["written"] == 3 and regions >= 3
    assert c["calls"] == one["n_requests"] == c["requests"] + one["counts"]["http_503"]
    assert c["failed_calls"] == one["counts"]["http_503"] >= 3          # each region's tags once
    assert c["bytes_sent"] == totals["request_bytes"]
    assert (c["prompt_tokens"], c["completion_tokens"]) == (totals["prompt_tokens"],
                                                            totals["completion_tokens"])
    assert c["calls_without_usage"] == totals["without_usage"] == 3     # one long caption per image
    assert c["bytes_received"] > 0
    assert first["cost"]["images"] == 3 and first["cost"]["regions"] == regions
    assert first["cost"]["per_image"]["calls"] == pytest.approx(c["calls"] / 3, abs=1e-6)
    _check_seconds(first["cost"], ("read", "decode", "segment", "select_regions", "caption",
                                   "assemble"))
    assert _shard_costs(out)["caption"]["calls"] == c["calls"]
    readme = (out / "README.md").read_text()
    assert "## Cost" in readme and "Extrapolated linearly from these 3 images" in readme
    assert "| images | CPU-hours | GPU-hours |" in readme and "| 1M |" in readme and "| 10M |" in readme
    assert "No GPU was used by the pipeline's workers" in readme

    # one more input, another server: only the new image is processed, the old shard's costs stay
    with start_in_process(FaultConfig(deterministic=True)) as server:
        _, second = build(tmp_path, "synthetic://4?size=64", config=_config(program, server.base_url))
        two = server.stats()
    assert second["shards_this_run"] == 1 and second["counts"]["written"] == 4
    both = second["cost"]["caption"]
    assert 0 < two["n_requests"] < one["n_requests"]
    assert both["calls"] == one["n_requests"] + two["n_requests"]
    assert both["bytes_sent"] == totals["request_bytes"] + two["totals"]["request_bytes"]
    assert both["prompt_tokens"] == totals["prompt_tokens"] + two["totals"]["prompt_tokens"]
    assert both["calls_without_usage"] == 4
    assert second["cost"]["images"] == 4
    for stage, v in first["cost"]["stages"].items():
        assert second["cost"]["stages"][stage]["cpu_s"] >= v["cpu_s"]
    assert _shard_costs(out)["caption"]["calls"] == both["calls"]


@pytest.mark.slow
def test_a_gpu_segmenter_shows_gpu_hours_on_the_card(tmp_path: Path) -> None:
    config = {"segmenter": {"name": "tests.test_cost:FakeGpuSegmenter"},
              "captioner": {"name": "attributes"}, "shards": {"samples_per_shard": 4}}
    out, manifest = build(tmp_path, "synthetic://2?size=64", config=config)
    stages_cost = manifest["cost"]["stages"]
    assert stages_cost["segment"]["gpu_s"] == pytest.approx(stages_cost["segment"]["wall_s"], abs=0.002)
    assert stages_cost["segment"]["gpu_s"] >= 0.02
    assert all(v["gpu_s"] == 0 for stage, v in stages_cost.items() if stage != "segment")
    assert manifest["cost"]["caption"]["calls"] == 0
    readme = (out / "README.md").read_text()
    assert "GPU ms / image" in readme and "No GPU was used" not in readme
    assert "The captioner called no model." in readme
