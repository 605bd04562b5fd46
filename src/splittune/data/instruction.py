"""Instruction tuning: prompt and response in one sequence, the loss on the response tokens only.

With a chat template (``tokenizer.chat_template``) a record becomes a conversation: the prompt is every
turn before the last, rendered with the generation prompt (``add_generation_prompt=True``), and the
response is the rest of the full rendering (the assistant's text and its end-of-turn tokens). Without
one, the sequence is ``[prefix] + prompt + response + [eos]``. Either way the prompt is tokenized on its
own and must be an exact prefix of the full sequence's tokens; otherwise the mask would hide or expose
the wrong tokens, so we refuse instead of guessing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .errors import DataError
from .records import Record, record_kind
from .tokens import cached, encode, special_prefix

# (prompt ids, full ids) and, for a chat with earlier assistant turns, their (start, end) spans, trained as well
Encoded = tuple[Sequence[int], Sequence[int]] | tuple[Sequence[int], Sequence[int], Sequence[tuple[int, int]]]

IGNORE_INDEX = -100
DEFAULT_LABEL_PROMPT = "Text: {text}\nLabel:"

Example = dict[str, torch.Tensor]


class InstructionFormat:
    """How records become (prompt ids, full ids) for one tokenizer.

    ``label_prompt`` frames labelled records: it becomes the user turn (or the plain prompt), and the label
    word the response (after a space in the plain form, where the space belongs to the word's token).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_prompt: str = DEFAULT_LABEL_PROMPT, all_turns: bool = True):
        """``all_turns``: a chat trains every assistant turn (TRL's assistant-only loss), not only its last."""
        self.tokenizer = tokenizer
        self.all_turns = all_turns
        self.last_only = 0  # chats whose earlier turns the template renders otherwise: only their last turn trains
        self.label_prompt = label_prompt
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        if not self.chat:
            if tokenizer.eos_token_id is None:
                raise DataError("the tokenizer has no eos_token: instruction examples need one to end each response")
            self.prefix = special_prefix(tokenizer)
            self.suffix = [tokenizer.eos_token_id]

    def messages(self, record: Record) -> list[dict[str, str]]:
        kind = record_kind(record)
        if kind == "chat":
            return record["messages"]
        if kind == "pair":
            return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if kind == "labelled":
            return [
                {"role": "user", "content": self.label_prompt.format(text=record["text"])},
                {"role": "assistant", "content": record["label"]},
            ]
        raise DataError("an instruction task needs prompt/response, messages or text+label records, got raw text")

    def _plain(self, record: Record) -> tuple[str, str]:
        kind = record_kind(record)
        if kind == "pair":
            return record["prompt"], record["response"]
        if kind == "labelled":
            return self.label_prompt.format(text=record["text"]), " " + record["label"]
        turns = self.messages(record)
        context = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in turns[:-1])
        return context + "Assistant:", " " + turns[-1]["content"]

    def render(self, records: Sequence[Record]) -> tuple[list[str], list[str]]:
        """The prompt text and the full text of each record."""
        if self.chat:
            conversations = [self.messages(r) for r in records]
            apply = self.tokenizer.apply_chat_template
            prompts = apply([c[:-1] for c in conversations], add_generation_prompt=True, tokenize=False)
            fulls = apply(conversations, tokenize=False)
            return list(prompts), list(fulls)
        parts = [self._plain(r) for r in records]
        return [p for p, _ in parts], [p + r for p, r in parts]

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt as a user turn, framed as training framed prompts (the chat template and its generation
        prompt, or the plain form's special prefix): what generation continues."""
        if self.chat:
            texts = self.tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                                       add_generation_prompt=True, tokenize=False)
            return encode(self.tokenizer, list(texts))
        return [self.prefix + ids for ids in encode(self.tokenizer, list(prompts))]

    def encode(self, records: Sequence[Record]) -> list[Encoded]:
        """(prompt ids, full ids) per record, the prompt checked to be a proper prefix of the full sequence."""
        if not records:
            return []
        prompts, fulls = self.render(records)
        prompt_ids = encode(self.tokenizer, prompts)
        full_ids = encode(self.tokenizer, fulls)
        out = []
        for i, (p, f) in enumerate(zip(prompt_ids, full_ids, strict=True)):
            if len(f) <= len(p) or f[: len(p)] != p:
                boundary = f"{prompts[i][-20:]!r} + {fulls[i][len(prompts[i]) :][:20]!r}"
                raise DataError(
                    f"record {i}: the prompt's tokens are not a prefix of the prompt+response tokens, so the loss "
                    f"mask cannot be placed (at {boundary}). The tokenizer merges characters across the boundary: "
                    "end the prompt with a separator the response does not continue (e.g. move trailing whitespace "
                    "from the prompt to the response)"
                )
            spans = self._earlier_turns(records[i], fulls[i], f) if self.all_turns else []
            n = len(self.prefix)
            if spans:
                out.append((self.prefix + p, self.prefix + f + self.suffix, [(a + n, b + n) for a, b in spans]))
            else:
                out.append((self.prefix + p, self.prefix + f + self.suffix))
        return out

    def _earlier_turns(self, record: Record, full: str, full_ids: Sequence[int]) -> list[tuple[int, int]]:
        """The token spans of a chat's assistant turns before its last, each rendered as the text before it plus the
        generation prompt (its start) and the text through it (its end), both prefixes of the whole chat's tokens;
        [] when there are none, or when the template renders an earlier turn otherwise in the whole chat than alone
        (some drop earlier reasoning): then only the last turn trains, and ``last_only`` counts it."""
        if record_kind(record) != "chat":
            return []
        turns = record["messages"]
        earlier = [k for k, m in enumerate(turns[:-1]) if m["role"] == "assistant"]
        if not earlier:
            return []
        texts = []
        for k in earlier:
            if self.chat:
                apply = self.tokenizer.apply_chat_template
                texts += [apply(turns[:k], add_generation_prompt=True, tokenize=False), apply(turns[: k + 1], tokenize=False)]
            else:
                before = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in turns[:k]) + "Assistant:"
                texts += [before, before + " " + turns[k]["content"]]
        ids = encode(self.tokenizer, texts)
        spans = []
        for start_text, end_text, start, end in zip(texts[0::2], texts[1::2], ids[0::2], ids[1::2]):
            fits = full.startswith(end_text) and end_text.startswith(start_text)
            if not fits or len(end) <= len(start) or list(full_ids[: len(end)]) != list(end) or list(end[: len(start)]) != list(start):
                self.last_only += 1
                return []
            spans.append((len(start), len(end)))
        return spans

    def encode_cached(self, records: Sequence[Record], name: str) -> list[Encoded]:
        """:meth:`encode` through the token cache; only for public (builtin) records."""
        key = [
            "instruction-v1",
            str(self.tokenizer.chat_template),
            self.label_prompt,
            str(self.prefix),
            str(self.suffix),
        ]
        key += [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
        flat = cached(name, self.tokenizer, key, lambda: [ids for pair in self.encode(records) for ids in pair[:2]])
        return list(zip(flat[0::2], flat[1::2], strict=True))


def build_examples(encoded: Sequence[Encoded], seq_len: int) -> tuple[list[Example | None], int]:
    """One example per encoded record (None where the prompt leaves no room for the response), and how many
    were truncated.

    Sequences longer than ``seq_len`` are cut at the end, so an example keeps its whole prompt and at least
    the start of its response.
    """
    examples: list[Example | None] = []
    truncated = 0
    for prompt, full, *more in encoded:
        spans = list(more[0]) if more else []
        if (spans[0][0] if spans else len(prompt)) >= seq_len:
            examples.append(None)
            continue
        truncated += len(full) > seq_len
        ids = torch.as_tensor(np.asarray(full[:seq_len], dtype=np.int64))
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        for start, end in spans:  # a chat's earlier assistant turns train as well
            labels[start:end] = ids[start:end]
        examples.append({"input_ids": ids, "labels": labels})
    return examples, truncated


def prompt_length(example: Example) -> int:
    """Where the response starts: the first position with a label."""
    return int((example["labels"] != IGNORE_INDEX).nonzero()[0, 0])
