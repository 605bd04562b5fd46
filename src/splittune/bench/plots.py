"""The bench's figures as PNG (matplotlib, no display): one file per question a reader asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = ("compute_s", "codec_s", "server_s", "wire_s")
PART_LABELS = {"compute_s": "client compute", "codec_s": "codecs", "server_s": "server", "wire_s": "wire and queues"}


def _ok(entries: dict[str, dict]) -> dict[str, dict]:
    return {n: f for n, f in entries.items() if "error" not in f}


def _finish(fig, ax, names: list[str], out: Path, title: str, xlabel: str, legend: bool = False) -> Path:
    """Entry names down the side (first on top), labels, grid; the figure saved and closed."""
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _bars(names: list[str], values: list[float], out: Path, title: str, xlabel: str, errors=None, line: float | None = None,
          log: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.4), dpi=120)
    ys = range(len(names))
    ax.barh(ys, values, xerr=errors, color="C0", alpha=0.85, capsize=3)
    if line is not None:
        ax.axvline(line, color="k", lw=0.8, ls="--")
    if log:
        ax.set_xscale("log")
    return _finish(fig, ax, names, out, title, xlabel)


def ratio_plot(entries: dict[str, dict], out: Path, title: str) -> Path:
    ok = {n: f for n, f in _ok(entries).items() if "ratio_vs_centralized" in f}
    names = list(ok)
    med = [ok[n]["ratio_vs_centralized"]["median"] for n in names]
    err = [[m - ok[n]["ratio_vs_centralized"]["p10"] for n, m in zip(names, med)],
           [ok[n]["ratio_vs_centralized"]["p90"] - m for n, m in zip(names, med)]]
    return _bars(names, med, out, title, "time per training token / centralized (median, p10-p90)", err, line=1.0)


def bytes_plot(entries: dict[str, dict], out: Path, title: str) -> Path:
    ok = {n: f for n, f in _ok(entries).items() if f["bytes_up"] or f["bytes_down"]}
    names = list(ok)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.4), dpi=120)
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [ok[n]["bytes_up"] for n in names], 0.4, label="up (client → server)", color="C1")
    ax.barh([y + 0.2 for y in ys], [ok[n]["bytes_down"] for n in names], 0.4, label="down (server → client)", color="C2")
    ax.set_xscale("log")
    return _finish(fig, ax, names, out, title, "bytes per client step (log)", legend=True)


def memory_plot(entries: dict[str, dict], out: Path, title: str) -> Path | None:
    ok = {n: f["memory"] for n, f in _ok(entries).items() if "client_peak_rss" in f.get("memory", {})}
    if not ok:
        return None
    names = list(ok)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.4), dpi=120)
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [ok[n]["client_peak_rss"] / 2**20 for n in names], 0.4, label="client", color="C0")
    ax.barh([y + 0.2 for y in ys], [ok[n].get("server_peak_rss", 0) / 2**20 for n in names], 0.4, label="server", color="C3")
    return _finish(fig, ax, names, out, title, "peak resident memory per party process (MiB)", legend=True)


def tokens_plot(entries: dict[str, dict], out: Path, title: str) -> Path:
    ok = _ok(entries)
    return _bars(list(ok), [f["tokens_per_s"] for f in ok.values()], out, title, "training tokens per second (median round)")


def eval_plot(entries: dict[str, dict], out: Path, title: str) -> Path:
    ok = {n: f for n, f in _ok(entries).items() if "eval" in f}
    base = ok.get("centralized", {}).get("eval", {}).get("loss")
    return _bars(list(ok), [f["eval"]["loss"] for f in ok.values()], out, title, "eval loss after the run (nats/token)", line=base)


def breakdown_plot(entries: dict[str, dict], out: Path, title: str) -> Path | None:
    ok = {n: f["breakdown"] for n, f in _ok(entries).items() if "breakdown" in f}
    if not ok:
        return None
    names = list(ok)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.6), dpi=120)
    left = [0.0] * len(names)
    for k, part in enumerate(PARTS):
        widths = [ok[n].get(part, 0.0) for n in names]
        ax.barh(range(len(names)), widths, left=left, label=PART_LABELS[part], color=f"C{k}")
        left = [a + b for a, b in zip(left, widths)]
    return _finish(fig, ax, names, out, title, "seconds per client step (median); pipelined parts overlap", legend=True)


def prediction_plot(entries: dict[str, dict], out: Path, title: str) -> Path | None:
    ok = {n: f for n, f in _ok(entries).items() if "step_s" in f.get("predicted", {})}
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    pairs = [(f["step_s"]["median"], f["predicted"]["step_s"], n) for n, f in ok.items()]
    axes[0].scatter([m for m, _, _ in pairs], [p for _, p, _ in pairs], s=18)
    for m, p, n in pairs:
        axes[0].annotate(n, (m, p), fontsize=6, alpha=0.7)
    lim = [min(min(m, p) for m, p, _ in pairs) * 0.8, max(max(m, p) for m, p, _ in pairs) * 1.25]
    axes[0].plot(lim, lim, "k--", lw=0.8)
    axes[0].fill_between(lim, [v * 0.8 for v in lim], [v * 1.2 for v in lim], color="C2", alpha=0.15, label="±20%")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("measured step time (s)")
    axes[0].set_ylabel("predicted (s)")
    axes[0].legend(fontsize=8)
    mem = [(f["memory"]["client_peak_rss"] / 2**20, f["predicted"]["client_peak_bytes"] / 2**20, n) for n, f in ok.items()
           if "client_peak_rss" in f.get("memory", {}) and f["predicted"].get("client_peak_bytes")]
    if mem:
        axes[1].scatter([m for m, _, _ in mem], [p for _, p, _ in mem], s=18, color="C3")
        for m, p, n in mem:
            axes[1].annotate(n, (m, p), fontsize=6, alpha=0.7)
        lim = [min(min(m, p) for m, p, _ in mem) * 0.9, max(max(m, p) for m, p, _ in mem) * 1.1]
        axes[1].plot(lim, lim, "k--", lw=0.8)
        axes[1].fill_between(lim, [v * 0.9 for v in lim], [v * 1.1 for v in lim], color="C2", alpha=0.15, label="±10%")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("measured client peak memory (MiB)")
    axes[1].set_ylabel("predicted (MiB)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


PLOTS = (("ratio", "Step-time ratio vs centralized", ratio_plot), ("bytes", "Bytes per step each way", bytes_plot),
         ("memory", "Peak memory per party", memory_plot), ("tokens", "Tokens per second", tokens_plot),
         ("eval", "Eval loss after the run", eval_plot), ("breakdown", "Where a client step's time goes", breakdown_plot),
         ("prediction", "Planner: predicted vs measured", prediction_plot))


def plot_part(part: dict[str, Any], out: Path) -> list[tuple[str, Path]]:
    """Every figure of one part, as (caption, file)."""
    made = []
    for key, caption, fn in PLOTS:
        path = fn(part["entries"], out / f"{part['name']}-{key}.png", f"{part['model']} · {caption.lower()}")
        if path is not None:
            made.append((caption, path))
    return made
