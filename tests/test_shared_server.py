"""One managed model server per machine: the SDK processes of a multi-process run share it, and
it never outlives the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from annotators.serving import managed_server, shared
from settings import parse_settings
from tests.conftest import build

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
FAST_CLIENT = {"timeout_s": 5.0, "max_retries": 4, "backoff_base_s": 0.01, "backoff_max_s": 0.05}

# A healthy OpenAI-compatible fake server (tests.fault_server without faults) that appends its
# process id to STARTS when it starts, and the process id of every client that sends it a chat
# request to CLIENTS (found through /proc from the connection's address).
FAKE_SERVER = r"""
import os, sys
from pathlib import Path
from aiohttp import web
from tests.fault_server import FaultApp, FaultConfig

port, starts, clients = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
stubborn = "ignore-sigterm" in sys.argv   # like a server whose workers outlive its parent
if stubborn:
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with starts.open("a") as out:
    out.write(f"{os.getpid()}\n")

def client_pid(peer_port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, remote, inode = line.split()[1], line.split()[2], line.split()[9]
            if (int(local.rsplit(":", 1)[1], 16) == peer_port
                    and int(remote.rsplit(":", 1)[1], 16) == port):
                inodes.add(f"socket:[{inode}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:
                pass
    return None

seen = set()

@web.middleware
async def who(request, handler):
    peer = request.transport.get_extra_info("peername")
    if request.method == "POST" and peer and peer[1] not in seen:
        seen.add(peer[1])
        with clients.open("a") as out:
            out.write(f"{client_pid(peer[1])}\n")
    return await handler(request)

app = FaultApp(FaultConfig(record=False)).build()
app.middlewares.append(who)
web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=not stubborn)
"""


def _server(tmp_path: Path, marker: str, *flags: str, **extra: object) -> dict:
    return {"command": [sys.executable, "-c", FAKE_SERVER, "{port}", str(tmp_path / "starts"),
                        str(tmp_path / "clients"), marker, *flags],
            "poll_interval_s": 0.05, "ready_timeout_s": 30, "stop_grace_s": 2, "cwd": str(REPO),
            "log_path": str(tmp_path / "server.log"), **extra}


def _config(server: dict) -> dict:
    return {"segmenter": {"name": "given"}, "regions": {"max_regions": 2, "min_area_frac": 0.0},
            "batch": {"caption": 1},
            "captioner": {"name": "vllm", "model": "fake-vlm", "program": "umg",
                          "client": FAST_CLIENT, "server": server}}


def _alive(pattern: bytes) -> list[int]:
    """Live processes whose command line holds ``pattern``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and pattern in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _no_server_left(marker: str) -> bool:
    deadline = time.time() + 10
    while _alive(marker.encode()) and time.time() < deadline:
        time.sleep(0.1)
    return _alive(marker.encode()) == [] and managed_server.running() == []


@pytest.mark.parametrize("workers", [2, 1])
def test_one_server_per_machine(tmp_path: Path, workers: int) -> None:
    marker = f"shared-fake-server-{time.time_ns()}"
    config = _config(_server(tmp_path, marker))
    _, manifest = build(tmp_path, "synthetic://8?size=64", config=config,
                        extra=["--workers", str(workers)])
    starts, clients = _lines(tmp_path / "starts"), {int(p) for p in _lines(tmp_path / "clients")}
    assert manifest["counts"]["written"] == 8
    assert len(starts) == 1, f"the server command ran {len(starts)} times: {starts}"
    if workers == 1:
        assert clients == {os.getpid()}        # unchanged: the run's only process asks
    else:   # both worker processes asked the one server, each with its own client
        assert len(clients) == 2 and os.getpid() not in clients, clients
    assert _no_server_left(marker)
    assert not [p for p in shared.RECORD_DIR.glob("*.json") if marker in p.read_text()]


def test_driver_stop_all_stops_servers_of_its_workers(tmp_path: Path) -> None:
    """A worker killed outright (no exit hooks) whose server ignores the parent-death signal:
    the driver's stop_all still stops that server, found through its record."""
    marker = f"orphan-fake-server-{time.time_ns()}"
    settings = _server(tmp_path, marker, "ignore-sigterm", stop_grace_s=1)
    worker = (
        "import sys, time, json\n"
        "from annotators.serving import managed_server\n"
        "from settings import parse_settings\n"
        "s = parse_settings(managed_server.ServerSettings, json.loads(sys.argv[1]), 'server')\n"
        "h = managed_server.acquire(s)\n"
        "print(h.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", worker, json.dumps(settings)],
                            stdout=subprocess.PIPE, cwd=str(REPO))
    assert proc.stdout is not None
    server_pid = int(proc.stdout.readline())
    proc.kill()                 # no atexit, no finally
    proc.wait(5)
    proc.stdout.close()
    time.sleep(0.5)
    assert _alive(marker.encode()) == [server_pid], "the orphaned server should still run"
    managed_server.stop_all()   # what the driver does in its finally
    assert _no_server_left(marker)
    assert not [p for p in shared.RECORD_DIR.glob("*.json") if str(server_pid) in p.name]


