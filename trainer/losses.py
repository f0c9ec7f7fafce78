"""The three branch losses and the local–global consistency term.

All take embeddings already gathered over processes (``trainer.distributed.gather``): every
process computes the loss of the whole global batch, so the value — and, after DDP's gradient
averaging of ``loss × world_size`` — the gradient equal those of one process with that batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import LossConfig


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (normalised embeddings).

    ``groups``: one id per row (the text's id); rows with the same id share their positives, so
    two regions with the same caption are not pushed apart as negatives. With all ids distinct
    this is CLIP's loss.
    """
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    logits = logit_scale * a @ b.T
    if groups is None:
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    positives = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = positives / positives.sum(1, keepdim=True)   # symmetric, so rows = columns
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def consistency_loss(mask_emb: torch.Tensor, crop_emb: torch.Tensor) -> torch.Tensor:
    """1 − cos between each mask-prompted embedding and its region's crop embedding.

    The crop side is a target (no gradient): the global view with a mask learns to see what
    the local view sees, not the other way round.
    """
    if mask_emb.shape[0] == 0:
        return mask_emb.sum() * 0.0
    return (1 - (mask_emb * crop_emb.detach()).sum(-1)).mean()


def branch_losses(emb: dict[str, torch.Tensor], groups: dict[str, torch.Tensor],
                  scales: dict[str, torch.Tensor], cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Each enabled term and the weighted ``total``.

    total = w_mask·L_mask + w_crop·L_crop + w_image·(L_image + λ·L_consistency)
    """
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=next(iter(emb.values())).device)
    if cfg.mask.enabled:
        out["mask"] = contrastive_loss(emb["mask"], emb["long"], scales["mask"], groups["long"])
        total = total + cfg.mask.weight * out["mask"]
    if cfg.crop.enabled:
        out["crop"] = contrastive_loss(emb["crop"], emb["short"], scales["crop"], groups["short"])
        total = total + cfg.crop.weight * out["crop"]
    if cfg.image.enabled:
        out["image"] = contrastive_loss(emb["image"], emb["image_text"], scales["image"],
                                        groups["image_text"])
        image_term = out["image"]
        if cfg.image.consistency_weight > 0:
            out["consistency"] = consistency_loss(emb["mask"], emb["crop"])
            image_term = image_term + cfg.image.consistency_weight * out["consistency"]
        total = total + cfg.image.weight * image_term
    out["total"] = total
    return out
