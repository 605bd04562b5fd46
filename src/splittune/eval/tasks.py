"""Task evaluation (``splittune evaluate``): generate answers to held-out prompts and score them against references.

The prompts are framed exactly as training framed them (``InstructionFormat``: the chat template and its generation
prompt, or the plain form; a labelled row's label prompt), so the model answers in the form it learned. The model
is anything with transformers' ``generate`` (the run's ``SplitModel`` through the split, or an unsplit ``PeftModel``
from an export): this module knows neither, so it sits below both.

Metrics, each a mean over examples in [0, 1]:

- ``exact_match``: the answer equals the reference after SQuAD's normalisation (lower case, no punctuation, no
  articles, single spaces), so "The Paris." matches "paris".
- ``rouge_l``: ROUGE-L F1 of the answer against the reference, with Google's ``rouge-score`` (the scorer the
  attacks use, ``dpmath.metrics``).
- ``accuracy``: the first token generated is the reference's first token as it follows the prompt: the token
  label-word scoring (``data/choices.py``) scores, here chosen from the whole vocabulary by the model itself.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from ..config.sections import EvalMetric
from ..data.errors import DataError
from ..data.files import Reading, read_file
from ..data.instruction import DEFAULT_LABEL_PROMPT, InstructionFormat
from ..data.records import Record, record_kind
from ..dpmath.metrics import rouge_l_f1
from ..errors import SplittuneError

METRICS: tuple[str, ...] = get_args(EvalMetric)  # declared once, with the config key train.eval_metrics


class EvalError(SplittuneError, ValueError):
    """An evaluation that cannot run as asked (a metric that does not exist, data without references)."""


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """``exact_match,rouge_l`` (or a list) → the metric names, each checked against :data:`METRICS`."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise EvalError(f"give at least one metric; allowed: {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric {unknown[0]!r}; allowed: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


# -- metrics ----------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def rouge_l(answer: str, reference: str) -> float:
    return rouge_l_f1(reference, answer)


def first_token_match(answer_ids: Sequence[int], reference_first: int) -> float:
    return float(bool(answer_ids) and answer_ids[0] == reference_first)


# -- items ------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One held-out example: the prompt as the user wrote it, its reference answer, and the prompt's token ids
    framed as training framed them, with the reference's first token after them."""

    prompt: str
    reference: str
    prompt_ids: list[int]
    reference_first: int


def _shown(fmt: InstructionFormat, record: Record) -> tuple[str, str]:
    """(the prompt as shown on the page, the reference answer)."""
    turns = fmt.messages(record)
    context = turns[:-1]
    prompt = context[-1]["content"] if len(context) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in context)
    return prompt, turns[-1]["content"]


def read_items(path: Path, tokenizer, *, reading: Reading | None = None, label_prompt: str = DEFAULT_LABEL_PROMPT,
               limit: int | None = None) -> list[Item]:
    """The held-out examples of a data file (any layout ``data/files.py`` reads), each with its reference; a row
    without one (raw text) is refused, naming it."""
    records = read_file(Path(path), reading or Reading())
    if limit is not None:
        records = records[:limit]
    if not records:
        raise EvalError(f"{path}: holds no examples")
    for i, record in enumerate(records):
        if record_kind(record) == "text":
            raise EvalError(f"{path}: row {i + 1} has no reference answer (raw text); evaluate needs prompt/response "
                            "(or instruction/input/output), messages ending with the assistant's turn, or text with a label")
    fmt = InstructionFormat(tokenizer, label_prompt, all_turns=False)
    try:
        encoded = fmt.encode(records)
    except DataError as err:
        raise EvalError(f"{path}: {err}") from None
    items = []
    for record, (prompt_ids, full_ids, *_) in zip(records, encoded):
        prompt, reference = _shown(fmt, record)
        items.append(Item(prompt, reference, list(prompt_ids), int(full_ids[len(prompt_ids)])))
    return items


# -- generation and scoring ---------------------------------------------------------------------------------------
def generate_answers(model: Any, tokenizer, items: Sequence[Item], *, max_new_tokens: int, batch_size: int = 8,
                     on_batch: Callable[[int], None] | None = None) -> list[tuple[str, list[int]]]:
    """Each item's greedy answer (text, token ids up to the end-of-sequence token), generated ``batch_size`` prompts
    at a time, left-padded; ``model`` is anything with transformers' ``generate``. ``on_batch(n)`` after each batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[tuple[str, list[int]]] = []
    for start in range(0, len(items), batch_size):
        rows = [it.prompt_ids for it in items[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        device = getattr(model, "device", None)  # an unsplit model's (the split moves its inputs itself)
        if isinstance(device, torch.device):
            ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        for row in seqs[:, width:].tolist():
            new = row[: row.index(eos) + 1] if eos is not None and eos in row else row
            out.append((tokenizer.decode(new, skip_special_tokens=True).strip(), new))
        if on_batch is not None:
            on_batch(len(rows))
    return out


def score(items: Sequence[Item], answers: Sequence[tuple[str, list[int]]], metrics: Sequence[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(each metric's mean, each example's scores)."""
    per = []
    for item, (text, ids) in zip(items, answers, strict=True):
        row = {}
        for m in metrics:
            if m == "exact_match":
                row[m] = exact_match(text, item.reference)
            elif m == "rouge_l":
                row[m] = rouge_l(text, item.reference)
            else:
                row[m] = first_token_match(ids, item.reference_first)
        per.append(row)
    means = {m: sum(r[m] for r in per) / max(len(per), 1) for m in metrics}
    return means, per


def report(items: Sequence[Item], metrics: Sequence[str], answers: Sequence[tuple[str, list[int]]],
           base_answers: Sequence[tuple[str, list[int]]] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """``eval.json``: the fine-tuned model's (and the base model's) mean scores, the settings, and every example with
    its prompt, reference, answers and scores."""
    tuned, tuned_rows = score(items, answers, metrics)
    base, base_rows = score(items, base_answers, metrics) if base_answers is not None else (None, None)
    examples = []
    for i, item in enumerate(items):
        row = {"prompt": item.prompt, "reference": item.reference, "answer": answers[i][0], "scores": tuned_rows[i]}
        if base_rows is not None:
            row.update(base_answer=base_answers[i][0], base_scores=base_rows[i])
        examples.append(row)
    return {"n": len(items), "metrics": list(metrics), "fine_tuned": tuned, "base": base, "settings": settings,
            "examples": examples}
