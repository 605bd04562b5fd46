"""Causal language modelling on raw text: documents packed into fixed blocks of ``seq_len`` tokens.

Each document becomes ``[prefix] + tokens + [eos]`` (``prefix`` is what the tokenizer puts before a text,
e.g. BOS; often nothing). Documents are concatenated and cut into full blocks; the last partial block is
dropped, so every example has the same length and no padding. Labels equal the inputs: the model shifts
them itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import DataError

Example = dict[str, torch.Tensor]


def pack(
    documents: Sequence[Sequence[int] | np.ndarray], seq_len: int, eos_id: int, prefix: Sequence[int] = ()
) -> tuple[list[Example], int]:
    """Blocks of ``seq_len`` tokens from tokenized documents, and the number of tokens left over."""
    pieces: list[np.ndarray] = []
    head = np.asarray(prefix, dtype=np.int64)
    tail = np.asarray([eos_id], dtype=np.int64)
    for ids in documents:
        pieces += [head, np.asarray(ids, dtype=np.int64), tail]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_blocks = len(stream) // seq_len
    blocks = torch.from_numpy(stream[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy())
    labels = blocks.clone()
    examples = [{"input_ids": ids, "labels": lab} for ids, lab in zip(blocks.unbind(0), labels.unbind(0), strict=True)]
    return examples, len(stream) - n_blocks * seq_len


def require_blocks(examples: list[Example], part: str, tokens: int, seq_len: int) -> None:
    if not examples:
        raise DataError(
            f"the {part} documents hold {tokens} tokens, fewer than one block of seq_len={seq_len}; "
            "use more text, a larger data.eval_fraction or a smaller train.seq_len"
        )
