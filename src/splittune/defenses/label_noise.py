"""Label noise on the gradient a U-shaped client's top sends the server (Marvell, or the max-norm heuristic)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..cut.transforms import ChainError, Crossing, End, _activation_like
from ..dpmath.mechanisms import answer_classes, marvell_variances
from .base import Defense, Settings, register
from .noise import NoisyTransform


IGNORE_INDEX = -100


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the positions whose logits carry loss (the label of position t is the token at t + 1)."""
    at = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    at[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return at


class LabelNoiseDefense(Settings):
    """Noise on the gradient a U-shaped client's top sends the server, which otherwise tells each example's class
    (Li et al., ICLR'22): ``marvell`` draws per-class Gaussian noise shaped to minimise the KL bound on what the server
    can infer within a power budget; ``max-norm`` lifts every example's gradient to the batch's largest norm."""

    name: Literal["label-noise"]
    method: Literal["marvell", "max-norm"] = Field(
        "marvell", description="marvell (optimised per-class noise) | max-norm (the heuristic baseline: each example's "
        "expected squared norm raised to the batch's largest)")
    power: float = Field(
        4.0, ge=0.0, description="marvell's noise budget: the expected squared noise norm per example, averaged over the "
        "two classes, in units of the squared distance between their mean gradients (0: no noise, the max-norm fallback "
        "included; max-norm ignores it)")


@register
class LabelNoise(NoisyTransform, Defense):
    """Noise on the gradient a U-shaped client's top sends the server at the top cut (training "gradients" messages),
    which otherwise tells each example's class (Li et al., ICLR'22, "Label Leakage and Protection in Two-party Split
    Learning"). An example's gradient is its row at every position the loss reaches: the positions that carry
    loss and the ones before them, whose gradient comes through the top's attention and tells the class as well
    (the positions just before the answer tell it to the label-inference attack with leak AUC 1.0 when only the loss
    positions are noised); rows are aligned at their first loss position. Positions whose gradient is zero (after
    the answer, padding) cross as they are. The client tells its chain the micro-batch's labels (the ``cut.labels``
    hint); its own top has already run its backward, so only what the server receives, and trains its trunk with,
    is noised.

    - ``max-norm``: each example gets isotropic Gaussian noise raising its expected squared norm to the batch's largest.
    - ``marvell``: the class of an example is its answer (``answer_classes``); each class gets Gaussian noise of the
      covariance ``marvell_variances`` finds for a budget of ``power``·‖Δ‖² (Δ the difference of the class-mean
      gradients; each class's own spread is its variance about its mean, per value). A micro-batch of one class
      falls back to max-norm; examples whose answer was truncated before the classes differ join the larger class.
    """

    name = "label-noise"
    perturbs = False  # it noises training gradients only: an evaluation crosses unchanged
    Settings = LabelNoiseDefense
    crosses = True

    @classmethod
    def check(cls, settings, run):
        if run.mode == "split" and run.cuts is not None and len(run.cuts) == 1:
            raise ValueError(f"defense: label-noise hides the class in the gradient a U-shaped split's client sends; "
                             f"cuts={run.cuts} make a two-part split, where the server holds the labels themselves "
                             "(label-noise needs cuts: [a, b] or auto)")

    @classmethod
    def sweep(cls, run, scale):
        """Two budgets, in a labelled U-shape (the builtin sentiment data: the label attack's own ground)."""
        if run.cuts is None or len(run.cuts) != 2 or "sentiment" not in str(run.data.source):
            return []
        return [(f"label-noise-{p:g}", {"defense": [{"name": "label-noise", "method": "marvell", "power": p}]}) for p in (4.0, 16.0)]

    def __init__(self, method: str = "marvell", power: float = 4.0, **rest):
        super().__init__()
        if rest:
            raise ChainError(f"transform 'label-noise' takes method and power, got {sorted(rest)}")
        if method not in ("marvell", "max-norm"):
            raise ChainError(f"label-noise: method must be marvell or max-norm, got {method!r}")
        if not float(power) >= 0:
            raise ChainError(f"label-noise: needs power >= 0, got {power}")
        self.method, self.power = method, float(power)
        self.last: dict[str, float] = {}  # the last noised crossing's figures (tests, reports)

    def spec(self):
        return {"name": self.name, "method": self.method, "power": self.power}

    def varies(self, role, width):
        return "the label-noise defense draws new noise for every training gradient" if role == "grad" else None

    def send(self, crossing: Crossing, end: End) -> None:
        msg = crossing.msg
        grad = msg.tensors.get("grad")
        if msg.kind != "gradients" or msg.step <= 0 or grad is None or not _activation_like("grad", grad):
            return
        if self.method == "marvell" and self.power == 0:
            return
        labels = crossing.hints.get("cut.labels")
        if labels is None or tuple(labels.shape) != tuple(grad.shape[:2]):
            got = None if labels is None else tuple(labels.shape)
            raise ChainError("label-noise needs each gradients message's labels as the 'cut.labels' hint, one per "
                             f"position of its {tuple(grad.shape[:2])} gradient, got {got}")
        labels = labels.cpu()
        at = loss_positions(labels)
        reached = (grad.detach().cpu().abs().amax(dim=-1) > 0) & at.any(dim=1, keepdim=True)
        if not bool(reached.any()):
            return
        rows, where = reached.nonzero(as_tuple=True)
        first = at.float().argmax(dim=1)  # each row's first loss position: the rows are aligned there
        k = where - first[rows]
        k = k - k.min()
        x = torch.zeros((grad.shape[0], int(k.max()) + 1, grad.shape[2]))
        x[rows, k] = grad.detach().cpu().float()[rows, where]
        present = torch.zeros(x.shape[:2], dtype=torch.bool)
        present[rows, k] = True
        answers = [labels[r, 1:][at[r, :-1]].tolist() for r in range(labels.shape[0])]
        noise = self._noise(x, present, answers, self.generator(msg.step, msg.micro))
        out = grad.detach().float().clone()
        out[rows.to(grad.device), where.to(grad.device)] += noise[rows, k].to(grad.device)
        msg.tensors["grad"] = out.to(grad.dtype)

    def _noise(self, x: torch.Tensor, present: torch.Tensor, answers: list[list[int]], gen: torch.Generator) -> torch.Tensor:
        """Noise [B, K, width] for the answers' gradients ``x`` (zero where ``present`` is False)."""
        z = torch.randn(x.shape, generator=gen)
        mask = present[..., None].float()
        classes = answer_classes(answers) if self.method == "marvell" else None
        has = [bool(present[i].any()) for i in range(len(answers))]
        if classes is not None:
            decided = [c for c, h in zip(classes, has) if c is not None and h]
            if len(set(decided)) == 2:
                larger = int(sum(decided) * 2 >= len(decided))
                members = torch.tensor([(larger if c is None else c) if h else -1 for c, h in zip(classes, has)])
                return self._marvell(x, mask, members, z) * mask
        sq = (x ** 2).sum(dim=(1, 2), dtype=torch.float64)
        values = mask.sum(dim=(1, 2), dtype=torch.float64) * x.shape[2]
        std = ((sq.max() - sq).clamp_min(0) / values.clamp_min(1)).sqrt()
        self.last = {"method": "max-norm", "max_sq_norm": float(sq.max())}
        return z * std.float()[:, None, None] * mask

    def _marvell(self, x: torch.Tensor, mask: torch.Tensor, members: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-class noise of the covariance ``marvell_variances`` finds (``members``: each row's class, −1 none)."""
        means, spread = [], []
        for c in (0, 1):
            rows = members == c
            m = mask[rows]
            mean = (x[rows] * m).sum(0, dtype=torch.float64) / m.sum(0, dtype=torch.float64).clamp_min(1)
            means.append(mean)
            spread.append(float((((x[rows] - mean) * m) ** 2).sum() / (m.sum(dtype=torch.float64) * x.shape[2])))
        delta = means[1] - means[0]
        gap = float((delta ** 2).sum())
        if gap == 0:
            return torch.zeros_like(x)
        unit = (delta / gap ** 0.5).float()
        p = float((members == 1).sum()) / float((members >= 0).sum())
        (a0, c0, a1, c1), kl = marvell_variances(spread[0] / gap, spread[1] / gap, delta.numel(), p, self.power)
        self.last = {"method": "marvell", "sum_kl": kl, "gap": gap, "p": p, "along0": a0, "across0": c0,
                     "along1": a1, "across1": c1}
        along = torch.tensor([(a0, a1)[c] * gap if c >= 0 else 0.0 for c in members.tolist()])
        across = torch.tensor([(c0, c1)[c] * gap if c >= 0 else 0.0 for c in members.tolist()])
        proj = (z * unit).sum(dim=(1, 2))
        return across.sqrt()[:, None, None] * z + ((along.sqrt() - across.sqrt()) * proj)[:, None, None] * unit
