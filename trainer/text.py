"""Tokenizers and the optional LLM text encoder.

Tokenizers run in the data-loader workers (text → padded id tensors), so the training process
only moves tensors. Both kinds return ``{"input_ids": LongTensor[n, L]}`` (+ ``attention_mask``
for the LLM), padded on the right to the longest text of the call.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import nn


class Tokenizer(Protocol):
    """texts → padded token tensors; ``pad_id`` pads when batches are concatenated."""

    pad_id: int

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]: ...


class ClipTokenizer:
    """open_clip's tokenizer (fixed context length, truncation keeps end-of-text), trimmed."""

    pad_id = 0

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        unique = list(dict.fromkeys(texts))          # short captions repeat: tokenize each once
        rows = {text: i for i, text in enumerate(unique)}
        ids = self.tokenizer(unique).long()[[rows[t] for t in texts]] if texts else \
            torch.zeros((0, 1), dtype=torch.long)
        length = max(1, int((ids != self.pad_id).sum(1).max())) if len(texts) else 1
        return {"input_ids": ids[:, :length].contiguous()}


class HFTokenizer:
    """A transformers tokenizer from a local folder; appends EOS so last-token pooling sees it."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos = tokenizer.eos_token or ""

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        out = self.tokenizer([t + self.eos for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}


def load_llm_tokenizer(path: str, max_length: int) -> HFTokenizer:
    """The tokenizer saved with the LLM (local files only)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork
    return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), max_length)


class LLMText(nn.Module):
    """A decoder LLM as text encoder (PixCLIP): hidden states → pooling → linear projection.

    ``pooling``: ``last`` takes the final real token (the appended EOS, which has attended to the
    whole text under the causal mask); ``mean`` averages the real tokens.
    """

    def __init__(self, path: str, embed_dim: int, pooling: str = "last", freeze: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.llm = AutoModel.from_pretrained(path, local_files_only=True, config=config)
        if freeze:
            self.llm.requires_grad_(False)
        hidden = int(config.hidden_size)
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden ** -0.5)
        self.pooling = pooling
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.llm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            last = attention_mask.sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.proj(pooled)
