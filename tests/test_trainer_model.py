"""RegionCLIP model: inert mask input at init, Long-CLIP position stretch, text towers."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from trainer.config import load_config
from trainer.model import MaskedPatchConv, _register_configs, build_model, stretch_positions
from trainer.testing import tiny_llm


def _tiny(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.name=mg-tiny", *overrides]))


def _images(n: int = 3, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = (torch.rand((n, 1, size, size), generator=g) > 0.5).to(torch.uint8) * 255
    return images, masks


def test_mask_input_is_inert_at_init_and_active_after_a_step() -> None:
    model, _ = _tiny()
    images, masks = _images()
    plain = model.encode_image(images)
    assert isinstance(model.visual.conv1, MaskedPatchConv)
    assert torch.equal(model.encode_image(images, masks), plain)
    assert torch.equal(model.encode_image(images, torch.zeros_like(masks)), plain)
    with torch.no_grad():                       # once the mask conv has moved, the mask matters
        model.mask_conv.alpha.weight.normal_(std=0.1)
    assert not torch.allclose(model.encode_image(images, masks), plain)


def test_mask_conv_keeps_the_pretrained_patch_weights() -> None:
    """The wrapped conv has the original conv's weights and names (open_clip checkpoints load)."""
    _register_configs(None)
    torch.manual_seed(0)
    clip = open_clip.create_model("mg-tiny")
    original = clip.visual.conv1.weight.detach().clone()
    torch.manual_seed(0)
    model, _ = _tiny()
    assert torch.equal(model.visual.conv1.weight, original)
    keys = set(model.state_dict())
    assert {"visual.conv1.weight", "visual.conv1.alpha.weight"} <= keys


def _longclip_reference(table: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's own loop (model/longclip.py), transcribed: 77 → 4·77 − 3·keep rows."""
    length, width = table.shape
    new = torch.zeros(4 * length - 3 * keep, width)
    for i in range(keep):
        new[i] = table[i]
    for i in range(length - 1 - keep):
        for j in range(4):
            new[4 * i + j + keep] = table[i + keep] * (4 - j) / 4 + table[i + 1 + keep] * j / 4
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = table[length - 1] + j * (table[length - 1] - table[length - 2]) / 4
    return new


def test_stretch_matches_longclip() -> None:
    table = torch.randn(77, 16)
    stretched = stretch_positions(table, 248, keep=20)
    assert stretched.shape == (248, 16)
    assert torch.equal(stretched[:20], table[:20])
    torch.testing.assert_close(stretched, _longclip_reference(table), rtol=1e-5, atol=1e-6)
    assert torch.equal(stretch_positions(table, 77), table)


def test_text_tower_reads_past_77_tokens() -> None:
    model, tokenizer = _tiny()
    assert model.text.positional_embedding.shape[0] == 248
    head = " ".join(["red"] * 100)
    a, b = tokenizer([head + " circle", head + " square"])["input_ids"]
    assert a.shape[0] > 77                     # the tokens that differ lie past position 77
    emb = model.encode_text(tokenizer([head + " circle", head + " square"]))
    assert not torch.allclose(emb[0], emb[1])


def test_clip_text_equals_open_clip_without_stretch_and_ignores_padding() -> None:
    _register_configs(None)
    torch.manual_seed(0)
    clip = open_clip.create_model("mg-tiny")
    torch.manual_seed(0)
    model, tokenizer = _tiny("model.text.context_length=77")
    full = open_clip.get_tokenizer("mg-tiny")(["a small red circle", "a very large blue square at the top"])
    expected = clip.encode_text(full, normalize=True)
    torch.testing.assert_close(model.encode_text({"input_ids": full}), expected)
    trimmed = tokenizer(["a small red circle", "a very large blue square at the top"])
    assert trimmed["input_ids"].shape[1] < 77
    torch.testing.assert_close(model.encode_text(trimmed), expected, rtol=1e-5, atol=1e-5)


def test_branch_switches_decide_what_is_computed() -> None:
    model, tokenizer = _tiny("loss.crop.enabled=false", "loss.image.consistency_weight=0")
    images, masks = _images(2)
    batch = {"images": images, "region_image": torch.tensor([0, 1]), "region_masks": masks,
             "crops": images, "crop_masks": masks, "long_text": tokenizer(["a", "b"]),
             "short_text": tokenizer(["a", "b"]), "image_text": tokenizer(["c", "d"])}
    out = model(batch)
    assert set(out) == {"mask", "long", "image", "image_text"}
    assert set(model.logit_scales) == {"mask", "image"}
    assert all(torch.allclose(v.norm(dim=-1), torch.ones(len(v))) for v in out.values())


def test_llm_text_encoder_switch(tmp_path: Path) -> None:
    path = tiny_llm(tmp_path / "llm")
    for pooling in ("last", "mean"):
        model, tokenizer = _tiny("model.text.encoder=llm", f"model.text.llm_path={path}",
                                 f"model.text.pooling={pooling}")
        tokens = tokenizer(["a red rectangle", "the top left quarter of image test"])
        eos = tokenizer.tokenizer.eos_token_id
        assert tokens["input_ids"][1, -1] == eos                    # EOS closes every text
        assert tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum()   # padded right
        emb = model.encode_text(tokens)
        assert emb.shape == (2, 64)
        emb.sum().backward()
        assert model.text.proj.weight.grad is not None
        assert any(p.grad is not None for p in model.text.llm.parameters())
    frozen, _ = _tiny("model.text.encoder=llm", f"model.text.llm_path={path}", "model.text.freeze=true")
    assert not any(p.requires_grad for p in frozen.text.llm.parameters())


def test_pretrained_must_be_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a local file"):
        _tiny("model.pretrained=openai")
    # An open_clip state dict saved to disk loads (the documented format), mask conv still zero.
    _register_configs(None)
    torch.manual_seed(3)
    clip = open_clip.create_model("mg-tiny")
    with torch.no_grad():
        clip.logit_scale.fill_(4.0)
    torch.save(clip.state_dict(), tmp_path / "weights.pt")
    model, _ = _tiny(f"model.pretrained={tmp_path / 'weights.pt'}")
    assert torch.equal(model.visual.conv1.weight, clip.visual.conv1.weight)
    assert not model.mask_conv.alpha.weight.any()
    assert all(float(v.detach()) == 4.0 for v in model.logit_scales.values())   # its learned temperature


def test_timm_vision_tower_and_custom_text_clip(tmp_path: Path) -> None:
    """EVA-style configs: a timm trunk (mask conv beside patch_embed.proj) and CustomTextCLIP."""
    config = {"embed_dim": 64, "custom_text": True,
              "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                             "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (tmp_path / "mg-timm-test.json").write_text(json.dumps(config))
    model, tokenizer = _tiny("model.name=mg-timm-test", f"model.config_file={tmp_path / 'mg-timm-test.json'}")
    assert isinstance(model.visual.trunk.patch_embed.proj, MaskedPatchConv)
    images, masks = _images(2, size=224)
    assert torch.equal(model.encode_image(images, masks), model.encode_image(images))
    assert model.text.positional_embedding.shape[0] == 248
    assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 64)
