"""Tests of the `vllm` captioner (caption programs, batching, failures, provenance) against the
fault-injecting OpenAI-style server, and of the managed server's lifecycle."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from annotators.base import CaptionInput
from annotators.caption.backends.openai_api.captioner import VllmCaptioner
from annotators.caption.engine import clean_tags
from annotators.caption.program import load_program, parse_program
from annotators.registry import build_captioner
from annotators.serving import managed_server
from annotators.serving.managed_server import ManagedServer, ServerError
from settings import ConfigError
from tests.fault_server import FaultApp, FaultConfig, FaultServer
from tests.helpers import make_item

FAIL_BBOX = "[1, 1, 7, 7]"        # the region with this box gets a refusal
REJECT_BBOX = "[40, 30, 10, 8]"   # longgrit's judge rejects the region with this box
BAD_IMAGE = "97x61"               # the image of this size gets HTTP 400 on its caption


class ScriptedApp(FaultApp):
    """The fault server, plus faults and judge verdicts chosen by text in the request."""

    async def _answer(self, request: Any, body: dict[str, Any], fault: str | None) -> Any:
        raw = json.dumps(body)
        if fault is None and FAIL_BBOX in raw:
            fault = "refusal"
        if fault is None and BAD_IMAGE in raw:
            fault = "http_400"
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        if fault is None and "keep" in schema.get("properties", {}):
            keep = REJECT_BBOX not in raw
            verdict = {"keep": keep, "reason": "consistent" if keep else "wrong colour"}
            from aiohttp import web
            return web.json_response(self._completion(body, json.dumps(verdict), "stop"))
        return await super()._answer(request, body, fault)


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    """A scripted fault server in a background thread."""
    srv = FaultServer()
    srv.app = ScriptedApp(FaultConfig(latency_s=0.001))
    srv.start()
    yield srv
    srv.stop()


def captioner(url: str, program: str, **extra: Any) -> VllmCaptioner:
    """A vllm captioner with fast client settings."""
    client = {"timeout_s": 5.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 1}
    cap = build_captioner({"name": "vllm", "model": "fake-vlm", "endpoints": [url],
                           "program": program, "client": client, **extra})
    assert isinstance(cap, VllmCaptioner)
    return cap


def run(cap: VllmCaptioner, items: list[CaptionInput]) -> list[Any]:
    """caption_batch between setup and teardown."""
    cap.setup()
    try:
        return cap.caption_batch(items)
    finally:
        cap.teardown()


# --------------------------------------------------------------------------- programs


@pytest.mark.parametrize("program", ["umg", "longgrit"])
def test_program_produces_text_for_every_region(server: FaultServer, program: str) -> None:
    cap = captioner(server.base_url, program)
    items = [make_item(f"img{i}", cap.prompt_specs()) for i in range(3)]
    before = len(server.requests)
    results = run(cap, items)
    assert len(results) == 3
    for result in results:
        assert result.image_level is not None and result.image_level.caption
        assert result.image_level.long_caption and result.image_level.tags
        if program == "longgrit":   # p1 is rejected by the judge (see REJECT_BBOX)
            assert [f.reason for f in result.failures] == ["judge_rejected"]
            assert set(result.regions) == {"r0", "p0"}
        else:
            assert result.failures == [] and set(result.regions) == {"r0", "p0", "p1"}
        for text in result.regions.values():
            assert text.caption and text.long_caption and text.tags
            assert all(t == t.strip().lower() for t in text.tags)
            assert len(set(text.tags)) == len(text.tags)
            assert text.provenance["program"]["id"] == program
    steps = load_program(program).steps
    # judge-rejected targets skip later steps; everyone else runs every step of their level
    expected = 3 * (len(steps["image"]) + len(steps["region"]) + 2 * len(steps["pixel"]))
    if program == "longgrit":
        expected -= 3 * (len(steps["pixel"]) - 2)
    assert len(server.requests) - before == expected


def test_tags_come_from_structured_output_and_images_are_ordered(server: FaultServer) -> None:
    cap = captioner(server.base_url, "umg")
    item = make_item("order", cap.prompt_specs())
    before = len(server.requests)
    run(cap, [item])
    requests = [r.body for r in server.requests[before:]]
    tag_requests = [b for b in requests if b.get("response_format")]
    assert len(tag_requests) == 4   # image, r0, p0, p1
    for body in tag_requests:
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["required"] == ["tags"]
    cap.setup()
    whole = cap.clients["default"].encode_image(item.image)
    cap.teardown()
    for body in requests:
        assert body["messages"][0]["role"] == "system"
        content = body["messages"][-1]["content"]
        kinds = [part["type"] for part in content]
        assert kinds[-1] == "text"
        urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        assert urls[0] == whole                 # shared whole image first
        assert whole not in urls[1:]            # region prompts after it
    pixel = [b for b in requests if "outlined" in json.dumps(b)]
    assert pixel and all(len([p for p in b["messages"][-1]["content"]
                              if p["type"] == "image_url"]) == 3 for b in pixel)


def test_failing_region_and_failing_image(server: FaultServer) -> None:
    cap = captioner(server.base_url, "umg")
    specs = cap.prompt_specs()
    items = [make_item("failing", specs), make_item("fine", specs),
             make_item("bad", specs, width=97, height=61)]
    failing, fine, bad = run(cap, items)
    assert [(f.reason, f.region_id) for f in failing.failures] == [("refusal", "r0")]
    assert set(failing.regions) == {"p0", "p1"} and failing.image_level is not None
    assert fine.failures == [] and set(fine.regions) == {"r0", "p0", "p1"}
    assert bad.image_level is None and bad.regions == {}
    assert [(f.reason, f.region_id) for f in bad.failures] == [("http_400", None)]
    assert "step caption" in bad.failures[0].detail


def test_judge_rejection_detail(server: FaultServer) -> None:
    cap = captioner(server.base_url, "longgrit")
    result = run(cap, [make_item("judge", cap.prompt_specs())])[0]
    (failure,) = result.failures
    assert (failure.reason, failure.region_id, failure.detail) == ("judge_rejected", "p1",
                                                                   "wrong colour")


def _program_copy(tmp_path: Path, name: str, edit: Any) -> str:
    """A copy of program ``name`` changed by ``edit(data)``, as a path."""
    data = yaml.safe_load(Path(load_program(name).source).read_text())
    edit(data)
    path = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _region_step(data: dict[str, Any], level: str, name: str) -> dict[str, Any]:
    return next(s for s in data["steps"][level] if s["name"] == name)


def test_judge_verdicts_are_kept_and_flagged_targets_stay(server: FaultServer, tmp_path: Path) -> None:
    """Every judged text carries its verdict and reason, and the intermediate steps' outputs; with
    on_reject: flag a rejected region stays, marked, and runs its later steps."""
    cap = captioner(server.base_url, "longgrit")
    result = run(cap, [make_item("judge", cap.prompt_specs())])[0]
    for text in result.regions.values():
        assert text.judge == {"keep": True, "reason": "consistent"}
        assert text.scores["judge_keep"] == 1.0
        assert set(text.steps) == {"context"} and text.steps["context"]
    assert result.image_level.judge is None and result.image_level.steps == {}

    def flag(data: dict[str, Any]) -> None:
        _region_step(data, "pixel", "judge")["on_reject"] = "flag"
    flagged = captioner(server.base_url, _program_copy(tmp_path, "longgrit", flag))
    result = run(flagged, [make_item("judge", flagged.prompt_specs())])[0]
    assert result.failures == [] and set(result.regions) == {"r0", "p0", "p1"}
    p1 = result.regions["p1"]
    assert p1.judge == {"keep": False, "reason": "wrong colour"} and p1.scores["judge_keep"] == 0.0
    assert p1.long_caption and p1.tags and p1.steps["context"]

    def bad(data: dict[str, Any]) -> None:
        _region_step(data, "pixel", "caption")["on_reject"] = "flag"
    with pytest.raises(ConfigError, match="on_reject: only a 'judge' step"):
        captioner(server.base_url, _program_copy(tmp_path, "longgrit", bad))


def test_step_hashes_follow_what_each_step_reads(server: FaultServer, tmp_path: Path) -> None:
    """A changed prompt changes its step's hash and those of the steps that read it, nothing else;
    run settings (timeouts, endpoints) change none; the model changes all."""
    base = captioner(server.base_url, "longgrit").step_hashes()

    def context(data: dict[str, Any]) -> None:
        _region_step(data, "region", "context")["prompt"] += " Be brief."
    changed = captioner(server.base_url, _program_copy(tmp_path, "longgrit", context)).step_hashes()
    differs = {level: sorted(s for s in base[level] if base[level][s] != changed[level][s])
               for level in base}
    # longgrit's region and pixel levels share one list of steps (a YAML anchor)
    assert differs == {"image": [], "region": ["context", "long_caption", "tags"],
                       "pixel": ["context", "long_caption", "tags"]}
    run_only = captioner("http://127.0.0.1:9/v1", "longgrit",
                         client={"timeout_s": 99.0, "max_retries": 7}).step_hashes()
    assert run_only == base
    other_model = captioner(server.base_url, "longgrit", model="other-vlm").step_hashes()
    assert all(other_model[lv][s] != base[lv][s] for lv in base for s in base[lv])
    assert cap_provenance_steps(server) == base


def cap_provenance_steps(server: FaultServer) -> dict[str, Any]:
    return captioner(server.base_url, "longgrit").provenance()["steps"]


def test_reused_steps_send_no_request(server: FaultServer, tmp_path: Path) -> None:
    """Outputs given in CaptionInput.reuse are kept as they are and not asked again; only the
    steps left out are sent."""
    cap = captioner(server.base_url, "longgrit")
    first = run(cap, [make_item("reuse", cap.prompt_specs())])[0]

    def outputs(text: Any) -> dict[str, Any]:
        out = {"caption": text.caption, "long_caption": text.long_caption, "tags": text.tags,
               **text.steps}
        if text.judge is not None:
            out["judge"] = text.judge
        return out
    targets = {"image": first.image_level, **first.regions}
    item = make_item("reuse", cap.prompt_specs())
    item.reuse = {t: outputs(text) for t, text in targets.items()}
    before = len(server.requests)
    again = run(cap, [item])[0]
    # only p1, rejected by the judge the first time, has nothing to reuse: caption + judge again
    assert len(server.requests) == before + 2
    assert [(f.reason, f.region_id) for f in again.failures] == [("judge_rejected", "p1")]
    assert {t: outputs(x) for t, x in {"image": again.image_level, **again.regions}.items()} == \
        {t: outputs(x) for t, x in targets.items()}
    # everything but the tags reused: one request per target with a tags step
    item.reuse = {t: {k: v for k, v in outputs(text).items() if k != "tags"} for t, text in targets.items()}
    item.reuse["image"] = {}
    before = len(server.requests)
    partial = run(cap, [item])[0]
    sent = [r.body for r in server.requests[before:]]
    steps = load_program("longgrit").steps
    assert len(sent) == len(steps["image"]) + len(first.regions) + 2
    region_tags = [b for b in sent if "short lowercase tags (object, colour" in json.dumps(b)]
    assert len(region_tags) == len(first.regions)
    for region_id, text in partial.regions.items():
        assert text.long_caption == first.regions[region_id].long_caption and text.tags


def test_named_client_per_step(server: FaultServer, tmp_path: Path) -> None:
    data = yaml.safe_load(Path(load_program("umg").source).read_text())
    data["steps"]["image"][2]["client"] = "tagger"
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    cap = captioner(server.base_url, str(path), clients={"tagger": {"model": "tag-model"}})
    before = len(server.requests)
    result = run(cap, [make_item("named", cap.prompt_specs())])[0]
    assert result.image_level is not None and result.image_level.tags
    models = [r.body["model"] for r in server.requests[before:]]
    assert models.count("tag-model") == 1 and models.count("fake-vlm") == len(models) - 1
    assert cap.provenance()["models"] == ["fake-vlm", "tag-model"]
    with pytest.raises(ConfigError, match="clients"):
        captioner(server.base_url, str(path))


def test_provenance_has_program_hash_and_no_api_key(server: FaultServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-very-secret")
    cap = captioner(server.base_url, "longgrit",
                    client={"extra_body": {"api_key": "sk-other", "top_k": 5}})
    prov = cap.provenance()
    assert prov["program"] == {"id": "longgrit", "version": "1",
                               "hash": load_program("longgrit").hash}
    assert prov["model"] == "fake-vlm"
    assert prov["visual_prompts"]["pixel"][0]["kind"] == "crop_masked"
    text = json.dumps(prov)
    assert "sk-" not in text and "api_key" not in text and "VLLM_API_KEY" not in text
    assert prov["clients"]["default"]["extra_body"] == {"top_k": 5}
    result = run(cap, [make_item("prov", cap.prompt_specs())])[0]
    assert result.image_level.provenance == prov


def test_program_validation_errors() -> None:
    good = yaml.safe_load((Path(load_program("umg").source)).read_text())
    bad = json.loads(json.dumps(good))
    bad["steps"]["region"][0]["prompt"] = "Describe {nonsense}"
    with pytest.raises(ConfigError, match="nonsense"):
        parse_program(bad)
    bad = json.loads(json.dumps(good))
    bad["steps"]["pixel"][0]["images"] = ["image", "box"]
    with pytest.raises(ConfigError, match="unknown image"):
        parse_program(bad)
    with pytest.raises(ConfigError, match="no program"):
        load_program("does-not-exist")
    assert clean_tags({"tags": [" Red ", "red", "Wooden Chair.", ""]}) == ["red", "wooden chair"]
    assert parse_program(good).hash == load_program("umg").hash


# --------------------------------------------------------------------------- managed server

SERVE_ANY_GET = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
    "    def log_message(self, *a):\n"
    "        print(*a, flush=True)\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (checked through /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout_s: float = 5.0) -> bool:
    """Wait until ``pid`` is gone; True if it is."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_managed_server_command_is_logged_with_secrets_masked(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The server's command line is logged at start; an API key in it is not."""
    server = ManagedServer({"command": [sys.executable, "-c", SERVE_ANY_GET, "{port}", "--api-key",
                                        "sk-live-abcdefgh1234", "--hf-token=hf_abcdefghijkl"],
                            "ready_timeout_s": 20, "poll_interval_s": 0.05, "stop_grace_s": 2,
                            "log_path": str(tmp_path / "server.log")})
    with caplog.at_level(logging.INFO, logger=managed_server.log.name):
        server.start()
    server.stop()
    text = caplog.text
    assert "starting managed server" in text and "--api-key ***" in text and "--hf-token=***" in text
    assert "sk-live-abcdefgh1234" not in text and "hf_abcdefghijkl" not in text


