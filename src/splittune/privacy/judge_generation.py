"""The judge of a generation attack: the recovered prompt and response scored apart against the client's own record
of what it generated (``splittune generate --json``: one line per prompt, with the prompt, the generated token ids
and how many tokens the framed prompt had). Only the judge reads that record, after the attack has finished.

Both parts get ROUGE-L F1 and token accuracy (``dpmath/metrics.py``, as every attack): a PIDI-style attack claims
the response too, and the response is what the client's users read, often what is most private.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.instruction import InstructionFormat
from ..data.tokens import encode, special_prefix
from ..dpmath.metrics import mean_rouge_l_f1, token_accuracy
from .attacks.base import Recovery
from .judge import JudgeError

PARTS = ("prompt", "response")


def read_generations(path: Path | str, tokenizer) -> list[dict[str, list[int]]]:
    """``generate --json`` lines as the judge's key: each prompt's token ids as the client framed them (raw, with
    the tokenizer's prefix, or the chat template: the one of the recorded length) and the tokens it generated."""
    path = Path(path)
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise JudgeError(f"--truth {path}: not readable as `splittune generate --json` lines ({err})") from None
    truths = []
    for i, line in enumerate(lines, 1):
        if not isinstance(line, dict) or not {"prompt", "token_ids", "prompt_tokens"} <= set(line):
            raise JudgeError(f"--truth {path}, line {i}: needs prompt, token_ids and prompt_tokens "
                             "(what `splittune generate --json` prints)")
        raw = encode(tokenizer, [line["prompt"]])[0]
        framings = [raw, special_prefix(tokenizer) + raw, InstructionFormat(tokenizer).prompt_ids([line["prompt"]])[0]]
        ids = next((f for f in framings if len(f) == int(line["prompt_tokens"])), None)
        if ids is None:
            raise JudgeError(f"--truth {path}, line {i}: no framing of the prompt has its {line['prompt_tokens']} tokens "
                             "(was it generated with this model's tokenizer?)")
        truths.append({"prompt_ids": list(ids), "response_ids": [int(t) for t in line["token_ids"]]})
    return truths


def score_generation(recovery: Recovery, truths: list[dict[str, list[int]]], tokenizer, examples: int = 12) -> dict[str, Any]:
    """``prompt_rouge_l_f1``, ``prompt_token_accuracy``, ``response_rouge_l_f1``, ``response_token_accuracy`` (and
    ``rouge_l_f1``/``token_accuracy`` over both): each recovered row, in the order the server saw them, against
    ``truths`` in the order the client generated them."""
    rows = [(item, r, seq) for item, seq in zip(recovery.items, recovery.info.get("sequences", [])) for r in range(len(item.rows))]
    if len(rows) != len(truths):
        raise JudgeError(f"the tap holds {len(rows)} generated rows but the truth has {len(truths)}: give the "
                         "`generate --json` output of exactly the recorded generations")
    texts = {p: ([], []) for p in PARTS}
    hits = {p: [0, 0] for p in PARTS}
    shown = []
    for (item, r, seq), truth in zip(rows, truths):
        got = item.tokens[r]
        start = int(seq["prompt_len"])
        spans = {"prompt": (start - len(truth["prompt_ids"]), start),
                 "response": (start, start + len(truth["response_ids"]))}
        example: dict[str, Any] = {"step": item.step, "original_tokens": [], "recovered_tokens": []}
        for part, (a, b) in spans.items():
            ref = truth[f"{part}_ids"]
            claimed = got[max(a, 0):b].tolist()
            claimed += [-1] * (len(ref) - len(claimed))
            hit, n = token_accuracy(np.array(ref), np.array(claimed), np.ones(len(ref), dtype=bool))
            hits[part][0] += hit
            hits[part][1] += n
            ref_text = tokenizer.decode(ref, skip_special_tokens=True)
            hyp_text = tokenizer.decode([t for t in claimed if t >= 0], skip_special_tokens=True)
            texts[part][0].append(ref_text)
            texts[part][1].append(hyp_text)
            example[f"original_{part}"], example[f"recovered_{part}"] = ref_text, hyp_text
            sep = [" ‖ "] if part == "response" else []
            example["original_tokens"] += sep + [tokenizer.decode([t]) for t in ref]
            example["recovered_tokens"] += sep + [tokenizer.decode([t]) if t >= 0 else "" for t in claimed]
        if len(shown) < examples:
            shown.append(example)
    out: dict[str, Any] = {}
    for part in PARTS:
        out[f"{part}_rouge_l_f1"] = mean_rouge_l_f1(*texts[part])
        out[f"{part}_token_accuracy"] = hits[part][0] / max(hits[part][1], 1)
        out[f"{part}_positions"] = hits[part][1]
    both = hits["prompt"][0] + hits["response"][0], hits["prompt"][1] + hits["response"][1]
    out["token_accuracy"] = both[0] / max(both[1], 1)
    out["rouge_l_f1"] = mean_rouge_l_f1([a + " " + b for a, b in zip(texts["prompt"][0], texts["response"][0])],
                                        [a + " " + b for a, b in zip(texts["prompt"][1], texts["response"][1])])
    out["texts"] = len(truths)
    out["examples"] = shown
    return out
