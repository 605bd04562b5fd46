"""``splittune leak``: the same attacks across cut depths, so a user can see how deep a cut buys how much privacy.

For each codec and each first cut, a short split run records the server's tap (two-part split at that cut:
the bottom's activations are the same as in a U-shape with that first cut), then each attack runs on it and
is judged. Every cell is its own run directory under ``out/cells``; a finished cell is read back, not redone,
so an interrupted sweep continues where it stopped. ``leak.json`` holds every point and ``leak.png`` the
curve of attack success against the client's first cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..config import load_config
from .job import attack_run

PLOT_METRICS = {"rouge_l_f1": "ROUGE-L F1", "token_accuracy": "token accuracy"}


def cell_config(model: str, cut: int, codec: str, data: str, sets: tuple[str, ...]):
    """A short run whose only purpose is its tap: few steps, small batches, the codec on both directions."""
    return load_config(None, [f"model={model}", f"cuts=[{cut}]", f"data.source={data}", f"codec.up={codec}", f"codec.down={codec}",
                              "train.steps=2", "train.batch_size=2", "train.seq_len=64", "train.warmup_steps=0",
                              "data.max_train_examples=16", "data.max_eval_examples=4", "train.eval_batches=1", *sets])


def sweep(model: str, cuts: list[int], attacks: list[str], out: Path, aux: str | None = None, data: str = "builtin:sentiment",
          codecs: list[str] = ("raw",), sets: tuple[str, ...] = (), options: dict[str, dict] | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    from ..run import train

    out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    cells = [(codec, cut) for codec in codecs for cut in cuts]
    for n, (codec, cut) in enumerate(cells):
        folder = out / "cells" / f"{codec}-cut{cut}"
        if progress:
            progress(n, len(cells), "cut sweep")
        if not (folder / "summary.json").exists():
            train(cell_config(model, cut, codec, data, sets), folder, record_tap=("server",))
        for name in attacks:
            done = folder / "attacks" / name / "attack.json"
            result = json.loads(done.read_text()) if done.exists() else attack_run(folder, name, aux, options=(options or {}).get(name),
                                                                                     progress=progress)
            points.append({"codec": codec, "cut": cut, "attack": name,
                           **{k: result.get(k) for k in ("rouge_l_f1", "token_accuracy", "seconds")}})
    if progress:
        progress(len(cells), len(cells), "cut sweep")
    result = {"model": model, "data": data, "aux": aux, "codecs": list(codecs), "cuts": cuts, "attacks": attacks, "points": points}
    (out / "leak.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "leak.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(6 * len(PLOT_METRICS), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], PLOT_METRICS.items()):
        for attack in result["attacks"]:
            for codec in result["codecs"]:
                pts = sorted((p["cut"], p[metric]) for p in result["points"]
                             if p["attack"] == attack and p["codec"] == codec and p.get(metric) is not None)
                if pts:
                    ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", linestyle="-" if codec == "raw" else "--",
                            label=f"{attack} · {codec}")
        ax.set_xlabel("client's first cut (blocks on the client)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cuts are whole blocks: no 1.2, 1.4 … ticks
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"What the server can reconstruct · {result['model']} · private {result['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
