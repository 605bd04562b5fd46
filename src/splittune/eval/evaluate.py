"""Evaluation through the same parties and channel as training (the server never sees labels in a U-shape)."""

from __future__ import annotations

import math

from ..data import TaskData
from ..parties import Client


def evaluate(client: Client, task: TaskData, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted loss over the held-out examples, its perplexity, and accuracy where the task has choices."""
    total, tokens = 0.0, 0
    examples = task.eval
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for i in range(n_batches):
        loss_sum, items, _ = client.eval_batch(task.collate(examples[i * batch_size : (i + 1) * batch_size]))
        total += loss_sum
        tokens += items
    loss = total / max(tokens, 1)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
    if task.choices is not None:
        result["accuracy"] = _accuracy(client, task, batch_size, max_batches)
    return result


def _accuracy(client: Client, task: TaskData, batch_size: int, max_batches: int | None) -> float:
    choices = task.choices
    n = len(choices) if max_batches is None else min(len(choices), max_batches * batch_size)
    correct = 0
    candidates = choices.candidates.tolist()
    for start in range(0, n, batch_size):
        b = choices.batch(start, min(start + batch_size, n), task.pad_id)
        batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
        _, _, scores = client.eval_batch(batch, score=(b["last_index"].tolist(), candidates))
        correct += int((scores.argmax(dim=-1) == b["targets"]).sum())
    return correct / max(n, 1)
