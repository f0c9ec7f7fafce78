"""`captioner: none`: masks now, captions later."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import validate
from schemas import image_provenance
from tests.conftest import build, records


@pytest.mark.slow
def test_records_keep_masks_with_empty_texts_flagged_uncaptioned(tmp_path: Path, fast_config: dict) -> None:
    out, manifest = build(tmp_path, "synthetic://3?size=96", config=dict(fast_config, captioner={"name": "none"}))
    assert validate.validate(str(out)).ok and manifest["counts"]["written"] == 3
    assert manifest["annotators"]["captioner"]["captioned"] is False
    got = records(out)
    regions = [r for rec in got.values() for r in rec["regions"]]
    assert any(r["mask"] for r in regions)
    for rec in got.values():
        texts = [rec["image_level"]] + rec["regions"]
        assert all(t["caption"] == "" and t["long_caption"] == "" and t["tags"] == [] for t in texts)
        assert image_provenance(rec)["captioned"] is False
    assert manifest["seconds_per_stage"]["render_prompts"] == 0   # nothing asked for prompts
