"""Label (= text) recovery from the gradient the client's top returns in the U-shaped split: BiSR(b) (Chen et al.,
CCS'24, arXiv 2409.00960, research/privacy.md §2.3) and its analytic one-position form (§2.5).

The server sent the trunk output h and receives g = dL/dh. With the *pretrained* top (public; the client's top
adapters stay "not too far" from it) the top is a fixed function of h, and for the shifted cross-entropy

    g = s · Lᵀ (P − Y),    P = softmax(top(h)),  Y the one-hot next tokens,  s = 1/N (loss tokens of the step),

where Lᵀ is the top's vector-Jacobian product from logits to h: g is *linear* in the labels Y. In causal-LM
fine-tuning the labels are the text itself.

- ``linear`` (default): with blocks in the top, first g = Bᵀ e is inverted for e, the gradient at the final
  norm's input (Bᵀ the blocks' vjp: square, causal so rows never mix; CGLS). Then position t alone: a − u_y = N e_t
  with a = Jᵀ Wᵀ P_t and u_v = Jᵀ W_vᵀ (J the norm's Jacobian), so the label is the row leaving a − u_v most nearly
  parallel to e_t: exact, scale-free (N never needed), O(V·d) per position (the norm's J Jᵀ is diagonal plus low
  rank). Exact up to the client's drift from the pretrained top and the inversion's residual.
- ``matching`` (BiSR(b), tops with blocks): soft labels Y = softmax(Z) and the scale s fitted by Adam to
  ‖s·Lᵀ(P − Y) − g‖² (+ L1, TAG), the vjp by autograd with ``create_graph``, started from the linear estimate and
  N̂ counted from the step's attention masks.

Decode: argmax per position; -1 where position t carries no loss (padding, the last position, a zero gradient).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..knowledge import PublicKnowledge
from ...taps.tap import Tap
from .base import Attack, AttackError, Options, Progress, Recovered, Recovery, observed, register, wire_transform
from .label_refine import refine_row



class GradientLabelsOptions(Options):
    method: Literal["auto", "linear", "matching"] = Field(
        "auto", description="linear: invert the top blocks' vjp, then the exact per-position test; matching: BiSR(b) "
        "gradient matching started from the linear estimate; auto: linear")
    match_steps: int = Field(100, ge=0, description="Adam steps of the gradient matching, per micro-batch")
    solve_iters: int = Field(300, ge=0, description="CGLS iterations that invert the top blocks' vjp (per row)")
    solve_tol: float = Field(1e-10, gt=0, description="relative residual at which the inversion stops")
    refine: int = Field(3, ge=0, description="rounds that keep the labels whose structured e explains the solved one and "
                        "fit the rest by least squares over candidate labels (a label is a vocabulary row); 0: the plain solve")
    candidates: int = Field(8, ge=1, description="candidate labels per unexplained position, from the per-position test "
                            "and as many from the model's own next-token guess")
    precision: Literal["float64", "float32"] = Field("float64", description="the pretrained top, the solve and the "
                                                     "per-position test in float64 (float32: the former solve, which "
                                                     "stalls near a relative residual of 1e-2 through a block)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the label logits")
    l1: float = Field(0.0, ge=0, description="weight of the L1 gradient distance (TAG) next to the squared one")
    init_prob: float = Field(0.9, ge=0, lt=1, description="matching starts its soft labels with this probability on "
                             "the linear estimate (0: from uniform, TAG*)")
    steps: list[int] | None = Field(None, description="training steps to attack (default: all recorded)")
    seed: int = Field(0, description="seeds the optimiser's run (the attack is otherwise deterministic)")




def observations(tap: Tap, steps: list[int] | None):
    """Each training gradient the server received, with the trunk output it answers and that micro-batch's mask."""
    sent, masks, out = {}, {}, []
    for record in tap.records():
        key = (record.session, record.step, record.micro)
        if record.dropped:
            continue
        if record.kind == "activations" and record.direction == "down":
            sent[key] = record
        elif record.kind == "activations" and record.direction == "up" and record.meta.get("train") is True:
            masks[key] = record
    for record in observed(tap, "gradients", "up", steps=steps):
        key = (record.session, record.step, record.micro)
        if "grad" in record.entries and key in sent and key in masks:
            out.append((record, sent[key], masks[key].tensor("attention_mask")))
    if not out:
        raise AttackError(f"the tap in {tap.folder} holds no training gradient from the client's top with the trunk "
                          "output it answers" + (f" at steps {steps}" if steps else ""))
    return out


