"""Loss curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(metrics: list[dict], evals: list[dict], out: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    clients = sorted({m.get("client", 0) for m in metrics})
    for c in clients:  # one train curve per client (steps are each client's own)
        rows = [m for m in metrics if m.get("client", 0) == c]
        label = "train loss" if len(clients) == 1 else f"train loss, client {c}"
        ax.plot([m["step"] for m in rows], [m["loss"] for m in rows], label=label, lw=1.2, alpha=1.0 if len(clients) == 1 else 0.7)
    if evals:
        label = "eval loss" if len(clients) == 1 else "eval loss, global model"
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label=label, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_compare(curves: dict[str, list[dict]], out: Path, title: str) -> Path:
    """Eval loss against examples seen, and against bytes on the wire (runs that send none are left out)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    styles = ["o-", "s--", "^-.", "D:", "v-"]  # equal runs (sfl-v1 and federated are one algorithm) overlap visibly
    for k, (name, points) in enumerate(curves.items()):
        style = dict(color=f"C{k}", lw=1.6, ms=5 - k * 0.5, label=name)
        left.plot([p["examples"] for p in points], [p["loss"] for p in points], styles[k % len(styles)], **style)
        if any(p["bytes"] for p in points):
            right.plot([p["bytes"] / 2**20 for p in points], [p["loss"] for p in points], styles[k % len(styles)], **style)
    left.set_xlabel("training examples seen (all clients)")
    right.set_xlabel("MiB sent and received (training, averages and relays)")
    for ax in (left, right):
        ax.set_ylabel("global eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
