"""The judge: a recovery scored against what the client really sent (its ``tap/truth`` record).

Only the judge sees the private data, after the attack has finished; the metrics are ``dpmath/metrics.py``'s,
so every attack and report measures success the same way. A result holds the headline figures, the same per
training step (how success changes as the client's adapters drift from the pretrained weights), and a few
examples of original and recovered text for the report.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from ..errors import SplittuneError
from .attacks.base import Recovery
from ..dpmath.metrics import leak_auc, mean_rouge_l_f1, rouge_l_f1, set_scores, token_accuracy
from ..taps.tap import Truth

IGNORE = -100


class JudgeError(SplittuneError, ValueError):
    """A recovery that cannot be scored (no truth recorded for what it claims)."""


def _pairs(recovery: Recovery, truth: Truth):
    """Each recovered micro-batch with the truth of its rows."""
    for item in recovery.items:
        batch = truth.batch(item.session, item.step, item.micro)
        if batch is None:
            continue
        rows = torch.tensor(item.rows, dtype=torch.long)
        yield item, {k: v[rows] for k, v in batch.items()}


def _positions(recovery: Recovery, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The original token at each scored position and where positions are scored: for ``inputs`` every
    attended position; for ``labels`` each position whose next label carries loss (the label of position t is
    the token at t + 1)."""
    if recovery.target == "inputs":
        return batch["input_ids"], batch["attention_mask"].bool()
    labels = batch["labels"]
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    return nxt, nxt != IGNORE


def score(recovery: Recovery, truth: Truth, tokenizer, examples: int = 12) -> dict[str, Any]:
    """The recovery's figures against the truth: ``rouge_l_f1`` and ``token_accuracy`` (inputs, labels),
    ``leak_auc`` (class), token-set ``precision``/``recall``/``f1`` (bag), overall and ``per_step``."""
    if recovery.target in ("inputs", "labels"):
        return _score_tokens(recovery, truth, tokenizer, examples)
    if recovery.target == "class":
        return _score_class(recovery, truth)
    return _score_bag(recovery, truth, tokenizer, examples)


def _score_tokens(recovery: Recovery, truth: Truth, tokenizer, examples: int) -> dict[str, Any]:
    refs, hyps, shown = [], [], []
    per_step: dict[int, dict[str, list]] = defaultdict(lambda: {"refs": [], "hyps": [], "hit": [0, 0]})
    for item, batch in _pairs(recovery, truth):
        original, where = _positions(recovery, batch)
        for r in range(original.shape[0]):
            keep = where[r]
            ref_ids = original[r][keep].tolist()
            got = item.tokens[r][keep]
            hit, n = token_accuracy(np.array(ref_ids), got.numpy(), np.ones(len(ref_ids), dtype=bool))
            ref = tokenizer.decode(ref_ids, skip_special_tokens=True)
            hyp = tokenizer.decode([t for t in got.tolist() if t >= 0], skip_special_tokens=True)
            refs.append(ref)
            hyps.append(hyp)
            step = per_step[item.step]
            step["refs"].append(ref)
            step["hyps"].append(hyp)
            step["hit"][0] += hit
            step["hit"][1] += n
            if len(shown) < examples:
                shown.append({"step": item.step, "original": ref, "recovered": hyp,
                              "original_tokens": [tokenizer.decode([t]) for t in ref_ids],
                              "recovered_tokens": [tokenizer.decode([t]) if t >= 0 else "" for t in got.tolist()]})
    if not refs:
        raise JudgeError("nothing to score: the truth record holds none of the micro-batches the attack recovered")
    hits = sum(s["hit"][0] for s in per_step.values())
    total = sum(s["hit"][1] for s in per_step.values())
    per_text = [round(rouge_l_f1(r, h), 4) for r, h in zip(refs, hyps)]  # (how sure a mean is: ``leak_table.py``)
    return {"rouge_l_f1": mean_rouge_l_f1(refs, hyps), "rouge_l_f1_per_text": per_text,
            "token_accuracy": hits / max(total, 1), "texts": len(refs),
            "positions": total,
            "per_step": {str(k): {"rouge_l_f1": mean_rouge_l_f1(v["refs"], v["hyps"]), "token_accuracy": v["hit"][0] / max(v["hit"][1], 1),
                                  "texts": len(v["refs"])} for k, v in sorted(per_step.items())},
            "examples": shown}


