"""Split generation on the builtin model (issue 14's figures): tokens/s in-process and over gRPC loopback as ratios
against unsplit transformers ``generate`` measured side by side, bytes per generated token each way, the prompt's
bytes, and time to first token.

    .venv/bin/python benchmarks/generate.py [--reps 20] [--threads 2] [--new-tokens 32] [--only ENTRY ...]

The runs it generates from (``--run``, U-shaped cuts [2,28]; ``--run-two-part``, cuts [2]) are trained here first
(5 steps) when missing, and exported once (``RUN/export``): the unsplit reference is ``PeftModel`` on that export,
so split and unsplit carry the same adapter. Every entry is built once; then each entry generates in turn,
``--reps`` rounds after one warm-up round, each round starting one entry later (A, B, C, B, C, A, …) so a noisy
neighbour slows all alike and none always runs first. Threads are pinned (``torch.set_num_threads`` here, ``serve
--threads`` for the served process). Decoding is greedy from a fixed prompt with exactly ``--new-tokens`` tokens
(``min_new_tokens`` too, so an early EOS cannot shorten one entry's work); the batch-4 entries use four
left-padded prompts. Reported: median tokens/s (every row's new tokens over the ``generate`` call) with its
p10-p90 spread and the ratio of medians against the unsplit entry of the same run and batch, time to first
token, bytes per generated token each way (the crossings after the prompt's, from ``generator.crossings``,
one entry per message) and the prompt's, and whether the greedy tokens equal unsplit's.
Writes ``runs/bench-generate/generate.json`` and ``generate.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from splittune.bench.measure import spread, start_server
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.export import export_run, read_run_adapters
from splittune.generation import SplitModel, load_split, run_task
from splittune.models.zoo import resolve_model
from splittune.run import train

PROMPT = "To be, or not to be, that is the question:"
BATCH = ["First Citizen:", "Before we proceed any further, hear me speak.", "You are all resolved rather to die than to famish?",
         "Let us kill him, and we'll have corn at our own price. Is't a verdict?"]
OUT = Path("runs/bench-generate")


class Clock(BaseStreamer):
    """When each new token exists, measured the same way for split and unsplit entries."""

    def __init__(self):
        self.calls, self.times = 0, []

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call is the prompt
            self.times.append(time.perf_counter())

    def end(self):
        pass


@dataclass
class Entry:
    name: str
    run: str  # which run's adapter (the ratio is against the unsplit entry of the same run and batch)
    batch: int
    generate: Callable  # (input_ids, attention_mask, streamer, **options) -> sequences
    split: SplitModel | None = None
    codec: str = "raw"
    model: Any = None  # the unsplit model (PeftModel), for unsplit entries
    rows: list[dict] = field(default_factory=list)
    tokens: list[list[int]] | None = None  # the greedy tokens of every rep (must not change between reps)
    stable: bool = True


def ensure_run(path: Path, model: str, cuts: str, steps: int) -> Path:
    """A finished, exported run at ``path`` (trained here when missing)."""
    if not (path / "adapters" / "manifest.json").exists():
        print(f"training {path} (cuts {cuts}, {steps} steps)…", flush=True)
        train(load_config(None, [f"model={model}", f"cuts={cuts}", f"train.steps={steps}"]), path)
    if not (path / "export" / "adapter_config.json").exists():
        export_run(path, path / "export")
    return path


def unsplit_model(model: str, adapter: Path):
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model(model).path), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def one(entry: Entry, ids, mask, options) -> dict[str, Any]:
    """One timed ``generate`` of ``entry``: seconds, time to first token, each crossing's bytes, the new tokens."""
    c = entry.split.generator.crossings if entry.split is not None else None
    first = c.messages if c is not None else 0
    clock = Clock()
    t0 = time.perf_counter()
    out = entry.generate(ids, mask, clock, **options)
    seconds = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    row: dict[str, Any] = {"s": seconds, "ttft_s": clock.times[0] - t0, "new_tokens": int(new.numel()),
                           "decode_s": clock.times[-1] - clock.times[0], "steps": len(clock.times)}
    if c is not None:  # this call's crossings: the prompt's, then one per token
        row["positions"], row["up"], row["down"] = c.positions[first:], c.up[first:], c.down[first:]
    tokens = new.tolist()
    if entry.tokens is None:
        entry.tokens = tokens
    elif tokens != entry.tokens:
        entry.stable = False
    return row


