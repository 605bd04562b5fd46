"""The chain's defense slot: transforms that change what leaves the client before padding removal and the codec.

A defense runs on the client's sending end only; the server's end builds the same transform from the agreed
terms (so it knows what it receives, as an attacker would) and undoes nothing. Its noise comes from a secret
that never leaves the client (``Chain(secret=...)``): the terms carry the defense's parameters, never a seed.
A training crossing draws from (secret, step, micro-batch), so its noise does not depend on how many evaluations
came before (in-process and deployed runs route evaluations differently) and a resumed run draws the same;
evaluation crossings, which have no such key, draw from (secret, evaluation crossing number), a count kept in
the transform's checkpointed state.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

from ..dpmath.mechanisms import answer_classes, clip_pullback, clip_rows, gaussian_noise, marvell_variances
from .transforms import ChainError, Crossing, End, Transform, _activation_like, register


def noise_generator(secret: int, label: str, count: int) -> torch.Generator:
    """A generator for crossing ``count`` of the stream ``label``, seeded by a hash of the client's secret."""
    digest = hashlib.blake2b(f"{secret}:{label}:{count}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class NoiseStream:
    """One defense's noise on one client: training draws keyed by (step, micro-batch), evaluation draws by a count
    (their only state, checkpointed). Every defense draws through one, in the chain or inside the client."""

    def __init__(self, secret: int, label: str):
        self.secret, self.label, self.count = int(secret), label, 0

    def draw(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator of training ``step`` and ``micro``-batch (step 0: the next evaluation draw)."""
        if step > 0:
            return noise_generator(self.secret, f"{self.label}:train:{step}", micro)
        self.count += 1
        return noise_generator(self.secret, f"{self.label}:eval", self.count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([self.count], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "count" in state:
            self.count = int(state["count"][0])


class Defense(Transform):
    """A transform of the defense slot: draws its noise from the stream of the bound secret."""

    def __init__(self):
        self.stream: NoiseStream | None = None

    def bind(self, secret: int | None, label: str) -> None:
        """The sending end's secret (None: a fresh random one, for tools that never resume) and stream label."""
        self.stream = NoiseStream(secrets.randbits(63) if secret is None else secret, label)

    def generator(self, step: int, micro: int) -> torch.Generator:
        if self.stream is None:
            raise ChainError(f"the {self.name!r} defense draws noise only on the client's end, which binds its secret")
        return self.stream.draw(step, micro)

    def state_dict(self):
        return self.stream.state_dict() if self.stream is not None else {}

    def load_state_dict(self, state):
        if self.stream is not None:
            self.stream.load_state_dict(state)


@register
class GaussianDefense(Defense):
    """Each token's activation row clipped to L2 norm ``clip``, plus N(0, (sigma·clip)²) per value, on every crossing
    of the smashed activations (training and evaluation: each is a release). The client's own backward goes
    through the clipping: the gradient that comes back for a micro-batch is pulled back through the clip's
    Jacobian (``End.pullbacks``), so training follows the function that was actually released."""

    name = "gaussian"

    def __init__(self, sigma: float, clip: float, delta: float = 1e-5, **rest):
        super().__init__()
        if rest:
            raise ChainError(f"transform 'gaussian' takes sigma, clip and delta, got {sorted(rest)}")
        if not (float(sigma) >= 0 and float(clip) > 0 and 0 < float(delta) < 1):
            raise ChainError(f"gaussian: needs sigma >= 0, clip > 0 and 0 < delta < 1, got sigma={sigma}, clip={clip}, delta={delta}")
        self.sigma, self.clip, self.delta = float(sigma), float(clip), float(delta)

    def spec(self):
        return {"name": self.name, "sigma": self.sigma, "clip": self.clip, "delta": self.delta}

    def varies(self, role, width):
        return "the gaussian defense draws new noise at every crossing" if role == "hidden" else None

    def send(self, crossing: Crossing, end: End) -> None:
        msg = crossing.msg
        x = msg.tensors.get("hidden")
        if x is None or not _activation_like("hidden", x):
            return
        clipped, scale = clip_rows(x, self.clip)
        noise = gaussian_noise(tuple(x.shape), self.sigma * self.clip, self.generator(msg.step, msg.micro)) if self.sigma > 0 else None
        msg.tensors["hidden"] = clipped if noise is None else (clipped.float() + noise.to(x.device)).to(x.dtype)
        if msg.step > 0:
            for key in [k for k in end.pullbacks if 0 < k[0] < msg.step]:  # replies that never came (a frozen bottom)
                del end.pullbacks[key]
            if bool((scale < 1).any()):
                end.pullbacks[(msg.step, msg.micro)] = lambda g, x=x, scale=scale: clip_pullback(x, scale.to(g.device), g)


IGNORE_INDEX = -100


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the positions whose logits carry loss (the label of position t is the token at t + 1)."""
    at = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    at[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return at


@register
class LabelNoiseDefense(Defense):
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
