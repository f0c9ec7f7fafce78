"""Held-out retrieval: region ↔ text, image → text, crop → caption, each against chance.

Candidates are the distinct texts of the held-out set (two regions with the same caption share
one candidate, and retrieving it counts for both). Chance at k is what a random ranking scores:
k / candidates for one correct candidate; for text → region, where a text can belong to m of
the N regions, 1 − C(N−m, k) / C(N, k).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from trainer.model import RegionCLIP


def _distinct(texts: list[str]) -> tuple[list[int], torch.Tensor]:
    """(row of each distinct text's first occurrence, bool [len(texts), distinct]: text i is j)."""
    index: dict[str, int] = {}
    first: list[int] = []
    target = []
    for i, text in enumerate(texts):
        if text not in index:
            index[text] = len(first)
            first.append(i)
        target.append(index[text])
    return first, torch.tensor(target)[:, None] == torch.arange(len(first))[None, :]


def _recall(scores: torch.Tensor, correct: torch.Tensor, k: int) -> float:
    """Share of query rows whose top-k columns contain a correct one (``correct`` bool [Q, C])."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float(correct.gather(1, top).any(1).float().mean())


def _chance(n: int, m: torch.Tensor, k: int) -> float:
    """Expected recall@k of a random ranking of n candidates, m of them correct (per query)."""
    k = min(k, n)
    values = [1 - math.comb(n - int(mi), k) / math.comb(n, k) for mi in m.tolist()]
    return sum(values) / max(len(values), 1)


def retrieval(queries: torch.Tensor, candidates: torch.Tensor, correct: torch.Tensor,
              ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """recall@k and chance@k (and their ratio at 1) of queries against candidates."""
    scores = queries @ candidates.T
    out: dict[str, float] = {"queries": queries.shape[0], "candidates": candidates.shape[0]}
    per_query = correct.sum(1)
    for k in ks:
        out[f"recall@{k}"] = _recall(scores, correct, k)
        out[f"chance@{k}"] = _chance(candidates.shape[0], per_query, k)
    out["ratio@1"] = out["recall@1"] / out["chance@1"] if out["chance@1"] else float("nan")
    return out


@torch.no_grad()
def embed(model: RegionCLIP, batches: Iterable[dict[str, Any]], to_device: Callable[[Any], Any],
          autocast: AbstractContextManager | None = None) -> dict[str, Any]:
    """Embeddings of every held-out image, region, crop and text."""
    acc: dict[str, list[Any]] = {k: [] for k in ("mask", "crop", "image", "long", "short", "image_text")}
    texts: dict[str, list[str]] = {"long": [], "short": [], "image_text": []}
    errors: dict[int, dict[str, int]] = {}
    for batch in batches:
        errors[batch["worker"]] = batch["errors"]
        if not batch["keys"]:
            continue
        b = to_device(batch)
        with autocast or nullcontext():
            if len(b["region_image"]):
                acc["mask"].append(model.encode_image(b["images"][b["region_image"]], b["region_masks"]))
                acc["crop"].append(model.encode_image(b["crops"], b["crop_masks"]))
                acc["long"].append(model.encode_text(b["long_text"]))
                acc["short"].append(model.encode_text(b["short_text"]))
            acc["image"].append(model.encode_image(b["images"], torch.full_like(b["images"][:, :1], 255)))
            acc["image_text"].append(model.encode_text(b["image_text"]))
        for key in texts:
            texts[key].extend(batch["texts"][key])
    emb = {k: torch.cat(v).float().cpu() if v else torch.zeros(0) for k, v in acc.items()}
    skipped: dict[str, int] = {}
    for counts in errors.values():
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"emb": emb, "texts": texts, "errors": skipped}


def metrics(embedded: dict[str, Any]) -> dict[str, Any]:
    """All retrieval figures from ``embed``'s output."""
    emb, texts = embedded["emb"], embedded["texts"]
    out: dict[str, Any] = {"images": len(texts["image_text"]), "regions": len(texts["long"]),
                           "skipped": embedded["errors"]}
    if texts["long"]:
        keep, correct = _distinct(texts["long"])
        out["region_to_text"] = retrieval(emb["mask"], emb["long"][keep], correct)
        out["text_to_region"] = retrieval(emb["long"][keep], emb["mask"], correct.T.contiguous())
        keep, correct = _distinct(texts["short"])
        out["crop_to_caption"] = retrieval(emb["crop"], emb["short"][keep], correct, ks=(1,))
    if texts["image_text"]:
        keep, correct = _distinct(texts["image_text"])
        out["image_to_text"] = retrieval(emb["image"], emb["image_text"][keep], correct, ks=(1,))
    return out


def evaluate(model: RegionCLIP, batches: Iterable[dict[str, Any]], to_device: Callable[[Any], Any],
             autocast: AbstractContextManager | None = None) -> dict[str, Any]:
    """Embed the held-out set and score it (model put in eval mode for the duration)."""
    was_training = model.training
    model.eval()
    try:
        return metrics(embed(model, batches, to_device, autocast))
    finally:
        model.train(was_training)
