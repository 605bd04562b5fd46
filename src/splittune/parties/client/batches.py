"""A step's batches as the client cuts and counts them: loss-carrying tokens, micro-batches of rows, router sums
taken as leaves."""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def leaf(sums: torch.Tensor | None) -> torch.Tensor | None:
    """Router sums from another stage of the model, as a leaf whose gradient goes back to that stage."""
    return None if sums is None else sums.detach().requires_grad_(True)


def count_items(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels after the causal shift that are not ignored."""
    return int((labels[:, 1:] != -100).sum())


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` micro-batches of consecutive rows (as even as the rows allow)."""
    if parts == 1:
        return [batch]
    rows = next(iter(batch.values())).shape[0]
    if parts > rows:
        raise ValueError(f"train.micro_batches={parts} exceeds the {rows} rows of a batch (train.batch_size)")
    sizes = [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)]
    pieces = {k: v.split(sizes) for k, v in batch.items()}
    return [{k: pieces[k][i] for k in batch} for i in range(parts)]
