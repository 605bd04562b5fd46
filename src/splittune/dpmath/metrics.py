"""How attack success is measured, once for every attack and report (pure functions, no imports from above).

- ROUGE-L F1 of recovered against original text, with Google's ``rouge-score`` (its default tokenizer:
  lowercased alphanumeric words, no stemming), averaged over texts: the metric BiSR and SIP report.
- Token accuracy: the share of positions whose recovered token id equals the original (positions the
  attack claims nothing for count as misses).
- Token-set precision, recall and F1 (order-free), for attacks that recover which tokens, not where.
- Leak AUC: the ROC AUC of an attack's score against the true binary class (Li et al., ICLR'22), computed
  as the Mann-Whitney statistic with ties counted half; 0.5 is chance, 1.0 a perfect separation.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_f1(reference: str, recovered: str) -> float:
    """ROUGE-L F1 of one recovered text against its reference (0.0 when either has no words)."""
    return float(_scorer().score(reference, recovered)["rougeL"].fmeasure)


def mean_rouge_l_f1(references: Sequence[str], recovered: Sequence[str]) -> float:
    if len(references) != len(recovered):
        raise ValueError(f"{len(references)} references for {len(recovered)} recovered texts")
    if not references:
        return 0.0
    return float(np.mean([rouge_l_f1(r, h) for r, h in zip(references, recovered)]))


def token_accuracy(original: np.ndarray, recovered: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(matching positions, positions) over ``mask``'s true entries."""
    mask = np.asarray(mask, dtype=bool)
    return int((np.asarray(original)[mask] == np.asarray(recovered)[mask]).sum()), int(mask.sum())


def set_scores(original: Iterable[int], recovered: Iterable[int]) -> dict[str, float]:
    """Precision, recall and F1 of a recovered token set against the original one."""
    truth, found = set(original), set(recovered)
    hit = len(truth & found)
    precision = hit / len(found) if found else 0.0
    recall = hit / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def leak_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC AUC of ``scores`` for the ``positive`` class (Mann-Whitney U over every positive-negative pair)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        raise ValueError("leak AUC needs examples of both classes")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