def test_managed_server_lifecycle(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    server = ManagedServer({"command": [sys.executable, "-c", SERVE_ANY_GET, "{port}"],
                            "ready_timeout_s": 20, "poll_interval_s": 0.05, "max_restarts": 1,
                            "stop_grace_s": 2, "log_path": str(log_path)})
    server.start()
    assert server.alive() and server.port > 0 and server in managed_server.running()
    first = server.pid
    os.kill(first, 9)
    assert _wait_dead(first)
    server.ensure_running()                                 # restart 1 of 1
    assert server.alive() and server.pid != first and server.restarts == 1
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    second = server.pid
    os.kill(second, 9)
    assert _wait_dead(second)
    with pytest.raises(ServerError, match="max_restarts"):
        server.ensure_running()
    server.stop()
    server.stop()                                           # idempotent
    assert server not in managed_server.running()
    assert "GET" in log_path.read_text()                    # output went to the log file

    again = ManagedServer({"command": [sys.executable, "-c", SERVE_ANY_GET, "{port}"],
                           "poll_interval_s": 0.05, "stop_grace_s": 2})
    again.start()
    pid = again.pid
    managed_server.stop_all()
    assert _wait_dead(pid) and managed_server.running() == []


def test_managed_server_bad_commands_fail_clearly(tmp_path: Path) -> None:
    crash = "import sys; print('boom'); sys.exit(3)"
    exits = ManagedServer({"command": [sys.executable, "-c", crash],
                           "ready_timeout_s": 10, "poll_interval_s": 0.05,
                           "log_path": str(tmp_path / "a.log")})
    started = time.monotonic()
    with pytest.raises(ServerError, match="exited with code 3.*boom"):
        exits.start()
    assert time.monotonic() - started < 5
    silent = ManagedServer({"command": [sys.executable, "-c", "import time; time.sleep(60)"],
                            "ready_timeout_s": 1, "poll_interval_s": 0.05, "stop_grace_s": 1,
                            "log_path": str(tmp_path / "b.log")})
    with pytest.raises(ServerError, match="did not answer"):
        silent.start()
    assert managed_server.running() == []
    with pytest.raises(ServerError, match="cannot run"):
        ManagedServer({"command": ["/nonexistent/serve"]}).start()
    with pytest.raises(ConfigError, match="command"):
        ManagedServer({"command": []})


def test_captioner_with_managed_fault_server(tmp_path: Path) -> None:
    command = [sys.executable, "-c",
               "import sys; from aiohttp import web; from tests.fault_server import FaultApp, "
               "FaultConfig; web.run_app(FaultApp(FaultConfig()).build(), host='127.0.0.1', "
               "port=int(sys.argv[1]), print=None)", "{port}"]
    cap = build_captioner({"name": "vllm", "model": "fake-vlm", "program": "umg",
                           "server": {"command": command, "poll_interval_s": 0.05,
                                      "ready_timeout_s": 20, "stop_grace_s": 2,
                                      "cwd": str(Path(__file__).parents[1]),
                                      "log_path": str(tmp_path / "fs.log")}})
    cap.setup()
    try:
        assert cap.server is not None and cap.clients["default"].settings.endpoints == \
            [cap.server.base_url]
        pid = cap.server.pid
        result = cap.caption_batch([make_item("managed", cap.prompt_specs())])[0]
        assert result.image_level is not None and set(result.regions) == {"r0", "p0", "p1"}
        assert "endpoints" not in cap.provenance()["clients"]["default"]
    finally:
        cap.teardown()
    assert _wait_dead(pid) and managed_server.running() == []


def test_managed_server_dies_with_its_parent(tmp_path: Path) -> None:
    parent = (
        "import sys, time\n"
        "from annotators.serving.managed_server import ManagedServer\n"
        "s = ManagedServer({'command': [sys.executable, '-c', sys.argv[1], '{port}'],\n"
        "                   'poll_interval_s': 0.05, 'log_path': sys.argv[2]}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent, SERVE_ANY_GET, str(tmp_path / "c.log")],
                            stdout=subprocess.PIPE, cwd=str(Path(__file__).parents[1]))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert _alive(child)
    proc.kill()                 # no atexit, no finally: only the parent-death signal is left
    proc.wait(5)
    proc.stdout.close()
    assert _wait_dead(child)
