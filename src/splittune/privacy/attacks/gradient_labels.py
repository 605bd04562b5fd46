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



class GradientLabelsOptions(Options):
    method: Literal["auto", "linear", "matching"] = Field(
        "auto", description="linear: invert the top blocks' vjp, then the exact per-position test; matching: BiSR(b) "
        "gradient matching started from the linear estimate; auto: linear")
    match_steps: int = Field(100, ge=0, description="Adam steps of the gradient matching, per micro-batch")
    solve_iters: int = Field(300, ge=0, description="CGLS iterations that invert the top blocks' vjp (per row)")
    solve_tol: float = Field(1e-6, gt=0, description="relative residual at which the inversion stops")
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


def norm_head(public: PublicKnowledge):
    """The pretrained final norm and the head weight [V, d] (the post modules of the last block's segment)."""
    seg = public.segment(public.spec.n_blocks - 1, public.spec.n_blocks)
    return seg.module(seg.spec.post[0]), seg.model.get_output_embeddings().weight.detach().float()


@torch.no_grad()
def linear_labels(norm: torch.nn.Module, head: torch.Tensor, h: torch.Tensor, g: torch.Tensor, vocab: int | None = None,
                  tol: float = 1e-4, chunk: int = 32) -> torch.Tensor:
    """The exact per-position label test for a norm + head top: positions [P, d] of the norm's input ``h`` and the
    gradient ``g`` there -> the token v whose u_v = Jᵀ W_vᵀ leaves a − u_v most nearly parallel to g (a = Jᵀ Wᵀ p,
    J the norm's Jacobian at h); -1 where g is 0. Scale-free: N is never needed.

    ‖d_v‖² − (d_v·ĝ)², d_v = a − u_v, needs u_v·x = W_v (J x) and ‖u_v‖² = W_v J Jᵀ W_vᵀ; for a norm
    J = diag(γ) K with K Kᵀ = λ I + (a few rank-one terms), so ‖u_v‖² = λ‖γW_v‖² + Σ_j (μ_j − λ)(γW_v·e_j)²:
    O(V·d) per position, never V·d²."""
    W = (head[:vocab] if vocab else head).float()
    gamma = getattr(norm, "weight", None)
    gamma = torch.ones(h.shape[-1]) if gamma is None else gamma.detach().float()
    Wg = W * gamma
    sq = (Wg * Wg).sum(1)
    out = torch.full((h.shape[0],), -1, dtype=torch.long)
    f = lambda v: norm(v[None])[0].float()  # noqa: E731
    for idx in (g != 0).any(-1).nonzero().flatten().split(chunk):
        x, gi = h[idx].float(), g[idx].float()
        J = torch.func.vmap(torch.func.jacrev(f))(x)  # [c, d_out, d_in]
        p = torch.softmax(norm(x).float() @ W.T, -1)
        a = torch.einsum("cij,ci->cj", J, p @ W)
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
        out[idx] = (dd - dg * dg).argmin(-1)
    return out


def invert_blocks(top, h: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, iters: int, tol: float):
    """The gradient e at the final norm's input from g = Bᵀ e, Bᵀ the top blocks' vjp (square; causal, so rows never
    mix): CGLS on each row, Bᵀ by backward and B by double backward (GMRES, Bᵀ alone, stalls: Bᵀ is far from
    normal). Returns e, the norm's input x and the worst relative residual ‖Bᵀe − g‖/‖g‖."""
    norm, box = top.module(top.spec.post[0]), {}
    hook = norm.register_forward_pre_hook(lambda module, args: box.__setitem__("x", args[0]))
    e, worst = torch.zeros_like(g), 0.0
    for row in range(g.shape[0]):
        hr = h[row:row + 1].detach().requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            top(mask[row:row + 1], hidden=hr)
            x = box["x"]
            u = torch.zeros_like(x, requires_grad=True)
            w = torch.autograd.grad(x, hr, u, create_graph=True)[0]
        A = lambda v: torch.autograd.grad(x, hr, v, retain_graph=True)[0]  # noqa: E731  (Bᵀ v)
        At = lambda v: torch.autograd.grad(w, u, v, retain_graph=True)[0]  # noqa: E731  (B v)
        b = g[row:row + 1]
        er = b.clone()
        r = b - A(er)
        s = At(r)
        p, gamma, bn = s.clone(), (s * s).sum(), b.norm().clamp_min(1e-30)
        for _ in range(iters):
            if r.norm() <= tol * bn:
                break
            q = A(p)
            alpha = gamma / (q * q).sum()
            er, r = er + alpha * p, r - alpha * q
            s = At(r)
            new = (s * s).sum()
            p, gamma = s + (new / gamma) * p, new
        e[row], box[row] = er[0].detach(), x[0].detach()
        worst = max(worst, float(r.norm() / bn))
    hook.remove()
    return e, torch.stack([box[r] for r in range(g.shape[0])]), worst


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
        the top's blocks), then the exact per-position test."""
        residual = 0.0
        if top is not None:
            g, h, residual = invert_blocks(top, h, mask, g, self.options.solve_iters, self.options.solve_tol)
            g = torch.where(g.norm(dim=-1, keepdim=True) > 1e-6 * g.norm(dim=-1).max(), g, 0.0)
        tokens = linear_labels(norm, head, h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]), vocab)
        return tokens.view(mask.shape), {"solve_residual": residual}

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
        top = public.segment(cut, n) if cut < n else None
        norm, head = (top.module(top.spec.post[0]), top.model.get_output_embeddings().weight.detach().float()) \
            if top is not None else norm_head(public)
        recovery = Recovery(self.name, self.target, info={"method": method, "cut": cut, "codec": transform.codec, "fits": []})
        torch.manual_seed(o.seed)
        for k, (grad_rec, sent, mask) in enumerate(obs):
            g, h = grad_rec.tensor("grad").float(), transform(sent.tensor("hidden"))
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
