"""Retrieval metrics: recall against distinct texts, and exact chance levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.evaluate import metrics, retrieval


def _embedded(texts: list[str], noise: float = 0.0) -> dict:
    """Region embeddings equal to their text's embedding (+ noise): a perfect model at noise 0."""
    vocab = sorted(set(texts))
    basis = torch.eye(8)[: len(vocab)]
    text_emb = torch.stack([basis[vocab.index(t)] for t in texts])
    region_emb = F.normalize(text_emb + noise * torch.randn_like(text_emb), dim=-1)
    images = ["image one", "image two"]
    return {"emb": {"mask": region_emb, "long": text_emb, "crop": region_emb, "short": text_emb,
                    "image": torch.eye(8)[:2], "image_text": torch.eye(8)[:2]},
            "texts": {"long": texts, "short": texts, "image_text": images}, "errors": {}}


def test_perfect_embeddings_with_duplicate_texts() -> None:
    out = metrics(_embedded(["a red circle", "a red circle", "a blue square", "a green star"]))
    r2t, t2r = out["region_to_text"], out["text_to_region"]
    assert r2t["candidates"] == 3 and r2t["queries"] == 4         # one candidate per distinct text
    assert r2t["recall@1"] == 1.0 and r2t["chance@1"] == pytest.approx(1 / 3)
    assert r2t["chance@5"] == 1.0                                  # k capped at the candidates
    assert t2r["queries"] == 3 and t2r["candidates"] == 4
    assert t2r["recall@1"] == 1.0
    # "a red circle" has 2 of 4 regions: chance 2/4; the others 1/4 each
    assert t2r["chance@1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert out["image_to_text"]["recall@1"] == 1.0 and out["image_to_text"]["chance@1"] == 0.5
    assert r2t["ratio@1"] == pytest.approx(3.0)


def test_recall_counts_only_correct_candidates_in_the_top_k() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    correct = torch.tensor([[True, False, False], [False, False, True], [False, True, False]])
    out = retrieval(queries, candidates, correct, ks=(1, 2))
    assert out["recall@1"] == pytest.approx(2 / 3)               # the third query ranks #2 first
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(1 / 3) and out["chance@2"] == pytest.approx(2 / 3)