def loss_positions(mask: torch.Tensor) -> torch.Tensor:
    """Where position t can carry a label: t and t + 1 attended (the label of t is the token at t + 1)."""
    where = torch.zeros_like(mask, dtype=torch.bool)
    where[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    return where


def norm_head(public: PublicKnowledge, dtype: torch.dtype = torch.float32):
    """The pretrained final norm and the head weight [V, d] (the post modules of the last block's segment)."""
    seg = public.segment(public.spec.n_blocks - 1, public.spec.n_blocks, dtype)
    return seg.module(seg.spec.post[0]), seg.model.get_output_embeddings().weight.detach()


@torch.no_grad()
def linear_labels(norm: torch.nn.Module, head: torch.Tensor, h: torch.Tensor, g: torch.Tensor, vocab: int | None = None,
                  tol: float = 1e-4, chunk: int = 32, top: int | None = None) -> torch.Tensor:
    """The exact per-position label test for a norm + head top: positions [P, d] of the norm's input ``h`` and the
    gradient ``g`` there -> the token v whose u_v = Jᵀ W_vᵀ leaves a − u_v most nearly parallel to g (a = Jᵀ Wᵀ p,
    J the norm's Jacobian at h); -1 where g is 0. Scale-free: N is never needed. ``top``: the ``top`` best tokens
    per position [P, top], best first, instead.

    ‖d_v‖² − (d_v·ĝ)², d_v = a − u_v, needs u_v·x = W_v (J x) and ‖u_v‖² = W_v J Jᵀ W_vᵀ; for a norm
    J = diag(γ) K with K Kᵀ = λ I + (a few rank-one terms), so ‖u_v‖² = λ‖γW_v‖² + Σ_j (μ_j − λ)(γW_v·e_j)²:
    O(V·d) per position, never V·d²."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32  # float64: no cancellation in ‖a − u_v‖²
    full = head.to(dt)  # the softmax runs over every row of the head; only tokenizer ids are candidates
    W = full[:vocab] if vocab else full
    gamma = getattr(norm, "weight", None)
    gamma = torch.ones(h.shape[-1], dtype=dt) if gamma is None else gamma.detach().to(dt)
    Wg = W * gamma
    sq = (Wg * Wg).sum(1)
    out = torch.full((h.shape[0],) + ((top,) if top else ()), -1, dtype=torch.long)
    f = lambda v: norm(v[None])[0].to(dt)  # noqa: E731
    for idx in (g != 0).any(-1).nonzero().flatten().split(chunk):
        x, gi = h[idx].to(dt), g[idx].to(dt)
        J = torch.func.vmap(torch.func.jacrev(f))(x)  # [c, d_out, d_in]
        p = torch.softmax(norm(x).to(dt) @ full.T, -1)
        a = torch.einsum("cij,ci->cj", J, p @ full)
        gh = gi / gi.norm(dim=-1, keepdim=True)
        K = J / gamma[None, :, None]
        mu, E = torch.linalg.eigh(K @ K.transpose(1, 2))
        lam = mu.median(-1, keepdim=True).values
        dev = torch.where((mu - lam).abs() > tol * lam.abs().clamp_min(1e-12), mu - lam, 0.0)
        k = max(int((dev != 0).sum(-1).max()), 1)
        order = dev.abs().argsort(-1, descending=True)[:, :k]
        proj = torch.einsum("vd,cdk->cvk", Wg, torch.gather(E, 2, order[:, None, :].expand(-1, E.shape[1], -1)))
        uu = lam * sq + (proj * proj * torch.gather(dev, 1, order)[:, None, :]).sum(-1)
        ua = torch.einsum("cij,cj->ci", J, a) @ W.T
        ug = torch.einsum("cij,cj->ci", J, gh) @ W.T
        dd = (a * a).sum(-1, keepdim=True).double() - 2 * ua.double() + uu.double()  # ‖a − u_v‖²
        dg = (a * gh).sum(-1, keepdim=True).double() - ug.double()  # (a − u_v)·ĝ
        miss = dd - dg * dg
        out[idx] = miss.topk(top, -1, largest=False).indices if top else miss.argmin(-1)
    return out


class RowOperator:
    """The top blocks' vjp for one row as a linear operator: ``At(e)`` = Bᵀe (a backward) and ``A(v)`` = Bv (a double
    backward); ``x`` is the final norm's input there (causal: rows never mix)."""

    def __init__(self, top, h: torch.Tensor, mask: torch.Tensor):
        norm, box = top.module(top.spec.post[0]), {}
        hook = norm.register_forward_pre_hook(lambda module, args: box.__setitem__("x", args[0]))
        try:
            self.h = h.detach().requires_grad_(True)
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
                top(mask, hidden=self.h)
                self.x_graph = box["x"]
                self.u = torch.zeros_like(self.x_graph, requires_grad=True)
                self.w = torch.autograd.grad(self.x_graph, self.h, self.u, create_graph=True)[0]
        finally:
            hook.remove()
        self.x = self.x_graph.detach()

    def At(self, e: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.x_graph, self.h, e, retain_graph=True)[0]

    def A(self, v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.w, self.u, v, retain_graph=True)[0]


