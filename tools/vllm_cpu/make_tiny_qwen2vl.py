"""Create a tiny, randomly initialised Qwen2-VL model folder for offline tests.

The folder has everything vLLM and transformers need to load it with
``HF_HUB_OFFLINE=1``: config, safetensors weights, generation config, a byte-level
BPE tokenizer trained here on a small generated corpus (with Qwen2-VL's special
tokens and a chat template) and a ``Qwen2VLProcessor`` whose image processor keeps
images small (a 224x224 image becomes 112x112, i.e. 16 image tokens).

Nothing is downloaded. Output is deterministic: the corpus is fixed, BPE training
is deterministic and the weights come from a fixed seed, so two runs give
byte-identical weight and tokenizer files.

Usage: ``python make_tiny_qwen2vl.py OUT_DIR`` (``--force`` to overwrite).
It needs ``torch``, ``torchvision`` (import-able) and ``transformers``; run it with the
vLLM venv's python and the stub libraries preloaded, as ``setup.sh`` does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SEED = 0
BPE_VOCAB_SIZE = 512

# Qwen2-VL's added tokens, in the original order.
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML with Qwen2-VL's image/video placeholders; content may be a string or a list
# of OpenAI-style parts (vLLM passes images as {"type": "image"}).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image sizing: patch 14 x merge 2 = 28 px per image token. Capping the area at
# 112 * 112 keeps every image at <= 16 tokens, so prompts fit a 1024-token context.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112


def corpus() -> list[str]:
    """About a hundred short caption-like sentences plus some JSON, fixed order."""
    colours = ["red", "blue", "green", "small", "large"]
    things = ["car", "dog", "tree", "house", "person"]
    places = ["on the road", "near a wall", "in the park", "under the sky"]
    sentences = [f"A {colour} {thing} {place}." for colour, thing, place in itertools.product(colours, things, places)]
    sentences += [
        json.dumps({"tags": [thing, colour], "caption": f"a {colour} {thing}"})
        for colour, thing in itertools.product(colours, things)
    ]
    sentences += ['The quick brown fox jumps over the lazy dog. 0123456789 {}[]:,"']
    return sentences


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on :func:`corpus` and wrap it with Qwen2-VL's tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Id of each special token in ``tokenizer``."""
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int):
            raise TypeError(f"{token!r} maps to {token_id!r}, not to one id")
        ids[token] = token_id
    return ids


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    """A 2-layer Qwen2-VL config whose ids match ``tokenizer``.

    Head sizes are 32: vLLM's CPU attention backend supports only some head sizes
    (32 is the smallest), and M-RoPE sections must add up to half of it.
    """
    ids = special_token_ids(tokenizer)
    hidden = 64
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [4, 6, 6],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    """Processor with a small-image image processor and the default video processor."""
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build(out_dir: Path) -> None:
    """Write tokenizer, processor, config, generation config and weights to ``out_dir``."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer)).eval()  # float32 weights
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(tokenizer).save_pretrained(out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"tiny Qwen2-VL: {parameters:,} parameters, vocab {len(tokenizer)}, {size / 1e6:.1f} MB")


def main() -> None:
    """Build the model into a temporary folder, then move it into place."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    out_dir: Path = args.out_dir.resolve()
    if out_dir.exists() and not args.force:
        raise SystemExit(f"{out_dir} exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so an interrupted run never leaves a
    # half-written model folder behind under the final name.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".tiny-") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        build(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    print(f"saved to {out_dir}")


if __name__ == "__main__":
    main()
