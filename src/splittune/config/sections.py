"""The sections of a run's config: data, training, LoRA, segments, per-client overrides, codecs, link emulation, the
activation cache, defenses and DP-SGD. Each validates its own keys and says what is allowed."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..defenses import defense, under
from ..device import check_name
from .base import ConfigError, Section, SplittuneDeprecationWarning, warn


SegmentName = Literal["bottom", "trunk", "top"]

TrainMode = Literal["lora", "frozen", "full"]
EvalMetric = Literal["exact_match", "rouge_l", "accuracy"]  # scores of generated answers (eval/tasks.py)

class DataConfig(Section):
    """Where the examples come from and how many; a plain string is ``data.source``."""

    shorthand: ClassVar[str | None] = "source"

    source: str = Field(
        "builtin:shakespeare",
        description="builtin:shakespeare | builtin:sentiment | a local .txt/.json/.jsonl/.csv file | a dataset directory | "
        "hf:NAME (a hub dataset)",
    )
    task: Literal["auto", "causal_lm", "instruction"] = Field(
        "auto", description="auto: instruction for prompt/response, chat or labelled data, causal_lm for raw text"
    )
    eval_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="share of documents held out for evaluation")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training examples (after packing)")
    max_eval_examples: int | None = Field(64, ge=1, description="cap on evaluation examples")
    max_documents: int | None = Field(None, ge=1, description="read at most this many documents from the source")
    text_field: str = Field("text", description="field of a .json/.jsonl/.csv record holding raw text")
    format: Literal["auto", "text", "pairs", "messages", "alpaca", "sharegpt"] = Field(
        "auto", description="the rows' layout (docs/models-and-data.md): auto detects it per row; text ({text, label?}), "
        "pairs ({prompt, response}, {question, answer}), messages (OpenAI chat), alpaca ({instruction, input?, output}), "
        "sharegpt ({conversations: [{from, value}]})")
    fields: dict[Literal["text", "label", "prompt", "response", "system", "messages"], str] = Field(
        default_factory=dict, description="your field names for ours, e.g. {prompt: question, response: answer, system: sys}",
        json_schema_extra={"default": "{}"})
    encoding: str = Field("utf-8", description="the text encoding of a local file (utf-8, cp1252, latin-1, …); a UTF-8 "
                          "byte-order mark is skipped")
    document_split: Literal["blank", "line", "file"] = Field(
        "blank", description="where a .txt file's documents part: at blank lines (grouped to about 2,000 characters), "
        "at every line (grouped the same way), or nowhere (the file is one document)")
    chat_turns: Literal["all", "last"] = Field(
        "all", description="which assistant turns of a multi-turn chat train: all of them (TRL's assistant-only loss) "
        "or only the last")
    truncation: Literal["cut", "refuse"] = Field(
        "cut", description="instruction rows longer than train.seq_len: cut at the end with a warning that counts them, "
        "or refuse to train")
    skip_bad_lines: bool = Field(False, description="skip rows that cannot be read (bad JSON, missing fields) and count "
                                 "them in a warning, instead of stopping at the first")
    hf_split: str = Field("train", description="split of a hub dataset")

class TrainConfig(Section):
    """How the run trains: steps, batches, optimizer, evaluations, checkpoints, where and with how many threads."""

    steps: int = Field(40, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(128, ge=8, description="tokens per example (packed text) or maximum length (instructions)")
    lr: float = Field(2e-4, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(2, ge=0, description="steps of linear warmup (should be fewer than steps)")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after warmup")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="global clipping across parties; null disables it")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    eval_batches: int | None = Field(None, ge=1, description="cap on evaluation batches")
    eval_metrics: list[EvalMetric] = Field(
        default_factory=list, description="instruction data: each evaluation also generates greedy answers to the first "
        "train.eval_generate held-out prompts through the split and scores them (generated_<metric> in evals.jsonl; "
        "docs/evaluation.md)", json_schema_extra={"allowed": "a list of: exact_match, rouge_l, accuracy (or one name)"})
    eval_generate: int = Field(8, ge=1, description="held-out examples train.eval_metrics generates answers for")
    checkpoint_every: int = Field(
        0, ge=0, description="both parties checkpoint every N steps (0: only at the end); the same command resumes"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the model weights and activations")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the quantized layers compute in (QLoRA's bnb_4bit_compute_dtype); null: train.autocast, "
        "else train.dtype")
    autocast: Literal["bfloat16", "float16"] | None = Field(
        None, description="mixed precision: both parties' matrix products in this dtype over float32 weights (torch.autocast); "
        "adapters, optimizer state and the loss stay float32. null: compute in train.dtype")
    loss_scale: float | Literal["dynamic"] = Field(
        "dynamic", description="when the compute is float16 (train.dtype, autocast or compute_dtype): dynamic (GradScaler's "
        "rule, shared by both parties; an overflow skips the step on both) or a fixed scale",
        json_schema_extra={"allowed": "dynamic | a number > 0"})
    device: str = Field("auto", description="where this process computes: auto (a GPU when there is one) | cpu | cuda | cuda:N | mps",
                        json_schema_extra={"allowed": "`auto`, `cpu`, `cuda`, `cuda:N`, `mps`"})
    model_dropout: bool = Field(
        False, description="keep the model's own dropout (off by default: each party has its own RNG)"
    )
    micro_batches: int = Field(
        1, ge=1, description="each batch is cut into this many micro-batches that cross the cut concurrently (pipelining); "
        "unlike grad_accum, which runs whole batches one after another, it changes no result"
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="micro-batches in flight at once (back-pressure on activation memory); null: all of a step's"
    )
    gradient_checkpointing: bool = Field(
        False, description="the client's blocks (bottom and top; the whole model in mode: centralized) keep only their inputs "
        "for backward and run again in it: less activation memory for one more forward per block, same results"
    )
    server_gradient_checkpointing: bool = Field(
        False, description="the same for the server's blocks (proposed to the server in the hello; every client must agree)"
    )
    threads: int | str = Field(
        "auto",
        description="CPU compute threads of this process (torch.set_num_threads); auto: half the cores (at most 8) when parties "
        "compute at once in this process (several clients, or pipelined micro-batches); every core when they take turns "
        "(one client) or for a lone party (centralized, a client of a remote server, serve)",
        json_schema_extra={"allowed": "auto | an integer >= 1"},
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("eval_metrics", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("loss_scale", mode="before")
    @classmethod
    def _loss_scale(cls, value: Any) -> float | str:
        if value == "dynamic" or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
            return value
        raise ValueError(f"must be dynamic or a number > 0, got {value!r}")

    @model_validator(mode="after")
    def _autocast_over_float32(self) -> "TrainConfig":
        if self.autocast is not None and self.dtype != "float32":
            raise ValueError(f"train.autocast computes in {self.autocast} over float32 weights, but train.dtype is {self.dtype}, "
                             f"which already computes in {self.dtype}: set train.dtype: float32, or drop train.autocast")
        return self

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or an integer >= 1, got {value!r}")

class LoraConfig(Section):
    """LoRA adapters of the segments that train with ``lora``."""

    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] | str | None = Field(
        None, description="module names to adapt; null: the architecture's default; 'all-linear' for every linear layer",
        json_schema_extra={"allowed": "a list of module names, `all-linear`, or null"},
    )
    experts: bool = Field(False, description="also adapt a mixture-of-experts block's stacked expert weights (one LoRA per "
                          "expert, peft's target_parameters); by default only attention and other linear layers adapt")

class SegmentsConfig(Section):
    """How each segment trains: LoRA adapters, frozen, or all its weights."""

    bottom: TrainMode = Field("lora", description="embeddings and the blocks before the first cut (client)")
    trunk: TrainMode = Field("lora", description="the blocks between the cuts (server)")
    top: TrainMode = Field("lora", description="the blocks after the second cut, final norm and head (client, U-shaped)")

class RayResources(Section):
    """What a Ray actor asks the cluster for (fractions allowed, as Ray allows)."""

    num_cpus: float = Field(1.0, ge=0.0, description="CPUs the actor takes (its torch threads: at least one)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs the actor takes (a fraction shares one)")


class RayConfig(Section):
    """The Ray engine (engine: ray): where the cluster is and what the server's actor asks of it."""

    address: str | None = Field(None, description="a running cluster to join (ray start --head; `ray://HOST:10001` or "
                                "`HOST:6379`); null: start a local cluster of this machine's CPUs for the run")
    server_resources: RayResources = Field(default_factory=lambda: RayResources(),
                                           description="the server's trunk actor: {num_cpus, num_gpus}")
    trunk_spans: int = Field(1, ge=1, description="the server's trunk cut into this many consecutive spans, each a Ray actor "
                             "on ray.server_resources (its own GPU when there are GPUs), exact across spans; U-shaped splits "
                             "whose clients share the server's adapter and cuts")
    client_workers: int = Field(0, ge=0, description="client worker actors the run's clients are spread over (client i on "
                                "worker i mod K, each worker's clients on one copy of the frozen weights); 0: the clients "
                                "run in the driver's process")
    client_resources: RayResources = Field(default_factory=lambda: RayResources(),
                                           description="each client worker actor: {num_cpus, num_gpus}")


