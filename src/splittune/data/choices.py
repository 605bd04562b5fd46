"""Accuracy on labelled data by label-word scoring.

For each held-out example the model reads the prompt (everything before the label word, with the chat
generation prompt when there is one); the prediction is the candidate label whose first token gets the
higher logit at the last prompt position. No generation, no parsing of free text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import DataError
from .instruction import Example, InstructionFormat, prompt_length
from .records import Record


@dataclass(frozen=True)
class ChoiceEval:
    """Example i's prompt ``prompts[i]`` (1-D long) and its answer ``targets[i]``, an index into ``candidates``.

    ``candidates[c]`` is the first token of ``label_words[c]`` as it follows the prompt.
    """

    prompts: list[torch.Tensor]
    candidates: torch.Tensor  # [C] long
    targets: torch.Tensor  # [N] long
    label_words: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, start: int, stop: int, pad_id: int) -> dict[str, torch.Tensor]:
        """Prompts ``start:stop``, right-padded: ``input_ids``, ``attention_mask``, ``targets`` and ``last_index``,
        the position whose logits to score."""
        prompts = self.prompts[start:stop]
        lengths = torch.tensor([len(p) for p in prompts])
        input_ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, : len(p)] = p
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "last_index": lengths - 1,
            "targets": self.targets[start:stop],
        }


def build_choice_eval(
    fmt: InstructionFormat, records: Sequence[Record], examples: Sequence[Example], label_words: Sequence[str]
) -> ChoiceEval:
    """The choice set of labelled eval ``examples`` (built from ``records``, in the same order)."""
    if len(label_words) < 2:
        raise DataError(f"label-word scoring needs at least 2 labels, got {list(label_words)}")
    probe = fmt.encode([dict(records[0], label=word) for word in label_words])
    candidates = [full[len(prompt)] for prompt, full in probe]
    tokens = {}
    for word, token in zip(label_words, candidates, strict=True):
        if token in tokens:
            raise DataError(
                f"labels {tokens[token]!r} and {word!r} begin with the same token ({token}); "
                "label-word scoring needs label words whose first tokens differ"
            )
        tokens[token] = word
    prompts, targets = [], []
    for i, (record, example) in enumerate(zip(records, examples, strict=True)):
        target = list(label_words).index(record["label"])
        n = prompt_length(example)
        if int(example["input_ids"][n]) != candidates[target]:
            raise DataError(
                f"eval example {i}: its label {record['label']!r} starts with token {int(example['input_ids'][n])} "
                f"after the prompt, not {candidates[target]} as in the probe; label-word scoring would be wrong"
            )
        prompts.append(example["input_ids"][:n].clone())
        targets.append(target)
    return ChoiceEval(
        prompts, torch.tensor(candidates, dtype=torch.long), torch.tensor(targets, dtype=torch.long), tuple(label_words)
    )


def choice_accuracy(last_logits: torch.Tensor, choices: ChoiceEval) -> float:
    """Share of examples whose target label's token has the highest logit among the candidates.

    ``last_logits`` is ``[N, vocab]``: the logits at each prompt's last position, in ``choices`` order.
    """
    if last_logits.ndim != 2 or last_logits.shape[0] != len(choices):
        raise ValueError(f"expected last_logits of shape [{len(choices)}, vocab], got {tuple(last_logits.shape)}")
    if len(choices) == 0:
        return float("nan")
    scores = last_logits[:, choices.candidates.to(last_logits.device)]
    predicted = scores.argmax(dim=-1).cpu()
    return (predicted == choices.targets).float().mean().item()


def merge_choices(parts: Sequence[ChoiceEval | None]) -> ChoiceEval | None:
    """The choice sets of several eval sets, concatenated in order (the union of clients' held-out data);
    None unless every part has one with the same label words and candidate tokens."""
    if not parts or any(p is None for p in parts):
        return None
    first = parts[0]
    if any(p.label_words != first.label_words or not torch.equal(p.candidates, first.candidates) for p in parts):
        return None
    return ChoiceEval(
        [prompt for p in parts for prompt in p.prompts],
        first.candidates,
        torch.cat([p.targets for p in parts]),
        first.label_words,
    )


def candidate_scores(logits: torch.Tensor, positions: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """``[rows, candidates]``: each row's logits of the candidate tokens at its own position (its last prompt token)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    pos = torch.as_tensor(positions, dtype=torch.long, device=logits.device)
    return logits[rows, pos][:, torch.as_tensor(tokens, dtype=torch.long, device=logits.device)].float()
