"""The same build on other Beam runners: the portable runner with external SDK worker processes
(tools/portable_run.py, what `make build-dataset-portable` runs) gives shards byte-identical to
the default FnApiRunner's, with every input accounted for, and leaves no process behind.

The SDK workers are Beam's own (started by the worker pool as bare ``python``); to see which
process ran which bundle, the test puts a ``sitecustomize`` on their PYTHONPATH that appends
``pid instruction elements`` for every bundle to a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import build

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "portable_run.py"
INPUT = "synthetic://20?size=96"

BUNDLE_HOOK = '''\
import os, sys
_log = os.environ.get("MULTIGRAN_BUNDLE_LOG")
if _log and sys.argv[:1] == ["-c"]:   # an SDK worker started by the worker pool
    from apache_beam.metrics import monitoring_infos as _mi
    from apache_beam.runners.worker import sdk_worker as _sw
    _process_bundle = _sw.SdkWorker.process_bundle

    def _logged(self, request, instruction_id):
        response = _process_bundle(self, request, instruction_id)
        elements = sum(_mi.extract_counter_value(m) for m in response.process_bundle.monitoring_infos
                       if m.urn == _mi.ELEMENT_COUNT_URN)
        with open(_log, "a") as out:
            out.write(f"{os.getpid()} {instruction_id} {elements}\\n")
        return response

    _sw.SdkWorker.process_bundle = _logged
'''


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _portable(tmp_path: Path, config: dict[str, Any], name: str, *,
              wait: bool = True) -> tuple[subprocess.Popen, str, Path, Path, Path]:
    """tools/portable_run.py with 2 SDK workers on INPUT; returns (process, its output when ``wait``,
    the dataset folder, the report, the bundle log)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(BUNDLE_HOOK)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out, report, bundles = tmp_path / name, tmp_path / f"{name}-report.json", tmp_path / f"{name}-bundles.log"
    env = dict(os.environ, MULTIGRAN_BUNDLE_LOG=str(bundles),
               PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(TOOL), "--sdk-workers", "2", "--report", str(report), "--",
                             "--input", INPUT, "--output", str(out), "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=300)[0] if wait else ""
    return proc, output, out, report, bundles


def _bundles_by_pid(log: Path) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, _instruction, elements = line.split()
        found.setdefault(int(pid), []).append(int(elements))
    return found


def test_portable_runner_two_sdk_workers_same_shards_as_fnapi(tmp_path: Path, fast_config: dict) -> None:
    ref_out, ref_manifest = build(tmp_path, INPUT, "fnapi", config=fast_config)

    proc, output, out, report_path, bundle_log = _portable(tmp_path, fast_config, "portable")
    assert proc.returncode == 0, output[-4000:]
    report = json.loads(report_path.read_text())
    manifest = json.loads((out / "manifest.json").read_text())

    # byte-identical shards, same names
    ref_shards = _shards(ref_out)
    assert ref_shards and _shards(out) == ref_shards
    # every input accounted for, on both runners
    for m in (ref_manifest, manifest):
        counts = m["counts"]
        assert counts["inputs"] == 20 == counts["written"] + counts["failed"]
        assert counts["written"] == 20
    assert manifest["counts"] == ref_manifest["counts"]

    # at least two SDK worker processes ran bundles that carried elements
    worked = {pid for pid, counts in _bundles_by_pid(bundle_log).items() if sum(counts) > 0}
    assert len(worked) >= 2, _bundles_by_pid(bundle_log)
    assert worked <= {w["pid"] for w in report["worker_processes"]}
    assert os.getpid() not in worked and report["pool_pid"] not in worked
    assert "--environment_type=EXTERNAL" in report["command"]

    # nothing left running
    assert report["leftover"] == []
    assert not [pid for pid in [report["pool_pid"], *worked] if _alive(pid)]


def test_portable_run_stops_the_pool_when_stopped(tmp_path: Path, fast_config: dict) -> None:
    """SIGTERM while the SDK workers are busy: the tool exits 143 and stops pool and workers."""
    proc, _, _out, report_path, bundle_log = _portable(tmp_path, fast_config, "stopped", wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (bundle_log.exists() and bundle_log.read_text().strip()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert bundle_log.exists(), "no SDK worker ran a bundle within 120 s"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-4000:]
    report = json.loads(report_path.read_text())
    workers = [w["pid"] for w in report["worker_processes"]]
    assert workers and report["leftover"] == []
    assert not [pid for pid in [report["pool_pid"], *workers] if _alive(pid)]