def cgls(op: RowOperator, b: torch.Tensor, start: torch.Tensor, iters: int, tol: float,
         only: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """CGLS on Bᵀe = b from ``start`` (GMRES, Bᵀ alone, stalls: Bᵀ is far from normal); e and ‖Bᵀe − b‖/‖b‖.
    ``only`` [T]: e changes at those positions alone (a smaller, better-conditioned system)."""
    e = start.clone()
    r = b - op.At(e)
    A = op.A if only is None else (lambda v: op.A(v) * only[None, :, None])  # noqa: E731
    s = A(r)
    p, gamma, bn = s.clone(), (s * s).sum(), b.norm().clamp_min(1e-30)
    for _ in range(iters):
        if r.norm() <= tol * bn or gamma == 0:
            break
        q = op.At(p)
        alpha = gamma / (q * q).sum()
        e, r = e + alpha * p, r - alpha * q
        s = A(r)
        new = (s * s).sum()
        p, gamma = s + (new / gamma) * p, new
    return e.detach(), float(r.norm() / bn)


def invert_blocks(top, h: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, iters: int, tol: float):
    """The gradient e at the final norm's input from g = Bᵀ e, Bᵀ the top blocks' vjp (square; causal, so rows never
    mix): CGLS on each row. Returns e, the norm's input x, the worst relative residual ‖Bᵀe − g‖/‖g‖ and the
    rows' operators (for refinement)."""
    e, xs, ops, worst = torch.zeros_like(g), [], [], 0.0
    for row in range(g.shape[0]):
        op = RowOperator(top, h[row:row + 1], mask[row:row + 1])
        er, res = cgls(op, g[row:row + 1], torch.zeros_like(g[row:row + 1]), iters, tol)
        e[row] = er[0]
        xs.append(op.x[0])
        ops.append(op)
        worst = max(worst, res)
    return e, torch.stack(xs), worst, ops


@register
class GradientLabels(Attack):
    name = "gradient-labels"
    observer = "server"
    shapes = ("u-shape",)
    target = "labels"
    summary = "BiSR(b): the labels (the next tokens) fitted so the pretrained top's gradient matches the one returned"
    Options = GradientLabelsOptions

    def linear(self, top, norm, head, h, mask, g, vocab: int) -> tuple[torch.Tensor, dict]:
        """Labels [B, T] by the linear route: the gradient at the norm's input (g itself, or Bᵀe = g solved through
        the top's blocks), then the exact per-position test. With blocks, ``refine`` rounds use that the label is a
        vocabulary row (``label_refine.py``): the solve's residual no longer decides a confident position's label."""
        o = self.options
        fit: dict = {"solve_residual": 0.0}
        if top is None:
            tokens = linear_labels(norm, head, h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]), vocab)
            return tokens.view(mask.shape), fit
        e, x, fit["solve_residual"], ops = invert_blocks(top, h, mask, g, o.solve_iters, o.solve_tol)
        e = torch.where(e.norm(dim=-1, keepdim=True) > 1e-6 * e.norm(dim=-1).max(), e, 0.0)
        flat = linear_labels(norm, head, x.reshape(-1, x.shape[-1]), e.reshape(-1, e.shape[-1]), vocab,
                             top=o.candidates if o.refine else None)
        if not o.refine:
            return flat.view(mask.shape), fit
        candidates = flat.view(*mask.shape, o.candidates)
        tokens, where, rounds = candidates[..., 0].clone(), loss_positions(mask), []
        decode = lambda x, e: linear_labels(norm, head, x, e, vocab, top=o.candidates)  # noqa: E731
        for r, op in enumerate(ops):
            solve = lambda b, only, op=op: cgls(op, b[None], torch.zeros_like(b[None]), o.solve_iters, o.solve_tol, only)[0][0]  # noqa: E731
            tokens[r], info = refine_row(op, norm, head, e[r], g[r], where[r], candidates[r], o.refine, solve, decode)
            rounds.append(info)
        fit["refined"] = rounds
        return tokens, fit

    def matching(self, top, h: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, n_items: int, vocab: int,
                 init: torch.Tensor, progress: Progress, what: str) -> tuple[torch.Tensor, dict]:
        """BiSR(b) on one micro-batch: soft labels Y = softmax(Z) and a scale s fitted so that s·Lᵀ(P − Y) ≈ g,
        Z starting with ``init_prob`` on the linear estimate ``init``."""
        o = self.options
        h = h.detach().requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            logits = top(mask, hidden=h).float()
        where = loss_positions(mask).float()[..., None]
        P = torch.softmax(logits.detach(), -1)
        vjp = lambda c: torch.autograd.grad(logits, h, grad_outputs=c, create_graph=True, retain_graph=True)[0]  # noqa: E731
        Z = torch.zeros_like(logits)
        Z[..., vocab:] = -math.inf  # ids the tokenizer never produces
        lift = math.log(o.init_prob / (1 - o.init_prob) * (vocab - 1)) if o.init_prob > 0 else 0.0
        Z.scatter_add_(-1, init.clamp_min(0)[..., None], torch.full(init.shape + (1,), lift))
        Z.requires_grad_(True)
        log_s = torch.tensor(-math.log(n_items), requires_grad=True)
        opt = torch.optim.Adam([{"params": [Z], "lr": o.lr}, {"params": [log_s], "lr": 0.01}])
        gn2, gn1 = (g * g).sum(), g.abs().sum()
        losses = []
        for i in range(o.match_steps):
            with torch.enable_grad():
                delta = log_s.exp() * vjp(where * (P - torch.softmax(Z, -1))) - g
                loss = (delta * delta).sum() / gn2 + (o.l1 * delta.abs().sum() / gn1 if o.l1 else 0)
                opt.zero_grad()
                loss.backward(inputs=[Z, log_s])
            opt.step()
            losses.append(float(loss.detach()))
            progress(i + 1, o.match_steps, what)
        return Z.detach().argmax(-1), {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                                       "scale_n": float((-log_s.detach()).exp())}

    def recover(self, tap: Tap, public: PublicKnowledge, progress: Progress) -> Recovery:
        o = self.options
        cut, n = int(tap.proposal()["cuts"][-1]), public.spec.n_blocks
        method = o.method if o.method != "auto" else "linear"
        if method == "matching" and cut >= n:
            raise AttackError(f"attack {self.name}: method matching needs a top with blocks; this run's top is the final "
                              "norm and head only (use method linear)")
        obs = observations(tap, o.steps)
        items_of = defaultdict(int)  # N̂: the loss tokens of each step, counted from its micro-batches' masks
        for grad_rec, _, mask in obs:
            items_of[(grad_rec.session, grad_rec.step)] += int(loss_positions(mask).sum())
        vocab = min(len(public.tokenizer), public.vocab)
        transform = wire_transform(tap, "down")
        dtype = torch.float64 if o.precision == "float64" else torch.float32
        top = public.segment(cut, n, dtype) if cut < n else None
        norm, head = (top.module(top.spec.post[0]), top.model.get_output_embeddings().weight.detach()) \
            if top is not None else norm_head(public, dtype)
        recovery = Recovery(self.name, self.target, info={"method": method, "cut": cut, "codec": transform.codec, "fits": []})
        torch.manual_seed(o.seed)
        for k, (grad_rec, sent, mask) in enumerate(obs):
            g, h = grad_rec.tensor("grad").to(dtype), transform(sent.tensor("hidden")).to(dtype)
            what = f"{self.name}: step {grad_rec.step} micro {grad_rec.micro} ({k + 1}/{len(obs)})"
            tokens, fit = self.linear(top, norm, head, h, mask, g, vocab)
            if method == "matching":
                tokens, more = self.matching(top, h, mask, g, max(items_of[(grad_rec.session, grad_rec.step)], 1), vocab,
                                             tokens, progress, what)
                fit.update(more)
            progress(k + 1, len(obs), what)
            recovery.info["fits"].append({"step": grad_rec.step, "micro": grad_rec.micro, **fit})
            recovery.items.append(Recovered(grad_rec.session, grad_rec.step, grad_rec.micro, list(range(g.shape[0])),
                                            tokens=torch.where(loss_positions(mask), tokens, -1)))
        return recovery
