"""Every choice the planner weighs, which fit the parties' memory, and in what order.

A choice is the cuts (two-part ``[a]`` and U-shaped ``[a, b]``, the client keeping at least one block),
the codec each way, the micro-batches a batch is cut into and the client's gradient checkpointing. Top-k
is left out by default: on residual-stream activations it ruined the model (docs/efficiency.md). Choices
are ranked by how much of the frozen weights they quantize, then by predicted step time; within 1% of each
other, the deeper first cut wins (the client's text goes through more blocks before anything leaves it), then
the less lossy codecs, then the U-shape (labels stay with the client), then fewer micro-batches and no
recomputation.

A U-shape's top keeps one block (the last), and more only when the server would not fit otherwise: more
top blocks cost the client memory and time and buy nothing else, so the search walks ``b`` down only as far
as the server's budget needs (``b`` of every ``a`` would be hundreds of thousands of choices on a 30-block model).
Frozen block weights are quantized the same way: a party's blocks go to int8, then nf4, only when that party
would not fit otherwise (quantization changes the model a little and costs time to dequantize), and an untied head
last (nf4, computed a slice of the vocabulary at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..config import CodecConfig, ConfigError, RunConfig
from ..report.progress import human_bytes
from .cost import Prediction, predict
from .profile import Profile

if TYPE_CHECKING:
    from ..privacy.leak_table import LeakTable

CODECS = ("raw", "bf16", "int8", "int4")
LOSS = {"raw": 0, "fp16": 1, "bf16": 1, "int8": 2, "int4": 3, "topk": 4}  # how much each codec changes what crosses
SHAPES = ("two-part", "u-shape", "any")
TIE = 0.01  # step times this close are a tie


class BudgetError(ConfigError):
    """No choice fits the memory given; the message names the smallest footprint and what it is made of."""


QUANTIZE = ("none", "int8", "nf4")  # in the order the search tries them: each packs more and changes the model more
PACKED = {"none": 0, "int8": 1, "nf4": 2, "fp4": 2}


@dataclass(frozen=True)
class Choice:
    cuts: tuple[int, ...]
    up: str
    down: str
    micro_batches: int
    checkpointing: bool
    client_quantize: str = "none"  # the client's blocks (bottom and top)
    server_quantize: str = "none"  # the server's (trunk)
    head_quantize: str = "none"  # the LM head (an untied one), packed when the blocks packed are not enough

    @property
    def shape(self) -> str:
        return "two-part" if len(self.cuts) == 1 else "u-shape"

    def describe(self) -> str:
        ckpt = ", gradient checkpointing" if self.checkpointing else ""
        quant = "".join(f", {party} {kind}" for party, kind in (("client blocks", self.client_quantize),
                                                                ("server blocks", self.server_quantize), ("head", self.head_quantize))
                        if kind != "none")
        return (f"cuts {list(self.cuts)} ({self.shape}), codec {self.up}/{self.down}, {self.micro_batches} "
                f"micro-batch{'es' if self.micro_batches > 1 else ''}{ckpt}{quant}")

    @property
    def quantize(self) -> dict[str, str]:
        return {"bottom": self.client_quantize, "trunk": self.server_quantize, "top": self.client_quantize, "head": self.head_quantize}

    def apply(self, base: RunConfig) -> RunConfig:
        """``base`` with this choice (no re-validation: every value here is valid)."""
        train = {"micro_batches": self.micro_batches}
        train["gradient_checkpointing"] = self.checkpointing
        quantize = base.quantize.model_copy(update=self.quantize) if self.quantize != _NONE else base.quantize
        return base.model_copy(update={"cuts": list(self.cuts), "mode": "split", "codec": CodecConfig(up=self.up, down=self.down),
                                       "train": base.train.model_copy(update=train), "quantize": quantize})


_NONE = {"bottom": "none", "trunk": "none", "top": "none", "head": "none"}


@dataclass
class Ranked:
    choice: Choice
    prediction: Prediction
    config: RunConfig
    guard: Any = None  # --max-leak: the leak table's point that bounds this choice (``leak.Guard``), its defense in ``config``


@dataclass
class PlanResult:
    ranked: list[Ranked]  # the choices that fit, best first
    considered: int
    notes: list[str] = field(default_factory=list)


def choices(n_blocks: int, batch: int, shape: str = "any", codecs: tuple[str, ...] = CODECS,
            checkpointing: tuple[bool, ...] = (False, True), every_top: bool = False) -> list[Choice]:
    """Every choice; a U-shape's top keeps only the last block unless ``every_top``."""
    if shape not in SHAPES:
        raise ConfigError(f"--shape {shape!r} is not one of {', '.join(SHAPES)}")
    cuts: list[tuple[int, ...]] = []
    if shape in ("two-part", "any"):
        cuts += [(a,) for a in range(1, n_blocks)]
    if shape in ("u-shape", "any"):
        cuts += [(a, b) for a in range(1, n_blocks - 1) for b in (range(a + 1, n_blocks) if every_top else [n_blocks - 1])]
    micro = [m for m in range(1, batch + 1) if batch % m == 0]
    return [Choice(c, up, down, m, g) for c in cuts for up in codecs for down in codecs for m in micro for g in checkpointing]


