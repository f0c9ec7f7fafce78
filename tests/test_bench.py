"""`make bench` runs every CPU benchmark (here on tiny inputs, only to prove each one works) and
writes one report with a row per figure; bench/gpu.sh runs its steps (tiny SAM on CPU)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_bench_smoke_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # prompts, embedded and client have their own smoke tests (test_visual_prompts,
    # test_embedded_default_speed, test_vllm_client); here the others and the report itself
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--smoke", "--only", "overhead", "memory",
                           "scaling", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["smoke"] is True and report["machine"]["cpus"] >= 1
    figures = {row["figure"].split(" ")[0] for row in report["rows"]}
    assert figures == {"P1", "P2", "Embedded"} and len(report["rows"]) == 3
    for row in report["rows"]:
        # tiny inputs: the figures are noise (a marginal rate can even be missing), not results
        assert row["measured"] is None or math.isfinite(row["measured"]), row
        assert row["met"] in (True, False, None) and row["target"]
    assert "| figure | target | measured | met |" in proc.stdout


@pytest.mark.slow
def test_gpu_script_runs_its_steps_in_smoke_mode(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sam = json.loads((tmp_path / "smoke-sam-tiny.json").read_text())
    pipeline = json.loads((tmp_path / "smoke-pipeline.json").read_text())
    assert pipeline["device"] == "cpu" and pipeline["written"] == 10 and math.isfinite(pipeline["images_per_s"])
    assert pipeline["segmenter"]["name"] == "sam-auto"
    assert sam   # the SAM benchmark's own report (its fields are tested in tests/test_sam.py)