def scored(entry: Entry, ids, mask, options, adapter: bool = True) -> tuple[torch.Tensor, ...]:
    """One untimed generate's per-step scores (``adapter=False``: the unsplit model with its adapter disabled)."""
    kw = {**options, "output_scores": True, "return_dict_in_generate": True}
    with entry.model.disable_adapter() if not adapter else contextlib.nullcontext():
        return entry.generate(ids, mask, None, **kw).scores


def score_diff(xs, ys) -> float:
    """The largest step-score difference (the same -inf on both sides, e.g. EOS held back by min_new_tokens, is none)."""
    return max(torch.where(a == b, 0.0, (a - b).abs()).max().item() for a, b in zip(xs, ys))


def figures(entry: Entry, ref: Entry | None, warmup: int) -> dict[str, Any]:
    rows = entry.rows[warmup:]
    tps = [r["new_tokens"] / r["s"] for r in rows]
    decode = [(r["steps"] - 1) * entry.batch / r["decode_s"] for r in rows if r["decode_s"] > 0]
    out: dict[str, Any] = {"name": entry.name, "run": entry.run, "batch": entry.batch, "codec": entry.codec, "reps": len(rows),
                           "tokens_per_s": spread(tps), "decode_tokens_per_s": spread(decode),
                           "ttft_s": spread([r["ttft_s"] for r in rows]), "generate_s": spread([r["s"] for r in rows]),
                           "tokens_per_s_all": [round(x, 3) for x in tps], "same_tokens_every_rep": entry.stable}
    if ref is not None and ref is not entry:
        rtps = [r["new_tokens"] / r["s"] for r in ref.rows[warmup:]]
        out["ratio_vs_unsplit"] = out["tokens_per_s"]["median"] / statistics.median(rtps)
        out["ratio_per_round"] = spread([a / b for a, b in zip(tps, rtps)])  # paired: the same round's unsplit
        out["ttft_ratio_vs_unsplit"] = out["ttft_s"]["median"] / statistics.median(r["ttft_s"] for r in ref.rows[warmup:])
        out["tokens_equal_unsplit"] = entry.tokens == ref.tokens
        if entry.tokens != ref.tokens:
            out["first_difference"] = next(([row, i] for row, (a, b) in enumerate(zip(entry.tokens, ref.tokens))
                                            for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if entry.split is not None:
        last = rows[-1]
        up, down = last["up"][1:], last["down"][1:]
        out.update(prompt_bytes_up=last["up"][0], prompt_bytes_down=last["down"][0],
                   token_bytes_up={"median": statistics.median(up), "first": up[0], "last": up[-1]},
                   token_bytes_down={"median": statistics.median(down), "first": down[0], "last": down[-1]},
                   crossings=len(last["positions"]), positions=last["positions"])
    return out


def table(results: list[dict], meta: dict) -> str:
    def sp(d, fmt):
        return f"{fmt(d['median'])} [{fmt(d['p10'])}–{fmt(d['p90'])}]"

    lines = [f"# Split generation on {meta['model']}", "",
             f"{meta['threads']} threads (client and served process), greedy, {meta['new_tokens']} new tokens per row, "
             f"{meta['reps']} interleaved reps after {meta['warmup']} warm-up round; fp32; {meta['machine']}.", "",
             "| entry | tokens/s median [p10–p90] | ratio vs unsplit | decode tokens/s | time to first token, ms | "
             "bytes/token up (first→last) | bytes/token down | prompt bytes up / down | tokens equal unsplit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['ratio_vs_unsplit']:.3f} [{r['ratio_per_round']['p10']:.2f}–{r['ratio_per_round']['p90']:.2f}]" \
            if "ratio_vs_unsplit" in r else "1 (reference)"
        if "token_bytes_up" in r:
            up, down = r["token_bytes_up"], r["token_bytes_down"]
            per_up = f"{up['median']:,.0f} ({up['first']:,}→{up['last']:,})"
            per_down = f"{down['median']:,.0f}" if down["first"] == down["last"] else f"{down['median']:,.0f} ({down['first']:,}→{down['last']:,})"
            prompt = f"{r['prompt_bytes_up']:,} / {r['prompt_bytes_down']:,}"
        else:
            per_up = per_down = prompt = "–"
        equal = "–" if "tokens_equal_unsplit" not in r else ("yes" if r["tokens_equal_unsplit"] else
                                                            f"no (row {r['first_difference'][0]}, token {r['first_difference'][1]})")
        if "max_score_diff_vs_unsplit" in r:
            equal += f" (scores ±{r['max_score_diff_vs_unsplit']:.1e})"
        lines.append(f"| {r['name']} | {sp(r['tokens_per_s'], lambda x: f'{x:.1f}')} | {ratio} | "
                     f"{r['decode_tokens_per_s']['median']:.1f} | {sp(r['ttft_s'], lambda x: f'{x * 1000:.0f}')} | "
                     f"{per_up} | {per_down} | {prompt} | {equal} |")
    lines += ["", "Ratios: median tokens/s over the unsplit entry's (same run, same batch); brackets: p10–p90 of the "
              "per-round paired ratio. Bytes per token: each generate crossing after the prompt's (frames as sent, "
              "headers included); up carries the new position's attention-mask column too (8 bytes a row). Tokens/s counts every row's "
              "new tokens over the whole generate call (prompt included); decode tokens/s leaves out the first token.",
              "Scores ±: the largest difference of any step's scores from unsplit's (one untimed generate). "
              "Twin (the check can fail): unsplit with its adapter disabled differs from it by "
              + ", ".join(f"{r['max_score_diff_base_vs_adapter']:.1e} ({r['name']})" for r in results if "max_score_diff_base_vs_adapter" in r)
              + ".", f"Runs: {meta['runs']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--run", type=Path, default=OUT / "run", help="the U-shaped run (cuts [2,28]); trained when missing")
    ap.add_argument("--run-two-part", type=Path, default=OUT / "run2", help="the two-part run (cuts [2]); trained when missing")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-batch", action="store_true", help="leave out the batch-4 entries")
    ap.add_argument("--only", nargs="*", help="entries to run by name (their unsplit reference always runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.new_tokens < 2 or args.reps < 1:
        raise SystemExit("--new-tokens must be at least 2 (bytes per token are the crossings after the prompt's) and --reps at least 1")
    torch.set_num_threads(args.threads)
    u = ensure_run(args.run, args.model, "[2,28]", args.train_steps)
    t = ensure_run(args.run_two_part, args.model, "[2]", args.train_steps)

    names = ["unsplit", "split, in-process", "split, gRPC loopback", "split, int8, in-process",
             "unsplit (two-part run)", "split two-part [2], in-process"]
    if not args.no_batch:
        names += ["unsplit, batch 4", "split, in-process, batch 4", "split, gRPC loopback, batch 4"]
    reference = {"split, in-process": "unsplit", "split, gRPC loopback": "unsplit", "split, int8, in-process": "unsplit",
                 "split two-part [2], in-process": "unsplit (two-part run)", "split, in-process, batch 4": "unsplit, batch 4",
                 "split, gRPC loopback, batch 4": "unsplit, batch 4"}
    wanted = set(args.only or names)
    wanted |= {reference[n] for n in wanted if n in reference}
    unknown = wanted - set(names)
    if unknown:
        raise SystemExit(f"--only: unknown entries {sorted(unknown)}; allowed: {names}")

    def split_generate(split):
        return lambda ids, mask, streamer, **o: split.generate(ids, mask, streamer=streamer, **o)

    def unsplit_generate(model, pad):
        def go(ids, mask, streamer, **o):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, pad_token_id=pad, **o)
        return go

    built: dict[str, Entry] = {}
    servers, cleanup = [], []
    try:
        splits: dict[str, SplitModel] = {}
        if wanted & {"split, in-process", "split, in-process, batch 4", "unsplit", "unsplit, batch 4"}:
            splits["u"] = load_split(u)
        if wanted & {"split, gRPC loopback", "split, gRPC loopback, batch 4"}:
            url, proc = start_server(args.model, args.threads)
            servers.append(proc)
            splits["grpc"] = load_split(u, channel=GrpcChannel(url))
        if "split, int8, in-process" in wanted:
            state, _ = read_run_adapters(u)
            cfg = load_config(u / "config.yaml", ["codec.up=int8", "codec.down=int8"])
            splits["int8"] = SplitModel(cfg, state, task=run_task(u))
        if wanted & {"split two-part [2], in-process", "unsplit (two-part run)"}:
            splits["t"] = load_split(t)
        cleanup += list(splits.values())
        any_split = next(iter(splits.values()))
        pad = any_split.pad_id
        one_prompt = any_split.left_padded(any_split.encode_prompts([PROMPT]))
        four = any_split.left_padded(any_split.encode_prompts(BATCH))
        models = {}
        if wanted & {"unsplit", "unsplit, batch 4"}:
            models["u"] = unsplit_model(args.model, u / "export")
        if "unsplit (two-part run)" in wanted:
            models["t"] = unsplit_model(args.model, t / "export")
        plan = {
            "unsplit": ("u", 1, lambda: unsplit_generate(models["u"], pad), None, "raw"),
            "split, in-process": ("u", 1, lambda: split_generate(splits["u"]), "u", "raw"),
            "split, gRPC loopback": ("u", 1, lambda: split_generate(splits["grpc"]), "grpc", "raw"),
            "split, int8, in-process": ("u", 1, lambda: split_generate(splits["int8"]), "int8", "int8"),
            "unsplit (two-part run)": ("t", 1, lambda: unsplit_generate(models["t"], pad), None, "raw"),
            "split two-part [2], in-process": ("t", 1, lambda: split_generate(splits["t"]), "t", "raw"),
            "unsplit, batch 4": ("u", 4, lambda: unsplit_generate(models["u"], pad), None, "raw"),
            "split, in-process, batch 4": ("u", 4, lambda: split_generate(splits["u"]), "u", "raw"),
            "split, gRPC loopback, batch 4": ("u", 4, lambda: split_generate(splits["grpc"]), "grpc", "raw"),
        }
        for name in names:
            if name in wanted:
                run, batch, make, key, codec = plan[name]
                built[name] = Entry(name, str(u if run == "u" else t), batch, make(), splits.get(key) if key else None, codec,
                                    None if key else models[run])
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       temperature=None, top_p=None, top_k=None)
        order = list(built.values())
        warmup = 1
        t_start = time.perf_counter()
        for rnd in range(args.reps + warmup):
            k = rnd % len(order)
            for entry in order[k:] + order[:k]:
                ids, mask = one_prompt if entry.batch == 1 else four
                entry.rows.append(one(entry, ids, mask, options))
            print(f"round {rnd + 1}/{args.reps + warmup} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        results = [figures(e, built.get(reference.get(e.name, e.name)), warmup) for e in order]
        scores = {e.name: scored(e, *(one_prompt if e.batch == 1 else four), options) for e in order}
        for r in results:  # beyond equal tokens: how far the split's scores are from unsplit's (untimed, after the rounds)
            ref = reference.get(r["name"])
            if ref in scores:
                r["max_score_diff_vs_unsplit"] = score_diff(scores[r["name"]], scores[ref])
            elif r["name"] in scores and r["name"].startswith("unsplit"):  # the twin: the adapter moves the scores
                base = scored(built[r["name"]], *(one_prompt if built[r["name"]].batch == 1 else four), options, adapter=False)
                r["max_score_diff_base_vs_adapter"] = score_diff(base, scores[r["name"]])
    finally:
        for split in cleanup:
            split.close()
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
    meta = {"model": args.model, "threads": args.threads, "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
            "reps": args.reps, "warmup": warmup, "prompt": PROMPT, "batch_prompts": BATCH,
            "prompt_tokens": int(one_prompt[1].sum()), "batch_widths": list(four[0].shape),
            "runs": f"U-shaped {u} (cuts [2,28]), two-part {t} (cuts [2]), {args.train_steps} training steps each; "
                    "unsplit: PeftModel on each run's export",
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "wall_s": round(time.perf_counter() - t_start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {e.name: e.rows for e in order}
    (args.out / "generate.json").write_text(json.dumps({"meta": meta, "results": results, "rows": raw,
                                                        "tokens": {e.name: e.tokens for e in order}}, indent=1))
    md = table(results, meta)
    (args.out / "generate.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