def _rank(r: Ranked) -> tuple:
    c, p = r.choice, r.prediction
    packed = PACKED[c.client_quantize] + PACKED[c.server_quantize] + PACKED[c.head_quantize]
    return (packed, round(math.log(max(p.step_s, 1e-9)) / math.log1p(TIE)), -c.cuts[0], LOSS[c.up] + LOSS[c.down],
            c.shape != "u-shape", c.micro_batches, c.checkpointing, c.cuts)


def search(base: RunConfig, profile: Profile, client_memory: int, server_memory: int | None = None,
           bandwidth_mbps: float | None = None, latency_ms: float = 0.0, shape: str = "any",
           codecs: tuple[str, ...] = CODECS, server_speed: float = 1.0, leak: "LeakTable | None" = None,
           max_leak: float | None = None) -> PlanResult:
    """Predict every choice on ``base`` (its data, LoRA, segments, steps), keep those within the budgets
    (bytes), best first; a ``BudgetError`` when none fits. With a leak table and ``max_leak``, only choices (and
    defense settings) that hold the strongest adaptive attack's ROUGE-L within it (``leak.py``)."""
    def weigh(c: Choice) -> Ranked:
        cfg = c.apply(base)
        return Ranked(c, predict(cfg, profile, bandwidth_mbps, latency_ms, server_speed=server_speed), cfg)

    def over(r: Ranked, party: str) -> bool:
        if party == "client":
            return r.prediction.client_peak_bytes > client_memory
        return server_memory is not None and r.prediction.server_peak_bytes > server_memory

    every = []
    base_q = base.quantize
    for c in choices(profile.sizes.n_blocks, base.train.batch_size, shape, codecs):
        c = replace(c, client_quantize=base_q.bottom, server_quantize=base_q.trunk, head_quantize=base_q.head)  # the config's own
        r = weigh(c)

        def pack(party: str) -> None:  # a party's frozen blocks quantized only as far as its budget needs
            nonlocal c, r
            name = f"{party}_quantize"
            while over(r, party) and getattr(c, name) in QUANTIZE[:-1]:
                c = replace(c, **{name: QUANTIZE[QUANTIZE.index(getattr(c, name)) + 1]})
                r = weigh(c)

        pack("server")
        while over(r, "server") and c.shape == "u-shape" and c.cuts[1] - 1 > c.cuts[0]:
            c = replace(c, cuts=(c.cuts[0], c.cuts[1] - 1))  # one more block on the client's top, one less on the server
            r = weigh(c)
        pack("client")
        holder = "client" if c.shape == "u-shape" else "server"
        if over(r, holder) and c.head_quantize == "none" and not profile.sizes.tied_params:
            c = replace(c, head_quantize=QUANTIZE[-1])  # the head: the largest single weight, packed last
            r = weigh(c)
        every.append(r)
    fits_client = [r for r in every if r.prediction.client_peak_bytes <= client_memory]
    if not fits_client:
        raise BudgetError(_too_small("client", "--client-memory", client_memory, every))
    fits = [r for r in fits_client if server_memory is None or r.prediction.server_peak_bytes <= server_memory]
    if not fits:
        raise BudgetError(_too_small("server", "--server-memory", server_memory, fits_client))
    notes = []
    if "topk" not in codecs:
        notes.append("top-k is not searched: on activations it ruined the model (docs/efficiency.md)")
    if leak is not None and max_leak is not None:
        from .leak import meet

        return PlanResult(meet(fits, leak, max_leak, _rank), len(every), notes)
    return PlanResult(sorted(fits, key=_rank), len(every), notes)


def footprint(memory: dict[str, int]) -> str:
    names = {"runtime": "runtime (an empty party process)", "weights": "weights", "optimizer": "trainable state (parameters, "
             "gradients, AdamW moments)", "activations": "activations"}
    return ", ".join(f"{names[k]} {human_bytes(v)}" for k, v in memory.items())


def _too_small(party: str, flag: str, budget: int, among: list[Ranked]) -> str:
    key = (lambda r: r.prediction.client_peak_bytes) if party == "client" else (lambda r: r.prediction.server_peak_bytes)
    least = min(among, key=key)
    memory = least.prediction.client_memory if party == "client" else least.prediction.server_memory
    fitted = " among the choices that fit the client" if party == "server" else ""
    return (f"no choice fits {flag} {human_bytes(budget)}: the smallest {party} footprint{fitted} is {human_bytes(key(least))}, "
            f"with {least.choice.describe()}; it holds {footprint(memory)}. Give the {party} more memory, or plan a smaller "
            "batch (--batch) or shorter sequences (--seq-len)")
