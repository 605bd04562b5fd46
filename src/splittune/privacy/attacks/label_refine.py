"""The labels behind a top-cut gradient, refined by using that each label is a vocabulary row (``gradient-labels``).

Through a top with blocks, g = Bᵀe (Bᵀ the blocks' vjp) is ill-conditioned: CGLS stalls near a relative residual of
1e-3..1e-2 whatever the precision, leaving e 20–50% wrong at many positions, and a confident position (p_y ≈ 1: a
tiny e) is then decoded wrongly. But e is not any vector: at a position with loss it is s·Jᵀ Wᵀ(p − e_y), one of V
known directions (J the final norm's Jacobian, W the head, s = 1/N for the whole step). So:

1. the positions whose solved e that form explains (cosine > ½, the common scale within a factor 2) keep their
   label, and their exact e is rebuilt from it, unless the exact gradient of those labels, Bᵀe, differs from g
   there by more than ``tol`` (a wrong label that the solve's error happened to explain);
2. for each other position, e is solved again with the settled positions held exact (a small, better-conditioned
   system), and a few candidate labels (the per-position test's best on that e and on the first, and the
   model's own most likely next tokens, which is where a confident position's label is) each give one column
   Bᵀ(s·d_{t,c}); the residual g − Bᵀe_kept is fitted by least squares over those columns, and each position takes
   the candidate with the largest weight (none above ½: no loss there, e.g. a prompt position);
3. repeat with the new labels: what is right now fits exactly, what is still unexplained gets another try.

The solve is then a small well-posed least-squares problem over candidates instead of a d·T-dimensional one.
"""

from __future__ import annotations

import torch


def directions(norm: torch.nn.Module, head: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T, k, d]: Jᵀ Wᵀ(p − e_c) at each position t of the norm's input ``x`` [T, d], for ``labels`` [T, k]."""
    f = lambda v: norm(v[None])[0]  # noqa: E731
    with torch.enable_grad():
        J = torch.func.vmap(torch.func.jacrev(f))(x)  # [T, d_out, d_in]
    p = torch.softmax(norm(x) @ head.T, -1)
    a = torch.einsum("tij,ti->tj", J, p @ head)
    u = torch.einsum("tij,tki->tkj", J, head[labels.clamp_min(0)])
    return a[:, None] - u


def explained(e: torch.Tensor, d: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Which positions' ``e`` [T, d] the structured ``d`` [T, d] explains (same direction, the common scale within a
    factor 2), that scale s, and the median cosine over them (near 1 for a real solve, near ½ for noise)."""
    dot, dd = (e * d).sum(-1), (d * d).sum(-1).clamp_min(1e-300)
    cos = dot / (e.norm(dim=-1) * dd.sqrt()).clamp_min(1e-300)
    fits = where & (cos > 0.5)
    if not fits.any():
        return fits, 0.0, 0.0
    s = float(dot[fits].sum() / dd[fits].sum())
    ratio = dot / dd / s
    keep = fits & (ratio > 0.5) & (ratio < 2)
    return keep, s, float(cos[keep].median()) if keep.any() else 0.0


@torch.no_grad()
def refine_row(op, norm: torch.nn.Module, head: torch.Tensor, e: torch.Tensor, g: torch.Tensor, where: torch.Tensor,
               candidates: torch.Tensor, rounds: int, solve, decode, max_columns: int = 512,
               tol: float = 1e-2) -> tuple[torch.Tensor, dict]:
    """Labels [T] of one row from its solved ``e`` [T, d], the gradient ``g`` [T, d] it answers, the loss positions
    ``where`` [T] and ``candidates`` [T, k] (best first); ``op`` is the row's :class:`RowOperator`, ``solve(b, only)``
    solves Bᵀe = b for e at positions ``only``, ``decode(x, e)`` ranks candidate labels [P, k]. A position is
    settled when the labels' exact gradient matches g there within ``tol`` (relative to the row's typical norm)."""
    x = op.x[0]
    pool = torch.cat([candidates.clamp_min(0), (norm(x) @ head.T).topk(candidates.shape[1], -1).indices], dim=1)
    labels = candidates[:, 0].clone()
    d = directions(norm, head, x, labels[:, None])[:, 0]
    active, s, agree = explained(e, d, where)  # the positions believed to carry these labels
    info: dict = {"rounds": 0, "unexplained": [int((where & ~active).sum())]}
    if s == 0.0 or agree < 0.8:  # what it explains, it explains loosely: no anchor (noise, not a gradient)
        return labels, info
    scale = g.norm(dim=-1).clamp_min(g.norm(dim=-1)[where].median() if where.any() else 1e-30)
    model = op.At(torch.where(active[:, None], d, 0.0)[None])[0]
    s = float((model * g).sum() / (model * model).sum().clamp_min(1e-300))  # the scale refitted where it is exact: g
    off = (g - s * model).norm(dim=-1)
    # first the unexplained positions; when the solved e seemed to explain every one, the exact gradient of the
    # kept labels says where one is still wrong (later rounds ask it every time)
    todo = where & ~active
    if not todo.any():
        todo = where & (off > tol * scale)
    info["unexplained"].append(int(todo.sum()))
    for _ in range(rounds):
        order = todo.nonzero().flatten()
        if order.numel() == 0:
            break
        info["rounds"] += 1
        order = order[off[order].argsort(descending=True)][: max(max_columns // (2 * pool.shape[1] + 1), 1)]
        examined = torch.zeros_like(where)
        examined[order] = True
        base = torch.where((active & ~examined)[:, None], s * d, 0.0)
        resid = g - op.At(base[None])[0]
        # with the settled positions exact, e at the others is a small system: solve it, rank their labels afresh
        local = solve(resid, examined)
        fresh = decode(x[order], local[order])
        cols, owners = [], []
        for i, t in enumerate(order.tolist()):
            options = torch.unique(torch.cat([labels[t:t + 1], pool[t], fresh[i]]).clamp_min(0))
            for c, dc in zip(options.tolist(), directions(norm, head, x[t:t + 1], options[None])[0]):
                placed = torch.zeros_like(e)
                placed[t] = s * dc
                cols.append(op.At(placed[None])[0].flatten())
                owners.append((t, c))
        alpha = torch.linalg.lstsq(torch.stack(cols, 1), resid.flatten()[:, None]).solution[:, 0]
        for t in order.tolist():
            weight, c = max((float(alpha[j]), c) for j, (tt, c) in enumerate(owners) if tt == t)
            active[t] = weight >= 0.5  # below: no loss there (a prompt position), or no candidate fits
            if weight >= 0.5:
                labels[t] = c
        d = directions(norm, head, x, labels[:, None])[:, 0]
        model = op.At(torch.where(active[:, None], d, 0.0)[None])[0]
        s = float((model * g).sum() / (model * model).sum().clamp_min(1e-300))  # the one scale 1/N, fitted in g's space
        off = (g - s * model).norm(dim=-1)
        todo = where & (off > tol * scale)
        info["unexplained"].append(int(todo.sum()))
    return labels, info
