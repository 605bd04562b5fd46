"""``splittune bench --suite memory``: each party's own peak at the shapes of real models, by precision.

For each shape (random weights with the exact sizes of Llama-3.2-1B and Llama-3.1-8B, ``bench/shapes.py``) and each
precision, one training step of batch 1 × 128 tokens in a U-shape with two blocks on each side of the client runs
with the client and the server in processes of their own; each one's high-water mark (VmHWM) is its peak. The
planner's estimate for the same run stands beside it. A party that cannot fit this machine is not started: the
estimate says why, and the other party is measured against a server that fits (the server's precision does not
change what the client holds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..assets import cache_dir
from ..config import load_config
from .memory import party_memory
from .shapes import SHAPES, build_checkpoint, shape_config

SEQ = 128


@dataclass(frozen=True)
class Precision:
    name: str
    sets: tuple[str, ...]


PRECISIONS = (
    Precision("fp32", ("train.dtype=float32",)),
    Precision("bf16", ("train.dtype=bfloat16",)),
    Precision("int8", ("train.dtype=bfloat16", "quantize=int8")),
    Precision("nf4", ("train.dtype=bfloat16", "quantize=nf4")),
    # the (untied) head packed too, computed a vocabulary slice at a time: what `plan --client-memory 2GB` picks at 8B
    Precision("nf4 + head", ("train.dtype=bfloat16", "quantize={bottom: nf4, trunk: nf4, top: nf4, head: nf4, double_quant: true}")),
)
FALLBACK = "nf4"  # the server a client is measured against when its own precision's server does not fit


def run_sets(model: Path, n_blocks: int) -> tuple[str, ...]:
    return (f"model={model}", f"cuts=[2,{n_blocks - 2}]", "train.batch_size=1", f"train.seq_len={SEQ}", "train.steps=1",
            "train.warmup_steps=0", "train.eval_batches=1", "data.source=builtin:shakespeare", "data.max_documents=40",
            "data.max_eval_examples=1")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate(cfg) -> dict[str, int]:
    """The planner's per-party peak for ``cfg``, as ``splittune plan --estimate`` predicts it (no weights load)."""
    from ..plan.cost import predict
    from ..plan.profile import profile_model

    t = cfg.train
    profile = profile_model(cfg.model, t.batch_size, t.seq_len, t.dtype, "cpu", cfg=cfg, estimate=True)
    p = predict(cfg, profile)
    return {"client": p.client_peak_bytes, "server": p.server_peak_bytes}


def shaped(shape: str, tick: Callable[[str, int, int], None]) -> tuple[Path, int]:
    """The ``shape``-shaped checkpoint in the cache (written the first time) and its block count."""
    tick(f"writing the {shape}-shaped checkpoint (once)", 0, 0)
    return build_checkpoint(shape, cache_dir() / "shapes" / shape), shape_config(shape).num_hidden_layers


