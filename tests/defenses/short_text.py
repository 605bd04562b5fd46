"""A run on a few short private texts: the token-defense tests' data (the builtin plays take seconds to pack)."""

from __future__ import annotations

import json
from pathlib import Path

from configs import SMALLEST, small

WORDS = ("to be or not to be that is the question whether tis nobler in the mind to suffer the slings and arrows of "
         "outrageous fortune").split()


def short_run(folder: Path, *sets: str) -> list[str]:
    """``--set`` overrides of a one-step run of the smallest model on 24 short texts written under ``folder``."""
    path = folder / "texts.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"text": " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(40))}) + "\n"
                                for i in range(24)))
    return small(f"model={SMALLEST}", f"data.source={path}", "data.eval_fraction=0.2", "train.steps=1", "train.seq_len=16",
                 "data.max_train_examples=4", "defense_seed=3", *sets)