def row_classes(labels: torch.Tensor, positive: int) -> list[bool]:
    """Whether each row's answer (its loss-carrying labels) holds the positive label word."""
    return [bool((row[row != IGNORE] == positive).any()) for row in labels]


def _score_class(recovery: Recovery, truth: Truth) -> dict[str, Any]:
    scores, classes = [], []
    per_step: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for item, batch in _pairs(recovery, truth):
        y = row_classes(batch["labels"], recovery.positive)
        s = item.scores.double().tolist()
        scores += s
        classes += y
        per_step[item.step][0].extend(s)
        per_step[item.step][1].extend(y)
    if len(set(classes)) < 2:
        raise JudgeError("leak AUC needs examples of both classes among the rows the attack scored")
    steps = {str(k): {"leak_auc": leak_auc(s, y), "rows": len(s)} for k, (s, y) in sorted(per_step.items()) if len(set(y)) == 2}
    return {"leak_auc": leak_auc(scores, classes), "rows": len(scores), "positive_share": float(np.mean(classes)),
            "per_step": steps}


def _score_bag(recovery: Recovery, truth: Truth, tokenizer, examples: int) -> dict[str, Any]:
    """Each recovered bag against the tokens its client's training batches held since its previous average."""
    results, shown = [], []
    last: dict[str, int] = {}
    for item in sorted(recovery.items, key=lambda i: (i.session, i.step)):
        since = last.get(item.session, 0)
        last[item.session] = item.step
        tokens: set[int] = set()
        for record in truth.records("batch", session=item.session):
            if since < record.step <= item.step and not record.dropped:
                batch = record.tensors()
                tokens |= set(batch["input_ids"][batch["attention_mask"].bool()].tolist())
        if not tokens:
            continue
        s = set_scores(tokens, item.bag or [])
        results.append({"step": item.step, "session": item.session, **s, "original_tokens": len(tokens), "recovered_tokens": len(item.bag or [])})
        if len(shown) < examples:
            found = sorted(set(item.bag or []))
            shown.append({"step": item.step, "original": " ".join(sorted(tokenizer.decode([t]).strip() for t in tokens)),
                          "recovered": " ".join(tokenizer.decode([t]).strip() for t in found),
                          "hits": sorted(tokenizer.decode([t]).strip() for t in set(found) & tokens)})
    if not results:
        raise JudgeError("nothing to score: no recorded training batch precedes the recovered averages")
    mean = {k: float(np.mean([r[k] for r in results])) for k in ("precision", "recall", "f1")}
    several = len({i.session for i in recovery.items}) > 1
    steps = {(f"{r['step']} · {r['session'][:6]}" if several else str(r["step"])): r for r in results}
    return {**mean, "rounds": len(results), "per_step": steps, "examples": shown}


def unscored(recovery: Recovery, tokenizer, examples: int = 12) -> list[dict[str, Any]]:
    """What the attack recovered, as text, when no truth is at hand to score it against."""
    shown: list[dict[str, Any]] = []
    for item in recovery.items:
        if item.tokens is not None:
            for row in item.tokens:
                ids = [t for t in row.tolist() if t >= 0]
                shown.append({"step": item.step, "recovered": tokenizer.decode(ids, skip_special_tokens=True)})
        elif item.bag is not None:
            shown.append({"step": item.step, "recovered": " ".join(tokenizer.decode([t]).strip() for t in sorted(set(item.bag)))})
        if len(shown) >= examples:
            break
    return shown[:examples]