Quantize = Literal["none", "nf4", "fp4", "int8"]


class QuantizeConfig(Section):
    """Frozen base weights of each segment's blocks stored quantized (bitsandbytes, as transformers' BitsAndBytesConfig):
    nf4 / fp4 4-bit (QLoRA), int8 LLM.int8. LoRA adapters stay float32; embeddings, norms and head stay in the compute
    dtype. ``quantize: nf4`` sets every segment."""

    bottom: Quantize = Field("none", description="the client's bottom blocks")
    trunk: Quantize = Field("none", description="the server's blocks (serve --quantize fixes them for every client)")
    top: Quantize = Field("none", description="the client's top blocks (U-shaped)")
    head: Quantize = Field("none", description="the LM head (whoever holds it); transformers leaves it unquantized, a head tied "
                           "to the embeddings cannot be")
    double_quant: bool = Field(False, description="4-bit: quantize the quantization constants too (QLoRA's double "
                               "quantization, about 0.4 bits per weight less)")

    @model_validator(mode="before")
    @classmethod
    def _one_for_all(cls, value: Any) -> Any:
        return {"bottom": value, "trunk": value, "top": value} if isinstance(value, str) else value

    @property
    def active(self) -> bool:
        return any(k != "none" for k in (self.bottom, self.trunk, self.top, self.head))


