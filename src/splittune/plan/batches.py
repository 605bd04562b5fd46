"""The batches a run draws, as shapes: what crosses the cut depends on them (padding removal sends only
the kept positions; a batch is as wide as its longest row), and so does the compute.

Without data the planner assumes packed text, every row ``seq_len`` real tokens (what ``causal_lm``
packing gives); with a data source it draws the run's own first batches (same seed, same sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RunConfig


@dataclass(frozen=True)
class Batch:
    """One drawn batch: its width (padded length), and per row the positions that cross and the labels."""

    width: int
    kept: tuple[int, ...]
    labelled: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.kept)


@dataclass(frozen=True)
class Micro:
    """One micro-batch: ``rows`` rows of ``width`` positions, ``kept`` of which cross the cut."""

    rows: int
    width: int
    kept: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def full_batches(batch: int, seq_len: int) -> list[Batch]:
    return [Batch(seq_len, (seq_len,) * batch, (seq_len - 1,) * batch)]


def data_batches(cfg: RunConfig, count: int) -> tuple[list[Batch], int]:
    """The first ``count`` batches the run of ``cfg`` trains on (client 0's), as shapes, and the tokens of its
    largest evaluation batch (rows × width: an evaluation runs whole batches)."""
    from ..cut.transforms import needed_positions
    from ..data import build_client_tasks
    from ..models.zoo import resolve_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        task = build_client_tasks(cfg, resolve_model(cfg.model).tokenizer())[0]
    rows = cfg.train.batch_size
    sampler = iter(task.sampler(rows, cfg.seed))
    out = []
    for _ in range(count):
        b = task.collate([task.train[k] for k in next(sampler)])
        keep = needed_positions(b["attention_mask"], b["labels"])
        out.append(Batch(int(b["input_ids"].shape[1]), tuple(int(k) for k in keep.sum(1)),
                         tuple(int(n) for n in (b["labels"][:, 1:] != -100).sum(1))))
    evals = min(-(-len(task.eval) // rows), cfg.train.eval_batches or 1 << 30)
    widths = [int(task.collate(task.eval[i * rows:(i + 1) * rows])["input_ids"].numel()) for i in range(evals)]
    return out, max(widths, default=rows * cfg.train.seq_len)


def split(batch: Batch, parts: int) -> list[Micro]:
    """``batch`` cut into ``parts`` micro-batches of consecutive rows, as the client cuts it (``split_rows``)."""
    rows = batch.rows
    if parts > rows:
        raise ValueError(f"train.micro_batches={parts} exceeds the {rows} rows of a batch (train.batch_size)")
    sizes = [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)]
    out, at = [], 0
    for size in sizes:
        out.append(Micro(size, batch.width, sum(batch.kept[at:at + size])))
        at += size
    return out
