"""Micro-batches: examples right-padded to the longest in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .instruction import IGNORE_INDEX, Example


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked out, so any id works)."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (1 = real token) and ``labels`` (-100 on padding), all ``[B, T]``."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    width = int(lengths.max())
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = example["input_ids"]
        labels[row, :n] = example["labels"]
    attention_mask = (torch.arange(width) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