class ClientLora(Section):
    """A client's own LoRA settings: only the rank may differ from client to client."""

    rank: int | None = Field(None, ge=1, description="LoRA rank of this client's own segments (null: lora.rank)")

class ClientData(Section):
    """A client's own data; a plain string is ``source``."""

    shorthand: ClassVar[str | None] = "source"

    source: str | None = Field(None, description="this client's data source (partition: by_source; null: data.source)")

class ClientOverride(Section):
    """What one client does differently: a weak client keeps fewer blocks and a smaller LoRA rank.

    The keys have the top level's shapes (``cuts``, ``lora: {rank: N}``, ``data: {source: S}`` or ``data: S``);
    the older ``lora_rank`` and ``source`` still work, with a deprecation warning.
    """

    cuts: list[int] | None = Field(None, description="this client's cuts (same split shape as the run's cuts)")
    lora: ClientLora = Field(default_factory=ClientLora)
    data: ClientData = Field(default_factory=ClientData)
    lora_rank: int | None = Field(None, ge=1, exclude=True, description="deprecated: lora: {rank: N}")
    source: str | None = Field(None, exclude=True, description="deprecated: data: {source: S}")

    @model_validator(mode="after")
    def _old_spellings(self) -> "ClientOverride":
        for old, section, key in (("lora_rank", "lora", "rank"), ("source", "data", "source")):
            value = self.__dict__[old]
            if value is None:
                continue
            new = getattr(self.__dict__[section], key)
            if new is not None and new != value:
                raise ValueError(f"{old}={value!r} and {section}.{key}={new!r} disagree; write only {section}: {{{key}: ...}}")
            warn(f"client_overrides: {old}: {value!r} is deprecated; write {section}: {{{key}: {value!r}}}",
                 SplittuneDeprecationWarning)
            # the canonical spelling holds the value (and is what config.yaml records); no re-validation loop
            self.__dict__[section] = self.__dict__[section].model_copy(update={key: value})
            self.__dict__[old] = None
        return self

    @property
    def rank(self) -> int | None:
        return self.lora.rank

    @property
    def data_source(self) -> str | None:
        return self.data.source

Schedule = Literal["sequential", "sfl-v1", "sfl-v2"]

Partition = Literal["iid", "dirichlet", "by_source"]

