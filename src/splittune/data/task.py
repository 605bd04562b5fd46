"""From a data config and a tokenizer to training and evaluation examples: the one entry point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..config import DataConfig, warn
from .builtin import SENTIMENT_LABELS
from .causal_lm import pack, require_blocks
from .choices import ChoiceEval, build_choice_eval
from .collate import collate, pad_token_id
from .errors import DataError
from .instruction import DEFAULT_LABEL_PROMPT, Example, InstructionFormat, build_examples
from .records import Record, record_kind
from .sampler import ResumableBatchSampler
from .sources import load_records
from .split import cap, split_indices
from .tokens import encode, encode_cached, special_prefix

TaskKind = Literal["causal_lm", "instruction"]

# How labelled records of a source are framed, and the order of its label words (candidate index order).
LABEL_PROMPTS = {"builtin:sentiment": "Review: {text}\nSentiment:"}
LABEL_WORDS = {"builtin:sentiment": SENTIMENT_LABELS}


@dataclass
class TaskData:
    """Tokenized examples ready for batching (each a dict of 1-D long ``input_ids`` and ``labels``)."""

    kind: TaskKind
    train: list[Example]
    eval: list[Example]
    pad_id: int
    choices: ChoiceEval | None = None  # label-word scoring of ``eval``, for labelled data
    stats: dict[str, Any] = field(default_factory=dict)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def sampler(self, batch_size: int, seed: int) -> ResumableBatchSampler:
        return ResumableBatchSampler(len(self.train), batch_size, seed)


def resolve_kind(task: str, records: Sequence[Record]) -> TaskKind:
    """``auto`` → instruction for prompt/response, chat or labelled records, causal_lm for raw text."""
    kinds = {record_kind(r) for r in records}
    if task not in ("auto", "causal_lm", "instruction"):
        raise DataError(f"unknown task {task!r}; allowed: auto, causal_lm, instruction")
    if task == "auto":
        if "text" in kinds and len(kinds) > 1:
            raise DataError(
                f"the source mixes raw text with {sorted(kinds - {'text'})} records; use one kind per source"
            )
        return "causal_lm" if kinds == {"text"} else "instruction"
    if task == "instruction" and "text" in kinds:
        raise DataError(
            "task 'instruction' needs prompt/response, messages or text+label records; "
            "this source has raw text (use task: causal_lm)"
        )
    if task == "causal_lm" and kinds - {"text", "labelled"}:
        raise DataError(
            f"task 'causal_lm' needs raw text; this source has {sorted(kinds - {'text', 'labelled'})} records "
            "(use task: instruction)"
        )
    return task  # type: ignore[return-value]


def _causal_lm(
    records: Sequence[Record], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> TaskData:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token: packed documents need one between them")
    texts = [r["text"] for r in records]
    train_idx, eval_idx = split_indices(len(texts), cfg.eval_fraction, seed, "documents")
    if cfg.source.startswith("builtin:"):  # public text: safe to cache its tokens
        ids = encode_cached(tokenizer, texts, cfg.source.removeprefix("builtin:"))
    else:
        ids = encode(tokenizer, texts)
    prefix = special_prefix(tokenizer)
    train, train_left = pack([ids[i] for i in train_idx], seq_len, tokenizer.eos_token_id, prefix)
    eval_, eval_left = pack([ids[i] for i in eval_idx], seq_len, tokenizer.eos_token_id, prefix)
    require_blocks(train, "training", train_left, seq_len)
    require_blocks(eval_, "held-out", eval_left, seq_len)
    train = cap(train, cfg.max_train_examples, "train", seed)
    eval_ = cap(eval_, cfg.max_eval_examples, "eval", seed)
    stats = {
        "train_documents": len(train_idx),
        "eval_documents": len(eval_idx),
        "dropped": 0,
        "truncated": 0,
        "dropped_tokens": train_left + eval_left,
    }
    return TaskData("causal_lm", train, eval_, pad_token_id(tokenizer), None, stats)


def _report_truncation(cfg: DataConfig, encoded, examples, truncated: int, seq_len: int) -> None:
    """Rows longer than ``seq_len`` are cut at the end (their responses lose their ends) and rows whose prompt
    leaves no room are dropped: a warning counts them, or ``data.truncation: refuse`` stops."""
    dropped = sum(e is None for e in examples)
    if not truncated and not dropped:
        return
    first = next(i for i, (p, f) in enumerate(encoded) if len(f) > seq_len)
    longest = max(len(f) for _, f in encoded)
    what = (f"{truncated + dropped} of {len(encoded)} instruction rows are longer than train.seq_len={seq_len} tokens (the longest "
            f"{longest}, the first row {first})" + (f"; {dropped} of them leave no room after the prompt" if dropped else ""))
    if cfg.truncation == "refuse":
        raise DataError(f"{what}; raise train.seq_len, shorten the rows, or set data.truncation: cut")
    warn(f"{what}: they are cut at the end{' and the ones without room dropped' if dropped else ''} (raise train.seq_len "
         "to keep them whole; data.truncation: refuse stops instead)")


def _instruction(
    records: Sequence[Record], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> TaskData:
    fmt = InstructionFormat(tokenizer, LABEL_PROMPTS.get(cfg.source, DEFAULT_LABEL_PROMPT), all_turns=cfg.chat_turns == "all")
    train_idx, eval_idx = split_indices(len(records), cfg.eval_fraction, seed, "records")
    if cfg.source.startswith("builtin:"):  # public text: safe to cache its tokens
        encoded = fmt.encode_cached(records, cfg.source.removeprefix("builtin:"))
    else:
        encoded = fmt.encode(records)
    examples, truncated = build_examples(encoded, seq_len)
    if fmt.last_only:
        warn(f"the chat template renders earlier assistant turns otherwise in a whole chat than alone (some drop their "
             f"reasoning), so only the last assistant turn of {fmt.last_only} multi-turn chat(s) trains")
    _report_truncation(cfg, encoded, examples, truncated, seq_len)
    train = cap([examples[i] for i in train_idx if examples[i] is not None], cfg.max_train_examples, "train", seed)
    held_out = cap([i for i in eval_idx if examples[i] is not None], cfg.max_eval_examples, "eval", seed)
    for part, kept in (("training", train), ("held-out", held_out)):
        if not kept:
            raise DataError(
                f"every {part} example's prompt is at least seq_len={seq_len} tokens long; raise train.seq_len"
            )
    eval_ = [examples[i] for i in held_out]
    choices = None
    if all(record_kind(r) == "labelled" for r in records):
        words = LABEL_WORDS.get(cfg.source) or tuple(sorted({r["label"] for r in records}))
        choices = build_choice_eval(fmt, [records[i] for i in held_out], eval_, words)
    stats = {
        "train_documents": len(train_idx),
        "eval_documents": len(eval_idx),
        "dropped": sum(e is None for e in examples),
        "truncated": truncated,
    }
    return TaskData("instruction", train, eval_, pad_token_id(tokenizer), choices, stats)


def build_task_from_records(
    records: Sequence[Record], data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> TaskData:
    """:func:`build_task` on records already loaded (or made in code)."""
    if not records:
        raise DataError("no records to build a task from")
    kind = resolve_kind(data_cfg.task, records)
    build = _causal_lm if kind == "causal_lm" else _instruction
    task = build(records, data_cfg, tokenizer, seq_len, seed)
    task.stats = {
        "source": data_cfg.source,
        "task": kind,
        "documents": len(records),
        "train_examples": len(task.train),
        "eval_examples": len(task.eval),
        **task.stats,
        "tokens": sum(len(e["input_ids"]) for e in task.train) + sum(len(e["input_ids"]) for e in task.eval),
    }
    return task


def build_task(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int) -> TaskData:
    """Load ``data_cfg.source``, pick the task, split by document (or example) with ``seed``, tokenize, cap.

    The split is made on records before tokenizing, so the held-out set is the same for every model and
    ``seq_len``, and no held-out text reaches training.
    """
    return build_task_from_records(load_records(data_cfg), data_cfg, tokenizer, seq_len, seed)
