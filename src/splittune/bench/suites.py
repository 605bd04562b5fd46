"""What ``splittune bench`` compares: named entries (config overrides on one base), grouped into suites.

Every entry of a part runs on the same model, data, batch and seed as the part's ``centralized``
entry, so its step time can be read as a ratio against centralized measured in the same run. An
entry is a plain list of ``--set`` overrides: what it measures is what ``splittune train`` with those
overrides would run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    sets: tuple[str, ...] = ()
    group: str = "split"  # what the entry compares: baseline, split, codec, pipelining, link, clients, memory
    grpc: bool = False  # the server runs in its own process (``splittune serve``), over gRPC on loopback
    memory: bool = False  # also measure each party's peak memory, each party in its own process
    note: str = ""
    runs: int = 1  # independent runs against one server (``serve --max-runs``), seeds seed, seed+1, …
    together: bool = False  # those runs' steps at once (else one run's, then the next's)


SLOW = ("link.bandwidth_mbps=10", "link.latency_ms=20")
INT8 = ("codec.up=int8", "codec.down=int8")

ENTRIES: tuple[Entry, ...] = (
    Entry("centralized", ("mode=centralized",), "baseline", memory=True, note="the whole model in one process: plain LoRA fine-tuning"),
    Entry("peft", ("mode=centralized",), "baseline", note="a plain transformers + peft LoRA loop: no splittune code in its step"),
    Entry("naive split", ("padding_removal=false",), "baseline", memory=True,
          note="what the research frameworks do: fp32, padding sent, no pipelining, in-process"),
    Entry("split", (), "split", memory=True, note="padding removal, raw fp32, in-process"),
    Entry("split, gRPC process", (), "split", grpc=True, note="the server in its own process, gRPC on loopback"),
    Entry("bf16", ("codec.up=bf16", "codec.down=bf16"), "codec"),
    Entry("int8", INT8, "codec"),
    Entry("int4", ("codec.up=int4", "codec.down=int4"), "codec"),
    Entry("topk 0.1", ("codec.up={hidden: topk, grad: topk}", "codec.down={hidden: topk, grad: topk}"), "codec"),
    Entry("4 micro-batches", ("train.micro_batches=4",), "pipelining"),
    Entry("1 Gbps", ("link.bandwidth_mbps=1000",), "link"),
    Entry("100 Mbps", ("link.bandwidth_mbps=100",), "link"),
    Entry("10 Mbps 20 ms", SLOW, "link"),
    Entry("10 Mbps 20 ms, int8, 4 micro-batches", (*SLOW, *INT8, "train.micro_batches=4"), "link",
          note="what the techniques buy on a slow link"),
    Entry("2 clients, sfl-v1", ("clients=2", "schedule=sfl-v1"), "clients", note="a step is a round: every client's step"),
    Entry("2 clients, sfl-v2", ("clients=2", "schedule=sfl-v2"), "clients", note="a step is a round: every client's step"),
    Entry("8 clients, sfl-v2", ("clients=8", "schedule=sfl-v2"), "scale", note="a step is a round: 8 client steps, in-process"),
    Entry("8 clients, sfl-v2, Ray", ("clients=8", "schedule=sfl-v2", "engine=ray"), "scale",
          note="the same with the server's trunk in a Ray actor (a local cluster): the Ray engine's overhead"),
    Entry("2 runs, one after the other", (), "runs", runs=2, note="two one-client runs on one server, taking turns"),
    Entry("2 runs at once", (), "runs", runs=2, together=True,
          note="the same two runs stepping at the same time on one server (serve --max-runs 2): one frozen base"),
    Entry("gradient checkpointing", ("train.gradient_checkpointing=true",), "memory", memory=True,
          note="the client recomputes its blocks' activations in backward"),
    Entry("frozen bottom, activation cache", ("segments.bottom=frozen",), "memory",
          note="later epochs reuse the server's cached activations (the U-shape still sends the top's gradient up)"),
    Entry("two-part, frozen bottom, activation cache", ("cuts=[2]", "segments.bottom=frozen"), "memory",
          note="two-part: from the second epoch only masks, labels and keys go up"),
)


@dataclass(frozen=True)
class Part:
    """One model's entries, timed side by side."""

    name: str
    model: str
    sets: tuple[str, ...]
    entries: tuple[str, ...]
    reps: int
    warmup: int = 1
    memory_steps: int = 3


# the bench's batch: 4 rows (at most 128 tokens) of labelled snippets, padded to the longest (padding removal shows)
COMMON = ("train.batch_size=4", "train.seq_len=128", "train.warmup_steps=0", "train.eval_batches=4",
          "data.source=builtin:sentiment", "data.max_train_examples=16")  # 4 steps an epoch: later epochs show the cache
EVERY = tuple(e.name for e in ENTRIES if e.group not in ("scale", "runs"))  # Ray clusters, several runs: suites of their own
TINY = "tiny:llama,layers=8,hidden=256,heads=8,kv_heads=4,ffn=512"

SUITES: dict[str, tuple[Part, ...]] = {
    "quick": (
        Part("tiny", TINY, COMMON, EVERY, reps=6),
        Part("builtin", "builtin:smollm2-135m", COMMON, ("centralized", "peft", "split", "int8", "4 micro-batches"), reps=3,
             memory_steps=0),
    ),
    "full": (Part("builtin", "builtin:smollm2-135m", COMMON, EVERY, reps=8),),
    # the Ray engine against in-process, 8 clients (needs ray: pip install 'splittune[ray]')
    "scale": (Part("tiny", TINY, COMMON, ("centralized", "8 clients, sfl-v2", "8 clients, sfl-v2, Ray"), reps=6),),
    # several runs on one server: at once against one after the other (time per token: the ratio is the gain)
    "runs": (Part("tiny", TINY, COMMON, ("centralized", "2 runs, one after the other", "2 runs at once"), reps=6),),
}


def entry(name: str) -> Entry:
    for e in ENTRIES:
        if e.name == name:
            return e
    raise ConfigError(f"unknown bench entry {name!r}; entries: {', '.join(repr(e.name) for e in ENTRIES)}")


def suite(name: str) -> tuple[Part, ...]:
    if name not in SUITES:
        raise ConfigError(f"unknown bench suite {name!r}; suites: {', '.join(SUITES)}")
    return SUITES[name]


def select(parts: tuple[Part, ...], only: list[str] | None, model: str | None) -> list[Part]:
    """The suite's parts with ``only`` these entries (the baselines always: ratios are against them) and every
    part on ``model`` when given."""
    if only:
        for name in only:
            entry(name)  # an unknown name is refused, naming the entries
    chosen = []
    for part in parts:
        names = tuple(n for n in part.entries if not only or n in only or n in ("centralized", "peft"))
        if len(names) > 1 or not only:
            chosen.append(Part(part.name, model or part.model, part.sets, names, part.reps, part.warmup, part.memory_steps))
    return chosen