def run_footprint(out: Path, threads: int, shapes: tuple[str, ...] = tuple(SHAPES), precisions=PRECISIONS,
                  tick: Callable[[str, int, int], None] = lambda *a: None) -> list[dict[str, Any]]:
    """Measure every (shape, precision); each row: measured and estimated peaks of both parties, or why not."""
    rows = []
    budget = physical_memory() * 0.9  # what a party may take while the other runs beside it
    for shape in shapes:
        folder, n_blocks = shaped(shape, tick)
        for p in precisions:
            cfg = load_config(None, [*run_sets(folder, n_blocks), *p.sets])
            predicted = estimate(cfg)
            row: dict[str, Any] = {"shape": shape, "precision": p.name, "estimate": predicted}
            fits = predicted["client"] + predicted["server"] <= budget
            if not fits:
                fallback = load_config(None, [*run_sets(folder, n_blocks), *p.sets, f"quantize.trunk={FALLBACK}"])
                row["server_skipped"] = (f"the server's estimated {predicted['server'] / 2**30:.1f} GiB and the client's beside it "
                                         f"exceed this machine's {physical_memory() / 2**30:.0f} GiB; the client ran against an "
                                         f"{FALLBACK} server")
                cfg = fallback
            tick(f"memory: {shape} {p.name}", 0, 0)
            try:
                measured = party_memory(cfg, 1, threads, out / f"{shape}-{p.name}")
                row["client_peak_rss"] = measured["client_peak_rss"]
                if fits:
                    row["server_peak_rss"] = measured.get("server_peak_rss")
            except Exception as err:  # one failed setting must not lose the others
                row["error"] = str(err)[-600:]
            rows.append(row)
            tick(f"memory: {shape} {p.name}", 1, 0)
    return rows


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table docs/benchmarks.md shows: measured peaks with the planner's estimate beside each."""
    lines = ["| shape | precision | client peak GiB | client estimate | server peak GiB | server estimate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        est = r["estimate"]
        server = gib(r.get("server_peak_rss")) if "server_skipped" not in r else "does not fit"
        lines.append(f"| {r['shape']} | {r['precision']} | {gib(r.get('client_peak_rss'))} | {gib(est['client'])} | {server} | "
                     f"{gib(est['server'])} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Measured peaks by precision, one panel per shape, the planner's estimates as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        xs = range(len(mine))
        for offset, party, colour in ((-0.2, "client", "tab:blue"), (0.2, "server", "tab:orange")):
            measured = [(r.get(f"{party}_peak_rss") or 0) / 2**30 for r in mine]
            ax.bar([x + offset for x in xs], measured, 0.4, label=f"{party} (measured)", color=colour)
            ax.scatter([x + offset for x in xs], [r["estimate"][party] / 2**30 for r in mine], marker="_", s=300, color="black",
                       label="planner estimate" if party == "client" else None, zorder=3)
        ax.set_xticks(list(xs), [r["precision"] for r in mine])
        ax.set_title(f"{shape}-shaped, batch 1 × {SEQ}")
        ax.set_ylabel("peak resident memory (GiB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "footprint.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


GPU_PRECISIONS = tuple(p for p in PRECISIONS if p.name in ("bf16", "nf4"))


def run_gpu(out: Path, threads: int, shapes: tuple[str, ...] = tuple(SHAPES),
            tick: Callable[[str, int, int], None] = lambda *a: None) -> list[dict[str, Any]]:
    """``bench --suite gpu``: the server on the GPU, the client on the CPU and then on the GPU too, for each shape in
    bf16 and nf4; each row: the client's step time, both parties' peak GPU memory and resident memory."""
    import torch

    if not torch.cuda.is_available():
        from ..config import ConfigError

        raise ConfigError("bench --suite gpu needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is "
                          "False); --suite memory measures the same shapes on the CPU")
    rows = []
    for shape in shapes:
        folder, n_blocks = shaped(shape, tick)
        for p in GPU_PRECISIONS:
            for client in ("cpu", "cuda"):
                cfg = load_config(None, [*run_sets(folder, n_blocks), *p.sets, f"train.device={client}"])
                tick(f"gpu: {shape} {p.name}, client on {client}", 0, 0)
                row: dict[str, Any] = {"shape": shape, "precision": p.name, "client_device": client, "server_device": "cuda"}
                try:
                    row.update(party_memory(cfg, 2, threads, out / f"{shape}-{p.name}-{client}", ("--device", "cuda")))
                except Exception as err:  # one failed setting must not lose the others
                    row["error"] = str(err)[-600:]
                rows.append(row)
    return rows


def gpu_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | precision | client on | step s | client GPU GiB | client RSS GiB | server GPU GiB | server RSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = f"{r['step_s']:.3f}" if "step_s" in r else "failed"
        lines.append(f"| {r['shape']} | {r['precision']} | {r['client_device']} | {step} | {gib(r.get('client_peak_device'))} | "
                     f"{gib(r.get('client_peak_rss'))} | {gib(r.get('server_peak_device'))} | {gib(r.get('server_peak_rss'))} |")
    return "\n".join(lines)
