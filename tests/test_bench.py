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


def test_overhead_interleaves_its_runs_and_reports_each_repetition(monkeypatch, tmp_path: Path, capsys) -> None:
    """The loop and the pipeline run next to each other, in turn first; the figure is the fastest
    run of each side and size, and each repetition's own ratio is listed (fake walls here)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import pipeline_overhead as po

    calls: list[tuple[str, int]] = []
    slow = (1.0, 1.3, 1.1)   # how slow the pipeline's runs are in each repetition (6 runs each)

    def fake_inputs(root: Path, count: int, **_: object) -> Path:
        return root / str(count)

    def fake_baseline(manifest: Path, out: Path, threads: int | None = 1) -> float:
        size = int(manifest.name)
        calls.append(("loop" if threads == 1 else "loop-threads", size))
        return 0.5 + size * (0.010 if threads == 1 else 0.008)

    def fake_pipeline(manifest: Path, out: Path) -> tuple[float, dict]:
        size, speed = int(manifest.name), slow[len(calls) // 6]
        calls.append(("pipe", size))
        return speed * (3.0 + size * 0.014), {"counts": {"written": size}, "seconds_per_stage": {}}

    monkeypatch.setattr(po, "make_inputs", fake_inputs)
    monkeypatch.setattr(po, "baseline", fake_baseline)
    monkeypatch.setattr(po, "pipeline", fake_pipeline)
    monkeypatch.setattr(sys, "argv", ["pipeline_overhead.py", "--sizes", "100", "1000", "--repeat", "3",
                                      "--json", str(tmp_path / "o.json")])
    po.main()
    result = json.loads((tmp_path / "o.json").read_text())
    # each repetition runs both sizes, loop and pipeline side by side, the pipeline first every other time
    assert calls[:6] == [("loop", 100), ("pipe", 100), ("loop-threads", 100),
                         ("loop", 1000), ("pipe", 1000), ("loop-threads", 1000)]
    assert calls[6:8] == [("pipe", 100), ("loop", 100)] and calls[12:14] == [("loop", 100), ("pipe", 100)]
    assert len(calls) == 18
    # the fastest runs (repetition 0 here) give 14 vs 10 ms an image; each repetition's own
    # ratio follows that repetition's speed: 12.6 × 1.0, 1.3, 1.1 over 9
    assert result["marginal_pipeline_ms"] == 14.0 and result["marginal_baseline_ms"] == 10.0
    assert result["ratio"] == 1.4 and result["ratio_by_repeat"] == [1.4, 1.82, 1.54]
    assert result["ratio_median_of_repeats"] == 1.54 and result["ratio_cv2_threads"] == 1.75
    assert result["sizes"]["1000"]["runs"]["pipeline_s"][1] > result["sizes"]["1000"]["pipeline_s"]
    capsys.readouterr()
