"""What profiling measured (``Profile``) in fitted costs (``Fit``): the numbers the cost model and the search read,
whether measured on this machine (``profile.py``) or estimated from throughput (``estimate.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .batches import Batch
from .sizes import ModelSizes


@dataclass(frozen=True)
class Fit:
    """A cost that grows with a micro-batch's tokens: ``fixed + per_token · tokens`` (seconds or bytes)."""

    fixed: float = 0.0
    per_token: float = 0.0

    def __call__(self, tokens: float) -> float:
        return self.fixed + self.per_token * tokens

    @classmethod
    def through(cls, lo: tuple[float, float], hi: tuple[float, float]) -> "Fit":
        (x0, y0), (x1, y1) = lo, hi
        if x1 <= x0:
            return cls(0.0, max(y1, 0.0) / x1)
        slope = max((y1 - y0) / (x1 - x0), 0.0)
        return cls(max(y1 - slope * x1, 0.0), slope)


@dataclass
class Profile:
    model: str
    sizes: ModelSizes
    batch: int
    seq_len: int
    dtype: str
    device: str
    threads: int
    modes: tuple[str, ...]  # block train modes measured (frozen blocks are costed as lora ones)
    block_fwd: dict[str, Fit]
    block_bwd: dict[str, Fit]
    segment_fwd: Fit  # one segment run beyond its blocks: the model's prologue (embeddings, masks, positions)
    head_fwd: Fit  # final norm, head and loss
    head_bwd: Fit
    optimizer_s: float  # seconds per trainable parameter: the gradient norm and AdamW
    block_saved: dict[str, Fit]  # bytes autograd keeps per block until its backward
    shared_saved: Fit  # bytes every block of a segment run shares (masks, position tables)
    head_peak: Fit  # the head's forward and backward, high-water mark above its start
    block_peak: Fit  # a block's backward, high-water mark above its start
    trainable_itemsize: int  # bytes per trainable (LoRA) parameter
    runtime_server: int  # resident bytes of a party process before its weights
    runtime_client: int  # the same with the client's data
    runtime_client_peak: int = 0  # the high-water mark of building that data
    eval_tokens: int = 0  # the largest evaluation batch (rows × width)
    eval_peak: Fit = Fit()  # a no-grad head (evaluation): high-water mark above its start
    lazy_embeddings: bool = False  # a party reads only the embedding rows it looks up (see ``_lazy_embeddings``)
    engine_factor: float = 1.0  # how much slower the same work runs on a server engine's worker thread
    batches: list[Batch] = field(default_factory=list)  # the batches a run draws, in order (none: packed rows)
    estimated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def act_itemsize(self) -> int:
        from .sizes import ITEMSIZE

        return ITEMSIZE[self.dtype]

    def mode(self, mode: str) -> str:
        """The measured mode that stands for ``mode``."""
        if mode in self.block_fwd:
            return mode
        return "lora" if "lora" in self.block_fwd else next(iter(self.block_fwd))

    def to_dict(self) -> dict:
        return asdict(self)
