"""The tiny runs the tests share: each test file starts from one of these and adds only the keys it is about (a
later key wins), so what "a tiny run" is lives in one place.

- ``tiny(...)``: the default tiny llama (``models/tiny.py``), 32-token rows, 2 per batch, one evaluation batch:
  what the engine, deployment and scheduling tests run.
- ``small(...)``: a wider tiny llama split at [1, 3] on the builtin plays, no warm-up: wide enough for the
  attacks to learn something, what the privacy tests run.
"""

TINY = "tiny:llama"
SMALL = "tiny:llama,layers=4,hidden=64"  # the privacy tests' model
SMALLEST = "tiny:llama,layers=3,hidden=32,heads=2,kv_heads=1,ffn=64"  # the cheapest model an attack runs on

TINY_RUN = (f"model={TINY}", "train.seq_len=32", "train.batch_size=2", "train.eval_batches=1")
SMALL_RUN = (f"model={SMALL}", "cuts=[1,3]", "data.source=builtin:shakespeare", "train.batch_size=2",
             "train.warmup_steps=0", "data.max_eval_examples=2", "train.eval_batches=1")


def tiny(*sets: str) -> list[str]:
    """``--set`` overrides of a tiny run, then ``sets``."""
    return [*TINY_RUN, *sets]


def small(*sets: str) -> list[str]:
    """``--set`` overrides of a small privacy run, then ``sets``."""
    return [*SMALL_RUN, *sets]


WORDS = "the quick brown fox jumps over a lazy dog while seven owners keep their text at home".split()


def owners(path, documents: int = 200):
    """A JSONL file of ``documents`` short texts at ``path`` (two for each of a hundred data owners: one held out)."""
    import json

    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))}) + "\n"
                            for i in range(documents)))
    return path
