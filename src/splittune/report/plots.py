"""Loss curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(metrics: list[dict], evals: list[dict], out: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss", lw=1.2)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss", lw=1.5)
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
    for name, points in curves.items():
        left.plot([p["examples"] for p in points], [p["loss"] for p in points], "o-", label=name, lw=1.4, ms=3)
        if any(p["bytes"] for p in points):
            right.plot([p["bytes"] / 2**20 for p in points], [p["loss"] for p in points], "o-", label=name, lw=1.4, ms=3)
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
