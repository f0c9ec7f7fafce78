"""AdamW with CLIP's weight-decay split, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from trainer.config import TrainerConfig
from trainer.model import RegionCLIP


def build_optimizer(model: RegionCLIP, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings and temperatures (CLIP's recipe)."""
    o = cfg.optim
    mask_conv = {id(p) for p in model.mask_conv.alpha.parameters()}
    decay, no_decay, mask = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in mask_conv:
            mask.append(param)
        elif param.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": mask, "weight_decay": o.weight_decay, "lr": o.lr * o.mask_conv_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to min_lr_ratio (or constant)."""
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