def default_cuts(n_blocks: int) -> list[int]:
    """``cuts: auto``: U-shaped, two blocks on each side of the server, fewer on small models ([1, 3] for 4 blocks)."""
    if n_blocks < 2:
        raise ConfigError(
            f"cuts: auto makes a U-shaped split, which needs at least 2 blocks; this model has {n_blocks}: "
            "set cuts=[0] for a two-part split (the labels then go to the server)"
        )
    if n_blocks == 2:
        return [0, 1]
    k = min(2, max(1, (n_blocks - 1) // 2))
    return [k, n_blocks - k]

CodecSpec = str | dict[str, Any]

ALLOWED_CODECS = ("`raw`, `fp16`, `bf16`, `int8`, `int4`, `topk`, or a map `{name: int8, stochastic: true}` "
                  "(int8: `stochastic`, `scales`; int4: `group` 32 or 64; topk: `fraction`; any lossy codec: `error_feedback`)")

class CodecConfig(Section):
    """What each direction's activations and gradients are encoded with on the wire (docs/efficiency.md)."""

    up: CodecSpec = Field("raw", description="client → server: one codec for every tensor role, or {hidden: codec, grad: codec} "
                          "(docs/efficiency.md)", json_schema_extra={"allowed": ALLOWED_CODECS})
    down: CodecSpec = Field("raw", description="server → client: as up", json_schema_extra={"allowed": ALLOWED_CODECS})

    @field_validator("up", "down")
    @classmethod
    def _known(cls, spec: CodecSpec) -> CodecSpec:
        from ..wire.codecs import make_codec_with_feedback

        roles = spec if isinstance(spec, dict) and "name" not in spec else {"hidden": spec}
        for role, codec in roles.items():
            if role not in ("hidden", "grad"):
                raise ValueError(f"unknown tensor role {role!r}; roles: hidden, grad (or a codec for both)")
            make_codec_with_feedback(codec)
        return spec

class LinkConfig(Section):
    """An emulated link between the parties (any channel): each frame arrives after the latency plus its
    bytes over the bandwidth, queued behind the frames before it in its direction."""

    bandwidth_mbps: float | None = Field(None, gt=0.0, description="megabits per second each way; null: no emulation")
    latency_ms: float = Field(0.0, ge=0.0, description="one-way latency")
    up_mbps: float | None = Field(None, gt=0.0, description="client → server bandwidth (overrides bandwidth_mbps)")
    down_mbps: float | None = Field(None, gt=0.0, description="server → client bandwidth (overrides bandwidth_mbps)")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.bandwidth_mbps, self.up_mbps, self.down_mbps)) or self.latency_ms > 0

SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

def parse_size(value: Any) -> int:
    """A byte count: an integer, or a number and a unit (``512MB``, ``1.5GiB``; kB/MB/GB are powers of 1000,
    KiB/MiB/GiB powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().replace(" ", "").lower()
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):] or "b"
        try:
            size = float(number)
        except ValueError:
            size = -1.0
        if unit in SIZE_UNITS and size >= 0 and size * SIZE_UNITS[unit] < 2**63:
            return int(size * SIZE_UNITS[unit])
    raise ValueError(f"must be a byte count: a non-negative integer or a size like 512MB or 1GiB, got {value!r}")

class CacheConfig(Section):
    """The activation cache (docs/efficiency.md): with a frozen, deterministic bottom, each training sample's
    activations cross the cut once and the server reuses them in later epochs."""

    max_bytes: int = Field(
        2**30, description="what the server may hold for each client (least recently used evicted); 0 turns the cache off and "
        "forbids the server to keep activations. It switches itself off when the bottom trains or what crosses is not "
        "the same every time", json_schema_extra={"allowed": "a byte count: an integer or a size like `512MB`, `1GiB`", "default": "1GiB"},
    )

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

# each defense's entry is the ``Settings`` of its class in ``defenses/`` (one file per defense): the union of those
# under the ``defense`` key, told apart by name, and DP-SGD's own key
DEFENSE_ENTRIES = tuple(cls.Settings for cls in under("defense"))
Defense = Annotated[Union[DEFENSE_ENTRIES], Field(discriminator="name")]
DEFENSE_NAMES = tuple(cls.name for cls in under("defense"))
DpSgdConfig = defense("dp_sgd").Settings
