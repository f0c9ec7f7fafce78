"""Proof that the shards teach something: a tiny model trained from scratch on CPU on
synthetic:// scenes (embedded default annotators) retrieves held-out regions' texts well above
chance, and turning the mask branch off costs most of that."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import build
from trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--steps", "40", "--set", "data.batch_size=16", "--set", "optim.warmup_steps=8",
         "--set", "data.holdout_shards=2", "--set", "train.log_every=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 scenes at 96 px, 10 shards of ~16 (2 held out: ~30 images, ~120 regions)."""
    out, _ = build(tmp_path_factory.mktemp("synthetic"), "synthetic://160?size=96", config={
        "shards": {"samples_per_shard": 16}, "regions": {"max_total": 12, "min_area_frac": 0.01},
        "segmenter": {"name": "classical", "work_side": 96}}, extra=["--workers", "2"])
    assert len(list((out / "shards").glob("*.tar"))) >= 8
    return out


def _train(shards: Path, out: Path, *extra: str) -> dict:
    args = ["--data", str(shards), "--config", str(ROOT / "configs" / "tiny-train.yaml"),
            "--output", str(out), *STEPS, *extra]
    assert train.main(args) == 0
    return json.loads((out / "eval.json").read_text())


def test_region_text_retrieval_beats_chance_and_needs_the_mask_branch(shards: Path, tmp_path: Path) -> None:
    full = _train(shards, tmp_path / "full")
    r = full["region_to_text"]
    print("full:", json.dumps({k: full[k] for k in ("region_to_text", "text_to_region", "image_to_text")}))
    assert r["candidates"] >= 50
    assert r["ratio@1"] >= 3.0, r
    assert full["text_to_region"]["ratio@1"] >= 3.0
    assert (tmp_path / "full" / "loss_curve.png").exists()

    ablated = _train(shards, tmp_path / "no-mask", "--set", "loss.mask.enabled=false")
    a = ablated["region_to_text"]
    print("without the mask branch:", json.dumps(a))
    assert a["candidates"] == r["candidates"]
    assert a["recall@1"] < 0.75 * r["recall@1"], (a, r)
