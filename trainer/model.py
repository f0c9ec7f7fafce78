"""RegionCLIP: an open_clip model that sees a region mask and reads long text.

Two small changes to a CLIP, each a few lines, as in the papers they come from:

* **Mask input (Alpha-CLIP / PixCLIP).** The vision tower's patch conv gets a sibling 1-channel
  conv for the mask whose output is added to the RGB patch embedding. It starts at zero, so a
  pretrained CLIP computes exactly what it did before until training moves it.
* **Long text (Long-CLIP).** The text position table is stretched past 77: the first
  ``keep_positions`` rows (well trained on short captions) are kept, the rest are linearly
  interpolated to ``context_length`` (248 by default).

The model returns normalised embeddings; losses live in ``trainer.losses`` and the loop in
``trainer.train``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from trainer.config import TrainerConfig
from trainer.text import ClipTokenizer, LLMText, Tokenizer, load_llm_tokenizer

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
# Alpha-CLIP's normalisation of the alpha channel.
MASK_MEAN, MASK_STD = 0.5, 0.26


class MaskedPatchConv(nn.Conv2d):
    """The RGB patch conv plus a zero-initialised conv for a 4th (mask) input channel.

    Keeps the original conv's parameter names (``weight``), so open_clip state dicts still load;
    the mask conv is ``alpha``. A 3-channel input skips the mask conv entirely.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        geometry: dict[str, Any] = {"kernel_size": conv.kernel_size, "stride": conv.stride,
                                    "padding": conv.padding}
        super().__init__(conv.in_channels, conv.out_channels, bias=conv.bias is not None, **geometry)
        self.load_state_dict(conv.state_dict())
        self.alpha = nn.Conv2d(1, conv.out_channels, bias=False, **geometry)
        nn.init.zeros_(self.alpha.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x[:, :3])
        if x.shape[1] > 3:
            out = out + self.alpha(x[:, 3:4].to(out.dtype))
        return out


def add_mask_input(visual: nn.Module) -> MaskedPatchConv:
    """Swap the vision tower's patch conv for a MaskedPatchConv (open_clip ViT or timm trunk)."""
    owner: Any
    patch_embed: Any = getattr(getattr(visual, "trunk", None), "patch_embed", None)
    if isinstance(getattr(visual, "conv1", None), nn.Conv2d):
        owner, attr = visual, "conv1"
    elif isinstance(getattr(patch_embed, "proj", None), nn.Conv2d):
        owner, attr = patch_embed, "proj"
    else:
        raise ValueError(f"no patch conv found in vision tower {type(visual).__name__}; "
                         "supported: open_clip VisionTransformer (conv1), timm ViT/EVA (patch_embed.proj)")
    conv = getattr(owner, attr)
    if isinstance(conv, MaskedPatchConv):
        return conv
    masked = MaskedPatchConv(conv)
    setattr(owner, attr, masked)
    return masked


