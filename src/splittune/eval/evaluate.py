"""Evaluation through the same parties and channel as training (the server never sees labels in a U-shape)."""

from __future__ import annotations

import math
from typing import Callable

from ..data import TaskData
from ..parties import Client


def evaluate(client: Client, task: TaskData, batch_size: int, max_batches: int | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Token-weighted loss over the held-out examples, its perplexity, and accuracy where the task has choices.

    ``on_batch(done, total)`` is called after every batch (loss batches, then accuracy batches).
    """
    total, tokens = 0.0, 0
    examples = task.eval
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    n_choices = _choice_count(task, batch_size, max_batches)
    all_batches = n_batches + math.ceil(n_choices / batch_size)
    for i in range(n_batches):
        loss_sum, items, _ = client.eval_batch(task.collate(examples[i * batch_size : (i + 1) * batch_size]))
        total += loss_sum
        tokens += items
        if on_batch is not None:
            on_batch(i + 1, all_batches)
    loss = total / max(tokens, 1)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    if task.choices is not None:
        done = (lambda k: on_batch(n_batches + k, all_batches)) if on_batch is not None else None
        result["accuracy"] = _accuracy(client, task, batch_size, n_choices, done)
    return result


def _choice_count(task: TaskData, batch_size: int, max_batches: int | None) -> int:
    if task.choices is None:
        return 0
    return len(task.choices) if max_batches is None else min(len(task.choices), max_batches * batch_size)


def _accuracy(client: Client, task: TaskData, batch_size: int, n: int, on_batch: Callable[[int], None] | None = None) -> float:
    choices = task.choices
    correct = 0
    candidates = choices.candidates.tolist()
    for k, start in enumerate(range(0, n, batch_size)):
        b = choices.batch(start, min(start + batch_size, n), task.pad_id)
        batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
        _, _, scores = client.eval_batch(batch, score=(b["last_index"].tolist(), candidates))
        correct += int((scores.argmax(dim=-1) == b["targets"]).sum())
        if on_batch is not None:
            on_batch(k + 1)
    return correct / max(n, 1)
