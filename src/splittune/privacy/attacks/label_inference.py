"""Label inference from the gradients a U-shaped split's server receives (Li et al., ICLR'22, "Label Leakage and
Protection in Two-party Split Learning"; research/privacy.md §2.5).

In a U-shaped split the labels never leave the client, but its top sends the server g = dL/dh, the gradient
of the loss w.r.t. the trunk output h, for every training micro-batch. At the position that predicts the
label word, cross-entropy's gradient w.r.t. the logits is p − e_y, so g there points one way for one label
word and another way for the other: the class leaks through the gradient's *direction* (and, under class
imbalance, its *norm*).

Per row: the answer position is found from the gradient itself (positions before the answer carry no loss of
their own, so their gradient is small: the answer starts at the first position whose norm reaches
``threshold`` × the row's largest, plus the offset where the label words' tokens first differ). The
direction score splits the rows' unit gradients at that position in two, unsupervised (the first principal
component), and fixes which side is positive with public knowledge only: the pretrained top's
vector-Jacobian product at h with cotangent e_pos − e_neg on the logits says which way a gradient leans when
the label is the positive word (it leans against that vector).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...data.builtin import SENTIMENT_LABELS
from ...data.instruction import InstructionFormat
from ..knowledge import PublicKnowledge
from ...taps.tap import Tap
from .base import Attack, AttackError, Options, Progress, Recovered, Recovery, observed, register, rows_of


class LabelOptions(Options):
    score: Literal["auto", "norm", "direction"] = Field(
        "auto", description="which score the recovery carries: direction (cluster split oriented by the pretrained "
                            "top), norm (gradient norm at the answer position); auto = direction")
    label_words: list[str] = Field(list(SENTIMENT_LABELS), min_length=2, max_length=2,
                                   description="the task's public label words, the positive one first")
    position: Literal["first", "max"] = Field(
        "first", description="the answer position: first (first position whose gradient norm reaches threshold × "
                             "the row's largest, plus where the label words' tokens differ) or max (largest norm)")
    threshold: float = Field(0.3, gt=0, le=1, description="share of a row's largest gradient norm that marks the answer")


def label_tokens(tokenizer, words: list[str]) -> tuple[int, int, int]:
    """(positive token, negative token, offset): the first tokens where the two label words differ as they
    appear in an answer of the instruction format, and their index within the answer."""
    fmt = InstructionFormat(tokenizer)
    answers = [full[len(prompt):] for prompt, full in fmt.encode([{"text": "x", "label": w} for w in words])]
    j = next((k for k, (a, b) in enumerate(zip(*answers)) if a != b), None)
    if j is None:
        raise AttackError(f"label words {words} have no token where they differ: their classes cannot be told apart")
    return int(answers[0][j]), int(answers[1][j]), j


def answer_positions(grad: torch.Tensor, mask: torch.Tensor, offset: int = 0, position: str = "first",
                     threshold: float = 0.3) -> torch.Tensor:
    """[B]: each row's position predicting the class token, found from the gradient norms [B, T] alone."""
    norms = grad.float().norm(dim=-1) * mask.to(grad.device).float()
    peak = norms.max(dim=1).values
    if position == "max":
        return norms.argmax(dim=1)
    above = norms >= threshold * peak[:, None]
    first = above.float().argmax(dim=1)  # the first True
    last = torch.where(norms > 0, torch.arange(norms.shape[1]), 0).max(dim=1).values
    return torch.minimum(first + offset, last)


def direction_scores(vectors: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scores [N] splitting ``vectors`` [N, d] in two along their first principal component (on unit vectors,
    centred), oriented so that higher means positive; ``reference`` [N] is a public per-row guess (higher =
    positive) used only for the sign. Returns the scores and their correlation with the reference."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    centred = unit - unit.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    s = centred @ vh[0]
    ref = reference.double() - reference.double().mean()
    agree = float((s * ref).sum() / (s.norm() * ref.norm()).clamp_min(1e-12))
    return (s if agree >= 0 else -s).float(), abs(agree)


def reference_scores(top, hidden: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, at: torch.Tensor,
                     pos: int, neg: int) -> torch.Tensor:
    """[B]: −cos(g_i, v_i) at the answer position, v_i the pretrained top's vjp at h_i for cotangent
    e_pos − e_neg on the logits there: a positive label's gradient leans against v_i."""
    h = hidden.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = top(mask, hidden=h)
        rows = torch.arange(h.shape[0])
        picked = logits[rows, at]
        (picked[:, pos] - picked[:, neg]).sum().backward()
    v = h.grad[rows, at]
    return -torch.nn.functional.cosine_similarity(grad.float()[rows, at], v, dim=1)


@register
class LabelInference(Attack):
    name = "label-inference"
    observer = "server"
    shapes = ("u-shape",)
    target = "class"
    summary = "each example's class from the gradient its client's top sends back (norm and direction scoring)"
    Options = LabelOptions

    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        o = self.options
        pos, neg, offset = label_tokens(public.tokenizer, o.label_words)
        cut = int(tap.proposal()["cuts"][1])
        top = public.segment(cut, public.spec.n_blocks)
        masks = {(r.session, r.step, r.micro): r for r in observed(tap, "activations", "up")}
        sent = {(r.session, r.step, r.micro): r for r in tap.records("activations", "down") if not r.dropped}
        grads = list(observed(tap, "gradients", "up"))
        items, vectors, norms, refs = [], [], [], []
        for k, record in enumerate(grads):
            key = (record.session, record.step, record.micro)
            if key not in masks or key not in sent:
                continue
            grad = record.tensor("grad").float()
            mask = masks[key].tensor("attention_mask")
            hidden = sent[key].tensor("hidden").float()
            if grad.shape != hidden.shape or mask.shape != grad.shape[:2]:
                continue
            at = answer_positions(grad, mask, offset, o.position, o.threshold)
            rows = torch.arange(grad.shape[0])
            vectors.append(grad[rows, at])
            norms.append(grad[rows, at].norm(dim=1))
            refs.append(reference_scores(top, hidden, mask, grad, at, pos, neg))
            rows_sent = rows_of(masks[key])
            items.append(Recovered(record.session, record.step, record.micro,
                                   rows_sent if len(rows_sent) == grad.shape[0] else rows.tolist()))
            progress(k + 1, len(grads), "micro-batches scored")
        if not items:
            raise AttackError(f"the tap in {tap.folder} holds no training gradients with their activations and mask "
                              "(record the server's tap of a U-shaped run)")
        direction, agree = direction_scores(torch.cat(vectors), torch.cat(refs))
        norm = torch.cat(norms)
        # the norm has no sign of its own: orient it like the direction score (Li et al.: the rarer class is larger)
        sign = -1.0 if float(torch.corrcoef(torch.stack([norm, direction]))[0, 1]) < 0 else 1.0
        chosen = norm * sign if o.score == "norm" else direction
        start = 0
        for item in items:
            n = len(item.rows)
            item.scores = chosen[start:start + n].clone()
            start += n
        reference = torch.cat(refs)
        return Recovery(self.name, "class", items, positive=pos,
                        info={"score": "norm" if o.score == "norm" else "direction", "label_words": o.label_words,
                              "positive_token": pos, "negative_token": neg, "answer_offset": offset,
                              "position": o.position, "threshold": o.threshold, "rows": len(norm),
                              "reference_agreement": agree, "norm_orientation": sign,
                              "reference_positive_share": float((reference > 0).float().mean()),
                              "norm_scores": (norm * sign).tolist(), "direction_scores": direction.tolist(),
                              "reference_scores": reference.tolist()})