def test_unrelated_servers_are_left_alone(tmp_path: Path) -> None:
    """stop_all stops only servers started below this process, not another run's."""
    marker = f"other-run-fake-server-{time.time_ns()}"
    settings = parse_settings(managed_server.ServerSettings, _server(tmp_path, marker), "server")
    # A server recorded by a process that is not below this one: another run's driver.
    server = managed_server.ManagedServer(settings)
    server.start()
    try:
        record = shared.RECORD_DIR / f"{server.pid}.json"
        data = json.loads(record.read_text())
        data["owner"], data["ancestors"] = 1, []
        record.write_text(json.dumps(data))
        managed_server._unregister(server)       # as if it were not this process's own
        managed_server.stop_all()
        assert _alive(marker.encode()) == [server.pid]
    finally:
        server.stop()
    assert _no_server_left(marker) and not record.exists()


# --------------------------------------------------------------------------- in-process models

SAM_USER = r"""
import json, sys
from annotators.base import SegmentInput
from annotators.segment.sam import SamAutoSegmenter
from tests.test_sam import LOOSE, comparable, shapes_image

settings = json.loads(sys.argv[1])
segmenter = SamAutoSegmenter(settings, "segmenter")
segmenter.setup()
assert segmenter.model is None, "a process that shares must not load its own copy"
out = segmenter.segment_batch([SegmentInput("k", shapes_image())])[0]
print(json.dumps({"status": segmenter.shared_model.status(), "candidates": comparable(out)}),
      flush=True)
sys.stdin.readline()            # keep using the model until told to stop
segmenter.teardown()
"""


def test_sam_model_loaded_once_for_two_processes() -> None:
    """share_across_processes: two processes, one loaded SAM (in the first), same masks as a
    model of their own would give."""
    pytest.importorskip("segment_anything")
    from tests.test_sam import LOOSE, auto, comparable, run_one, shapes_image

    # points_per_batch changes no mask; here it gives this test's model a tag of its own
    settings = {"model_type": "tiny", "device": "cpu", "points_per_side": 8,
                "points_per_batch": 16 + time.time_ns() % 48, **LOOSE}
    expected = json.loads(json.dumps(comparable(run_one(auto(**settings), shapes_image()))))
    users = [subprocess.Popen([sys.executable, "-c", SAM_USER,
                               json.dumps({**settings, "share_across_processes": True})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO),
                              text=True) for _ in range(2)]
    try:
        answers = [json.loads(user.stdout.readline())     # type: ignore[union-attr]
                   for user in users]
    finally:
        for user in users:
            user.communicate("\n", timeout=60)
    pids = {str(u.pid) for u in users}
    statuses = [a["status"] for a in answers]
    assert len({s["owner"] for s in statuses}) == 1 and str(statuses[0]["owner"]) in pids
    assert {s["loads"] for s in statuses} == {1}, statuses
    assert pids in [set(s["users"]) for s in statuses], statuses   # both used the one copy
    assert expected and all(a["candidates"] == expected for a in answers)
    assert all(u.returncode == 0 for u in users)


def test_transformers_captioner_shares_one_model(tmp_path: Path) -> None:
    """share_across_processes: captioner instances use the owner's one loaded model and caption
    exactly as a model of their own would."""
    pytest.importorskip("transformers")
    from tests.test_hf_captioner import captioner, load_builder, run
    from tests.helpers import make_item

    model = tmp_path / "tiny"
    load_builder().build(model)
    _, expected = run(captioner(model, "umg", allow_truncated=True))
    first, second = (captioner(model, "umg", allow_truncated=True, share_across_processes=True)
                     for _ in range(2))
    first.setup()
    second.setup()
    try:
        assert first.clients == {} and second.clients == {}      # no copy of their own
        items = [make_item(f"img{i}", first.prompt_specs()) for i in range(2)]
        got = second.caption_batch(items)
        status = first.shared_model.status()                       # type: ignore[union-attr]
        assert status["loads"] == 1 and status["users"] == {os.getpid(): 2}
    finally:
        first.teardown()
        second.teardown()
    assert [g.image_level for g in got] == [e.image_level for e in expected]
    assert [g.regions for g in got] == [e.regions for e in expected]


def test_captioner_takes_the_server_over_when_its_owner_ends(tmp_path: Path) -> None:
    """The process owning the shared server is killed: the next batch elsewhere starts the
    server again (on a new port), points its clients there, and captions as before."""
    from annotators.registry import build_captioner
    from tests.helpers import make_item

    marker = f"takeover-fake-server-{time.time_ns()}"
    server = _server(tmp_path, marker)
    owner = (
        "import sys, json\n"
        "from annotators.registry import build_captioner\n"
        "cap = build_captioner(json.loads(sys.argv[1]))\n"
        "cap.setup()\n"
        "print(cap.server.base_url, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    config = _config(server)["captioner"]
    proc = subprocess.Popen([sys.executable, "-c", owner, json.dumps(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO),
                            text=True)
    cap = build_captioner(config)
    try:
        first_url = proc.stdout.readline().strip()              # type: ignore[union-attr]
        cap.setup()
        assert cap.server.base_url == first_url                 # type: ignore[union-attr]
        assert cap.server.status()["owner"] == proc.pid         # type: ignore[union-attr]
        proc.kill()                                             # the owner goes, its server too
        proc.communicate(timeout=10)
        result = cap.caption_batch([make_item("after", cap.prompt_specs())])[0]
        assert result.image_level is not None and not result.failures, result.failures
        assert cap.server.base_url != first_url                 # type: ignore[union-attr]
        assert cap.server.status()["owner"] == os.getpid()      # type: ignore[union-attr]
        assert len(_lines(tmp_path / "starts")) == 2
    finally:
        cap.teardown()
        if proc.poll() is None:
            proc.kill()
    managed_server.stop_all()
    assert _no_server_left(marker)
