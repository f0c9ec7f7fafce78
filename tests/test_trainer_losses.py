"""Each branch's loss: values against hand computations, switches, weights and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_config
from trainer.losses import branch_losses, consistency_loss, contrastive_loss
from trainer.model import build_model
from trainer.samples import text_id


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_loss_is_clip_loss() -> None:
    a, b, scale = _unit(5), _unit(5, seed=1), torch.tensor(10.0)
    logits = scale * a @ b.T
    by_hand = 0.0
    for i in range(5):   # symmetric InfoNCE written out
        by_hand -= math.log(logits[i].softmax(0)[i]) / 10 + math.log(logits[:, i].softmax(0)[i]) / 10
    assert float(contrastive_loss(a, b, scale)) == pytest.approx(by_hand, rel=1e-5)
    distinct = torch.arange(5)
    assert float(contrastive_loss(a, b, scale, distinct)) == pytest.approx(by_hand, rel=1e-5)
    assert float(contrastive_loss(a, a, torch.tensor(100.0))) < 1e-3       # aligned pairs → ~0


def test_duplicate_texts_are_not_negatives() -> None:
    """Rows 0 and 1 carry the same caption: each counts both as positives, half weight each."""
    a, b, scale = _unit(3), _unit(3, seed=1), torch.tensor(5.0)
    groups = torch.tensor([text_id("a red circle"), text_id("a red circle"), text_id("blue")])
    logits = scale * a @ b.T
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    by_hand = (-(targets * logits.log_softmax(1)).sum(1).mean()
               - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert float(contrastive_loss(a, b, scale, groups)) == pytest.approx(float(by_hand), rel=1e-5)


def test_consistency_pulls_the_mask_view_only() -> None:
    mask = _unit(4).requires_grad_()
    crop = _unit(4, seed=1).requires_grad_()
    loss = consistency_loss(mask, crop)
    assert loss.detach().item() == pytest.approx((1 - (mask * crop).sum(1)).mean().detach().item())
    loss.backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    assert crop.grad is None                                   # the crop view is the target
    assert float(consistency_loss(crop.detach(), crop.detach())) == pytest.approx(0.0, abs=1e-6)


def _embeddings(n: int = 6, images: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    emb = {k: _unit(n if k in ("mask", "long", "crop", "short") else images, seed=i).requires_grad_()
           for i, k in enumerate(("mask", "long", "crop", "short", "image", "image_text"))}
    groups = {"long": torch.arange(n), "short": torch.arange(n), "image_text": torch.arange(images)}
    return emb, groups


@pytest.mark.parametrize("enabled", [("mask",), ("crop",), ("image",), ("mask", "crop", "image")])
def test_each_branch_is_switchable_and_weighted(enabled: tuple[str, ...]) -> None:
    weights = {"mask": 2.0, "crop": 0.5, "image": 3.0}
    cfg = load_config(None, [f"loss.{n}.enabled={str(n in enabled).lower()}" for n in weights]
                      + [f"loss.{n}.weight={w}" for n, w in weights.items()]
                      + ["loss.image.consistency_weight=0.25"]).loss
    emb, groups = _embeddings()
    scales = {name: torch.tensor(10.0, requires_grad=True) for name in weights}
    out = branch_losses(emb, groups, scales, cfg)
    terms = set(enabled) | ({"consistency"} if "image" in enabled else set())
    assert set(out) == terms | {"total"}
    expected = sum(weights[n] * out[n] for n in enabled if n != "image")
    if "image" in enabled:
        expected = expected + weights["image"] * (out["image"] + 0.25 * out["consistency"])
    assert out["total"].detach().item() == pytest.approx(expected.detach().item(), rel=1e-6)
    out["total"].backward()
    for name in weights:                           # learnable temperature: only enabled ones move
        assert (scales[name].grad is not None) == (name in enabled)
    uses = {"mask": {"mask", "long"}, "crop": {"crop", "short"}, "image": {"image", "image_text", "mask"}}
    used = set().union(*(uses[n] for n in enabled))
    for key, tensor in emb.items():
        assert (tensor.grad is not None) == (key in used), key


def test_losses_train_the_model_parts_they_should() -> None:
    """Through the real model: the mask branch sends gradient into the zero-init mask conv."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=mg-tiny", "loss.crop.enabled=false", "loss.image.enabled=false"])
    model, tokenizer = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    masks = (torch.rand(4, 1, 64, 64, generator=g) > 0.5).to(torch.uint8) * 255
    texts = ["a red circle", "a blue square", "a green ring", "a pink star"]
    batch = {"images": images, "region_image": torch.tensor([0, 0, 1, 1]), "region_masks": masks,
             "long_text": tokenizer(texts)}
    emb = model(batch)
    scales = {"mask": model.logit_scale("mask")}
    loss = branch_losses(emb, {"long": torch.tensor([text_id(t) for t in texts])}, scales, cfg.loss)
    loss["total"].backward()
    assert model.mask_conv.alpha.weight.grad.abs().sum() > 0
    assert model.logit_scales["mask"].grad is not None
    assert model.text.positional_embedding.grad is not None
