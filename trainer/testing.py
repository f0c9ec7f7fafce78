"""Tiny inputs for tests and smoke runs: hand-made shards and a random local LLM.

``write_shards`` writes WebDataset shards in the pipeline's record format directly (a coloured
rectangle per region, one box-level region per image), so loader tests do not need a build.
``tiny_llm`` saves a 2-layer random decoder and a word-level tokenizer to a folder, the way a
user's local model folder looks; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from schemas import SCHEMA_VERSION, provenance_id

SEG = provenance_id("segmenter", {"name": "test"})
CAP = provenance_id("captioner", {"name": "test"})
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40)}


def _rle(mask: np.ndarray) -> dict[str, Any]:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}


def make_sample(key: str, rng: np.random.Generator, size: int = 48, n_masks: int = 3) -> dict[str, Any]:
    """One sample dict ``{__key__, png, json}`` with ``n_masks`` pixel regions and one box region."""
    image = np.full((size, size, 3), 128, np.uint8)
    regions: list[dict[str, Any]] = []
    for i in range(n_masks):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        mask = np.zeros((size, size), bool)
        mask[y0:y0 + h, x0:x0 + w] = True
        image[mask] = COLOURS[colour]
        caption = f"a {colour} rectangle number {i} of {key}"
        regions.append({"id": f"p{i}", "level": "pixel", "parent": None, "bbox": [x0, y0, w, h],
                        "area": float(mask.sum()), "mask": _rle(mask), "scores": {},
                        "caption": caption, "long_caption": f"A {colour} rectangle at {x0},{y0}. {caption}.",
                        "tags": [colour], "provenance": {"segmenter": SEG, "captioner": CAP}})
    regions.insert(0, {"id": "r0", "level": "region", "parent": None, "bbox": [0, 0, size // 2, size // 2],
                       "area": float(size * size // 4), "mask": None, "scores": {},
                       "caption": f"the top left quarter of {key}",
                       "long_caption": f"The top left quarter of image {key}.", "tags": ["quarter"],
                       "provenance": {"segmenter": SEG, "captioner": CAP}})
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    record = {"schema_version": SCHEMA_VERSION, "key": key, "source": {"uri": f"test://{key}", "sha256": "0" * 64},
              "image": {"width": size, "height": size, "format": "png"},
              "image_level": {"caption": f"image {key}", "long_caption": f"A test image called {key}.",
                              "tags": ["test"], "provenance": CAP},
              "regions": regions, "provenance": {"pipeline_version": "test", "settings_hash": "test",
                                                "annotators": {SEG: {"name": "test"}, CAP: {"name": "test"}}}}
    return {"__key__": key, "png": buf.getvalue(), "json": json.dumps(record).encode()}


def write_shards(root: Path, shards: int, per_shard: int, seed: int = 0, size: int = 48,
                 extra: dict[int, list[dict[str, Any]]] | None = None, prefix: str = "s") -> list[Path]:
    """``shards`` tars of ``per_shard`` samples each (+ ``extra[i]`` raw samples in shard i).

    Keys are ``{prefix}{shard:03d}-{index:04d}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = root / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                sink.write(make_sample(f"{prefix}{s:03d}-{i:04d}", rng, size))
            for sample in (extra or {}).get(s, []):
                sink.write(sample)
        paths.append(path)
    return paths


def tiny_llm(path: Path, sentences: list[str] | None = None) -> Path:
    """Save a random 2-layer Qwen2 decoder and a word-level tokenizer to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    words = sentences or ["a red green blue yellow rectangle circle region image of at the top left",
                          "number quarter test called the image A rectangle at"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(words * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    Qwen2Model(config).save_pretrained(path)
    return path
