"""The consistency filter in the pipeline: scores kept, regions below the threshold dropped (a
counted failure) or flagged, nothing lost; a recaption adds the filter without asking the captioner."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import recaption, validate
from settings import ConfigError
from tests.conftest import build, records
from tests.test_consistency import _trainer_checkpoint

pytestmark = pytest.mark.slow
INPUT = "synthetic://3?size=96"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trainer_checkpoint(tmp_path_factory.mktemp("ckpt"), alpha_std=0.5)


def _config(checkpoint: Path, **consistency: Any) -> dict[str, Any]:
    return {"regions": {"max_regions": 3}, "shards": {"samples_per_shard": 2},
            "consistency": {"model": "trainer", "checkpoint": str(checkpoint), **consistency}}


def _scores(out: Path) -> dict[tuple[str, str], float]:
    return {(key, r["id"]): r["scores"]["consistency"] for key, rec in records(out).items()
            for r in rec["regions"]}


def test_scores_then_drop_or_flag_below_the_threshold(tmp_path: Path, checkpoint: Path) -> None:
    scored, manifest = build(tmp_path, INPUT, "scored", config=_config(checkpoint))
    assert validate.validate(str(scored)).ok
    scores = _scores(scored)
    assert len(scores) > 10 and len(set(scores.values())) > 1
    assert all(-1.0 <= s <= 1.0 for s in scores.values())
    index = pq.read_table(scored / "index" / "regions").to_pylist()
    assert {(r["key"], r["region_id"]): r["consistency"] for r in index} == pytest.approx(scores, abs=1e-6)
    assert all(r["consistency_flagged"] is None for r in index)           # no threshold, no flag
    assert manifest["annotators"]["consistency"]["model"] == "trainer"
    assert manifest["cost"]["stages"]["consistency"]["cpu_s"] > 0

    threshold = sorted(scores.values())[len(scores) // 2]
    below = {k for k, s in scores.items() if s < threshold}
    assert 0 < len(below) < len(scores)

    dropped, manifest = build(tmp_path, INPUT, "dropped", config=_config(checkpoint, threshold=threshold))
    assert validate.validate(str(dropped)).ok
    kept = _scores(dropped)
    assert set(kept) == set(scores) - below
    assert kept == pytest.approx({k: scores[k] for k in kept}, abs=1e-6)
    failures = pq.read_table(dropped / "failures").to_pylist()
    rows = {(f["key"], f["region_id"]) for f in failures if f["reason"] == "inconsistent_text"}
    assert rows == below
    assert all(f["stage"] == "consistency" and f["class"] == "permanent" and "threshold" in f["detail"]
               for f in failures if f["reason"] == "inconsistent_text")
    assert manifest["counts"]["region_failures_by_reason"]["consistency/inconsistent_text"] == len(below)
    for record in records(dropped).values():   # children of a dropped region moved up to a kept one
        ids = {r["id"] for r in record["regions"]}
        assert all(r["parent"] is None or r["parent"] in ids for r in record["regions"])

    flagged, _ = build(tmp_path, INPUT, "flagged",
                       config=_config(checkpoint, threshold=threshold, action="flag"))
    assert validate.validate(str(flagged)).ok
    index = pq.read_table(flagged / "index" / "regions").to_pylist()
    assert {(r["key"], r["region_id"]) for r in index if r["consistency_flagged"]} == below
    assert len(index) == len(scores)


def test_recaption_adds_the_filter_without_asking_the_captioner(tmp_path: Path, checkpoint: Path) -> None:
    plain, _ = build(tmp_path, INPUT, "plain", config={"regions": {"max_regions": 3},
                                                      "shards": {"samples_per_shard": 2}})
    cfg = tmp_path / "with-filter.yaml"
    cfg.write_text(yaml.safe_dump(_config(checkpoint, threshold=-1.0, action="flag")))
    out = tmp_path / "filtered"
    report = recaption.run(["--from", str(plain), "--config", str(cfg), "--output", str(out)])
    assert validate.validate(str(out)).ok
    counts = report["counts"]
    assert counts["regions_recomputed"] == counts["regions_partly_reused"] == 0 < counts["regions_carried"]
    old, new = records(plain), records(out)
    for key, record in new.items():
        for region, before in zip(record["regions"], old[key]["regions"], strict=True):
            assert region["scores"]["consistency_flag"] == 0.0 and "consistency" in region["scores"]
            assert {k: v for k, v in region.items() if k != "scores"} == \
                {k: v for k, v in before.items() if k != "scores"}


def test_bad_filter_settings_stop_before_any_work(tmp_path: Path, checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from pipelines.config import config_from_dict

    with pytest.raises(ConfigError, match="consistency.checkpoint"):
        config_from_dict(_config(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="consistency.action"):
        config_from_dict(_config(checkpoint, action="delete"))
    with pytest.raises(ConfigError, match="consistency: expected a mapping"):
        config_from_dict({"consistency": "yes"})
    assert json.dumps(config_from_dict(_config(checkpoint)).hashed_settings()["consistency"])
    # an install without the train extra is told what to install, before any work
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(ConfigError, match=r"consistency.model: the consistency filter needs open_clip: "
                                          r"install the project's 'train' extra"):
        config_from_dict(_config(checkpoint))
