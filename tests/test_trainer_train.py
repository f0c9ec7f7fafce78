"""Training runs end to end: outputs on pipeline-built shards, resume, and DDP on two processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build
from trainer import train
from trainer.config import load_config
from trainer.model import build_model, load_weights
from trainer.report import read_metrics
from trainer.testing import write_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny-train.yaml")
# Small and quick: batches of 4 images (one hand-made shard each), stream order, one worker.
QUICK = ["data.batch_size=4", "data.workers=1", "data.shuffle_buffer=0", "data.holdout_shards=0",
         "optim.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=3"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_train_on_pipeline_shards_writes_every_output(tmp_path: Path) -> None:
    data, _ = build(tmp_path, "synthetic://12?size=96", config={
        "shards": {"samples_per_shard": 3}, "segmenter": {"name": "classical", "work_side": 96},
        "regions": {"max_total": 8}})
    out = tmp_path / "run"
    code = train.main(["--data", str(data), "--config", TINY, "--output", str(out), "--steps", "4",
                       *_sets("data.batch_size=4", "data.workers=1", "data.holdout_shards=1",
                              "train.checkpoint_every=2", "train.eval_every=2", "optim.warmup_steps=2")])
    assert code == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "loss/mask", "loss/crop", "loss/image", "loss/consistency", "lr", "grad_norm",
                "temperature/mask", "images_per_s", "regions_per_s", "skipped", "images_seen"):
        assert all(key in r for r in rows), key
    assert all(r["pixel_regions"] + r["box_regions"] > 0 for r in rows)    # both granularities used
    assert sum(r["box_regions"] for r in rows) > 0 and sum(r["pixel_regions"] for r in rows) > 0
    assert load_config(out / "config.yaml").train.steps == 4               # resolved config, loadable
    assert json.loads((out / "run.json").read_text())["world_size"] == 1
    result = json.loads((out / "eval.json").read_text())
    for name in ("region_to_text", "text_to_region"):
        r = result[name]
        assert r["chance@1"] == pytest.approx(1 / r["candidates"]) if name == "region_to_text" else r["chance@1"] > 0
        assert {"recall@1", "recall@5", "chance@5", "ratio@1"} <= set(r)
    assert result["image_to_text"]["chance@1"] == pytest.approx(1 / result["image_to_text"]["candidates"])
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    model, _ = build_model(load_config(out / "config.yaml"))
    load_weights(model, out / "model.safetensors")                       # the final weights load alone
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]


def test_bad_settings_stop_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main(["--data", str(tmp_path), "--config", TINY, "--output", str(tmp_path / "o"),
                       "--set", "data.batch_sise=4"])
    assert code == 2
    assert "data.batch_sise: unknown setting; did you mean 'batch_size'?" in capsys.readouterr().err


@pytest.fixture
def hand_shards(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards", shards=8, per_shard=4, size=64)
    return tmp_path / "shards"


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tmp_path: Path, hand_shards: Path) -> None:
    """Stop at step 3 and rerun: steps 4–6 match an uninterrupted run (weights, optimizer,
    scheduler and data position restored; consumed shards skipped)."""
    args = ["--data", str(hand_shards), "--config", TINY, "--steps", "6", *_sets(*QUICK)]
    assert train.main([*args, "--output", str(tmp_path / "straight")]) == 0
    resumed = tmp_path / "resumed"
    assert train.main([*args, "--output", str(resumed), "--stop-at-step", "3"]) == 0
    state = torch.load(resumed / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)
    assert state["step"] == 3 and len(state["data"]["consumed"]["0"]) == 3 and state["optimizer"]["state"]
    with (resumed / "metrics.jsonl").open("a") as f:       # a row written after the last checkpoint
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    assert train.main([*args, "--output", str(resumed)]) == 0
    straight, again = _losses(tmp_path / "straight"), _losses(resumed)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert again[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    lrs = [r["lr"] for r in read_metrics(resumed / "metrics.jsonl") if "lr" in r]
    assert lrs == [r["lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "lr" in r]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path, hand_shards: Path) -> None:
    """torchrun, 2 CPU processes on gloo, 4 images each = 1 process with 8 images: same curve."""
    args = ["--data", str(hand_shards), "--config", TINY, "--steps", "5", "--device", "cpu",
            *_sets(*QUICK, "data.batch_size=8", "data.workers=0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "trainer.train", *args, "--output", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "trainer.train", *args, "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5] and one[-1]["loss"] < one[0]["loss"]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        # the gradient, not only the loss: a wrong scale (e.g. DDP's averaging left as is, or the
        # temperatures' gradient counted once per process) shows here even where Adam hides it
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["images"] == a["images"] == 8
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
