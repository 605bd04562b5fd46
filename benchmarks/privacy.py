"""The privacy figures of docs/privacy.md, measured on the builtin model: each attack on a recorded run, and the
leak curve over first cuts (raw and int8).

    .venv/bin/python benchmarks/privacy.py --out runs/privacy [--only NAME …] [--threads N]

Each setting is a short recorded run (``train --record-tap``) then ``splittune attack`` on it, exactly as a
user would run them; the figures go to ``OUT/figures.json`` and each attack's page to its run directory.
A finished setting is read back, not recomputed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from splittune.config import load_config
from splittune.privacy.job import attack_run
from splittune.privacy.leak import sweep
from splittune.run import train

MODEL = "builtin:smollm2-135m"
COMMON = ["train.batch_size=4", "train.seq_len=64", "train.warmup_steps=0", "data.max_eval_examples=4", "train.eval_batches=1"]

# name: (observers, run config, [(attack, options)])
SETTINGS = {
    "cut2-text": (("server",), [f"model={MODEL}", "cuts=[2,28]", "data.source=builtin:sentiment", "train.steps=10",
                                "data.max_train_examples=200"],
                  [("inversion", {"steps": [1, 5, 10]}), ("optimization", {"steps": [1, 10]})]),
    "thin-top": (("server",), [f"model={MODEL}", "cuts=[2,29]", "data.source=builtin:shakespeare", "train.steps=2",
                               "data.max_train_examples=64"],
                 [("gradient-labels", {})]),
    "head-only-top": (("server",), [f"model={MODEL}", "cuts=[2,30]", "data.source=builtin:shakespeare", "train.steps=2",
                                    "data.max_train_examples=64"],
                      [("gradient-labels", {})]),
    # drift: a run ten times longer, with a learning rate that moves the bottom's adapters far from the pretrained
    # bottom the attacker knows (the eval perplexity says how much it learned)
    "drift": (("server",), [f"model={MODEL}", "cuts=[2,28]", "data.source=builtin:sentiment", "train.steps=100",
                            "train.lr=1e-3", "data.max_train_examples=400"],
              [("inversion", {"steps": [1, 25, 50, 100]}), ("optimization", {"steps": [1, 100]})]),
    "labels": (("server",), [f"model={MODEL}", "cuts=[2,28]", "data.source=builtin:sentiment", "train.steps=12",
                             "train.batch_size=8", "data.max_train_examples=400"],
               [("label-inference", {})]),
}


def run_setting(name: str, out: Path, log: dict) -> None:
    observers, sets, attacks = SETTINGS[name]
    folder = out / name
    if not (folder / "summary.json").exists():
        t0 = time.perf_counter()
        train(load_config(None, [*COMMON, *sets]), folder, record_tap=observers)
        log.setdefault(name, {})["train_s"] = round(time.perf_counter() - t0, 1)
    summary = json.loads((folder / "summary.json").read_text())
    log.setdefault(name, {})["eval_ppl"] = [summary["eval_ppl_before"], summary["eval_ppl_after"]]
    for attack, options in attacks:
        done = folder / "attacks" / attack / "attack.json"
        result = json.loads(done.read_text()) if done.exists() else attack_run(folder, attack, options=options)
        log[name][attack] = {k: result.get(k) for k in ("rouge_l_f1", "token_accuracy", "leak_auc", "per_step", "seconds", "options", "aux")}
        print(name, attack, {k: result.get(k) for k in ("rouge_l_f1", "token_accuracy", "leak_auc", "seconds")}, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--only", nargs="*", default=None, help=f"settings: {', '.join(SETTINGS)}, leak")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--leak-cuts", default="1,2,3,4,6,8,10,12,15")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = args.out / "figures.json"
    log = json.loads(figures.read_text()) if figures.exists() else {}
    for name in args.only or [*SETTINGS, "leak"]:
        if name == "leak":
            cuts = [int(c) for c in args.leak_cuts.split(",")]
            result = sweep(MODEL, cuts, ["inversion"], args.out / "leak", data="builtin:sentiment", codecs=["raw", "int8"])
            log["leak"] = result["points"]
        else:
            run_setting(name, args.out, log)
        figures.write_text(json.dumps(log, indent=2))
    print(json.dumps({k: v for k, v in log.items() if k != "leak"}, indent=2))


if __name__ == "__main__":
    main()