def stretch_positions(table: torch.Tensor, length: int, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretch of a [n, width] position table to ``length`` rows.

    Rows ``< keep`` are copied; the others are resampled linearly (extrapolating past the last
    row). For 77 → 248 with keep 20 this is exactly Long-CLIP's 4× interpolation.
    """
    n = table.shape[0]
    if length <= n:
        return table[:length].clone()
    keep = min(keep, n - 2)
    tail, m = table[keep:], n - keep
    coords = torch.arange(length - keep, dtype=torch.float64) * m / (length - keep)
    lower = coords.floor().long().clamp(max=m - 2)
    frac = (coords - lower).unsqueeze(1).to(table.dtype)
    stretched = tail[lower] * (1 - frac) + tail[lower + 1] * frac
    return torch.cat([table[:keep], stretched]).contiguous()


class ClipText(nn.Module):
    """open_clip's CLIP text tower with a stretched position table.

    Runs on token batches trimmed to their longest row: with the causal mask and end-of-text
    pooling, trailing padding cannot change the result, and short batches cost less.
    """

    attn_mask: torch.Tensor

    def __init__(self, clip: nn.Module, context_length: int, keep: int) -> None:
        super().__init__()
        src: Any = clip.text if isinstance(getattr(clip, "text", None), nn.Module) else clip  # CustomTextCLIP
        if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
            raise ValueError("text towers with a class token or padding mask (CoCa) are not supported")
        if getattr(src, "attn_mask", None) is None:
            raise ValueError("the text tower needs a causal mask (argmax / eos pooling)")
        self.token_embedding = src.token_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.pool_type = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        self.eos_id = getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None)
        table = stretch_positions(src.positional_embedding.data, context_length, keep)
        self.positional_embedding = nn.Parameter(table)
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.context_length = context_length
        self.pad_id = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


def _pad_cat(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate token batches of different lengths (right padding)."""
    length = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for key, value in part.items():
            fill = pad_id if key == "input_ids" else 0
            out.setdefault(key, []).append(F.pad(value, (0, length - value.shape[1]), value=fill))
    return {key: torch.cat(values) for key, values in out.items()}


class RegionCLIP(nn.Module):
    """Vision tower with mask input + text tower + one learnable temperature per branch.

    ``forward(batch)`` encodes everything one training step needs in one call (one DDP forward):
    the mask-prompted whole images, the region crops, the whole images, and the three kinds of
    text; only what the enabled branches use is computed.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, visual: nn.Module, text: nn.Module, mean: list[float], std: list[float],
                 image_size: int, branches: dict[str, bool], init_log_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.text_pad_id = int(getattr(text, "pad_id", 0))
        self.mask_conv = add_mask_input(visual)
        self.image_size = image_size
        self.branches = dict(branches)
        self.max_logit_scale = max_logit_scale
        self.logit_scales = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(float(init_log_scale))) for name in ("mask", "crop", "image")
             if branches.get(name)})
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def logit_scale(self, branch: str) -> torch.Tensor:
        """exp(learnable log-scale), clamped like CLIP's."""
        return self.logit_scales[branch].exp().clamp(max=self.max_logit_scale)

    def encode_image(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [N,3,S,S] images (+ uint8 [N,1,S,S] masks, 255 = inside) → normalised [N,D]."""
        x = (images.float() / 255 - self.mean) / self.std
        if masks is not None:
            x = torch.cat([x, (masks.float() / 255 - MASK_MEAN) / MASK_STD], dim=1)
        return F.normalize(self.visual(x).float(), dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token batch (``input_ids`` [+ ``attention_mask``]) → normalised [N,D]."""
        return F.normalize(self.text(**tokens).float(), dim=-1)

    @property
    def needs(self) -> dict[str, bool]:
        """Which embeddings the enabled branches use."""
        b = self.branches
        consistency = b.get("image") and b.get("consistency")
        return {"mask": bool(b.get("mask") or consistency), "crop": bool(b.get("crop") or consistency),
                "image": bool(b.get("image")), "long": bool(b.get("mask")),
                "short": bool(b.get("crop")), "image_text": bool(b.get("image"))}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Embeddings for one batch (see trainer.data.collate for the fields)."""
        need = self.needs
        vision: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        if need["mask"]:
            vision.append(("mask", batch["images"][batch["region_image"]], batch["region_masks"]))
        if need["crop"]:
            vision.append(("crop", batch["crops"], batch["crop_masks"]))
        if need["image"]:
            full = torch.full_like(batch["images"][:, :1], 255)
            vision.append(("image", batch["images"], full))
        out: dict[str, torch.Tensor] = {}
        if vision:
            feats = self.encode_image(torch.cat([v[1] for v in vision]), torch.cat([v[2] for v in vision]))
            out.update(zip([v[0] for v in vision], feats.split([len(v[1]) for v in vision]), strict=True))
        texts = [(name, batch[key]) for name, key in
                 (("long", "long_text"), ("short", "short_text"), ("image_text", "image_text"))
                 if need[name]]
        if texts:
            feats = self.encode_text(_pad_cat([t[1] for t in texts], self.text_pad_id))
            out.update(zip([t[0] for t in texts], feats.split([len(t[1]["input_ids"]) for t in texts]),
                           strict=True))
        return out


_REGISTERED: set[Path] = set()


def _register_configs(config_file: str | None) -> None:
    """Make the bundled (and the user's) model-config JSONs known to open_clip, once each."""
    for path in [MODEL_CONFIGS] + ([Path(config_file).resolve()] if config_file else []):
        if path not in _REGISTERED:
            open_clip.add_model_config(path)
            _REGISTERED.add(path)


def _check_local(pretrained: str | None) -> None:
    """Weights only from the local disk: a hub tag or a missing path is an error, not a download."""
    if pretrained is None or pretrained.startswith("local-dir:"):
        return
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"model.pretrained: {pretrained} is not a local file; give the path "
                                "of a weights file (.safetensors, .bin, .pt, .pth) or local-dir:/folder")


def build_model(cfg: TrainerConfig) -> tuple[RegionCLIP, Tokenizer]:
    """Build the model and its tokenizer from the config (no network access)."""
    mcfg, tcfg = cfg.model, cfg.model.text
    _register_configs(mcfg.config_file)
    _check_local(mcfg.pretrained)
    if mcfg.name.startswith("local-dir:"):
        clip = open_clip.create_model(mcfg.name, pretrained_text=False)
    else:
        clip = open_clip.create_model(mcfg.name, pretrained=mcfg.pretrained, pretrained_text=False)
    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    visual = clip.visual
    if tcfg.encoder == "clip":
        text: nn.Module = ClipText(clip, tcfg.context_length, tcfg.keep_positions)
        tokenizer: Tokenizer = ClipTokenizer(open_clip.get_tokenizer(mcfg.name, context_length=tcfg.context_length))
    else:
        with torch.no_grad():
            embed_dim = int(visual(torch.zeros(1, 3, size, size)).shape[-1])
        text = LLMText(tcfg.llm_path or "", embed_dim, tcfg.pooling, tcfg.freeze)
        tokenizer = load_llm_tokenizer(tcfg.llm_path or "", tcfg.max_length)
    loss = cfg.loss
    branches = {"mask": loss.mask.enabled, "crop": loss.crop.enabled, "image": loss.image.enabled,
                "consistency": loss.image.consistency_weight > 0}
    # Fine-tuning a pretrained CLIP starts every branch at its learned temperature.
    pretrained = bool(mcfg.pretrained) or mcfg.name.startswith("local-dir:")
    init_log_scale = float(clip.logit_scale.detach().reshape(-1)[0]) if pretrained \
        else math.log(1 / loss.init_temperature)
    model = RegionCLIP(visual, text, list(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       list(pre.get("std", open_clip.OPENAI_DATASET_STD)), size, branches,
                       init_log_scale, loss.max_logit_scale)
    if mcfg.init_from:
        load_weights(model, mcfg.init_from, allow_new_temperatures=True)
    return model, tokenizer


def load_weights(model: nn.Module, path: str | Path, allow_new_temperatures: bool = False) -> None:
    """Load a trainer checkpoint (safetensors); every tensor must match.

    ``allow_new_temperatures``: a checkpoint trained with other branches on may lack (or have
    extra) per-branch temperatures; everything else must still match.
    """
    from safetensors.torch import load_model

    missing, unexpected = load_model(model, str(path), strict=False)
    if allow_new_temperatures:
        missing = [k for k in missing if not k.startswith("logit_scales.")]
        unexpected = [k for k in unexpected if not k.startswith("logit_scales.")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
