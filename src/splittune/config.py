"""The run configuration: YAML validated by pydantic, overridable key by key with ``--set``.

Every section forbids unknown keys, so a typo is an error that names the key and the allowed ones
instead of a silently ignored setting.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .device import check_name

SegmentName = Literal["bottom", "trunk", "top"]
TrainMode = Literal["lora", "frozen", "full"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


class SplittuneWarning(UserWarning):
    """A setting that runs but probably not as meant (the CLI prints it as one ``warning:`` line)."""


class SplittuneDeprecationWarning(SplittuneWarning, FutureWarning):
    """A spelling that still works but will go; the message says what to write instead."""


def warn(message: str, category: type[Warning] = SplittuneWarning) -> None:
    warnings.warn(message, category, stacklevel=3)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # a section written as a plain string means this one of its keys (``data: my.jsonl`` is ``data.source``)
    shorthand: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if cls.shorthand is not None and isinstance(value, str):
            return {cls.shorthand: value}
        return value


class DataConfig(Section):
    """Where the examples come from and how many; a plain string is ``data.source``."""

    shorthand: ClassVar[str | None] = "source"

    source: str = Field(
        "builtin:shakespeare",
        description="builtin:shakespeare | builtin:sentiment | a local .txt/.jsonl/.csv file | hf:NAME (a hub dataset)",
    )
    task: Literal["auto", "causal_lm", "instruction"] = Field(
        "auto", description="auto: instruction for prompt/response, chat or labelled data, causal_lm for raw text"
    )
    eval_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="share of documents held out for evaluation")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training examples (after packing)")
    max_eval_examples: int | None = Field(64, ge=1, description="cap on evaluation examples")
    max_documents: int | None = Field(None, ge=1, description="read at most this many documents from the source")
    text_field: str = Field("text", description="field of a .jsonl/.csv record holding raw text")
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
    checkpoint_every: int = Field(
        0, ge=0, description="both parties checkpoint every N steps (0: only at the end); the same command resumes"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the model weights and activations")
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
        from .wire.codecs import make_codec_with_feedback

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


class DxDefense(Section):
    """dχ-privacy (metric local DP, Feyisetan et al. 2020) on the client's token embeddings: each token's embedding
    gets noise of density ∝ exp(−ε‖z‖), so two tokens at distance d are ε·d-indistinguishable (docs/privacy.md)."""

    name: Literal["dx"]
    epsilon: float = Field(..., gt=0.0, description="privacy per unit of embedding distance (smaller: more noise)")
    snap: bool = Field(False, description="replace each noised embedding by its nearest token embedding (a token substitution)")


class GaussianDefense(Section):
    """Clipped Gaussian noise on the smashed activations the client sends: each token's row clipped to L2 norm
    ``clip``, then N(0, (sigma·clip)²) per value; an RDP accountant composes it over every release."""

    name: Literal["gaussian"]
    sigma: float = Field(..., ge=0.0, description="noise multiplier: the noise std over the clip norm (0: clip only, no guarantee)")
    clip: float = Field(..., gt=0.0, description="L2 norm each token's activation row is clipped to")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="the δ of the reported (ε, δ)")


class NoPeekDefense(Section):
    """NoPeek (Vepakomma et al. 2020): the client's loss adds alpha × the distance correlation between its inputs
    (token embeddings) and the smashed activations it sends, so training makes them less alike."""

    name: Literal["nopeek"]
    alpha: float = Field(..., ge=0.0, description="weight of the distance-correlation term")


class LabelNoiseDefense(Section):
    """Noise on the gradient a U-shaped client's top sends the server, which otherwise tells each example's class
    (Li et al., ICLR'22): ``marvell`` draws per-class Gaussian noise shaped to minimise the KL bound on what the server
    can infer within a power budget; ``max-norm`` lifts every example's gradient to the batch's largest norm."""

    name: Literal["label-noise"]
    method: Literal["marvell", "max-norm"] = Field(
        "marvell", description="marvell (optimised per-class noise) | max-norm (the heuristic baseline: each example's "
        "expected squared norm raised to the batch's largest)")
    power: float = Field(
        4.0, ge=0.0, description="marvell's noise budget: the expected squared noise norm per example, averaged over the "
        "two classes, in units of the squared distance between their mean gradients (0: no noise, the max-norm fallback "
        "included; max-norm ignores it)")


Defense = Annotated[DxDefense | GaussianDefense | NoPeekDefense | LabelNoiseDefense, Field(discriminator="name")]
DEFENSE_NAMES = ("dx", "gaussian", "nopeek", "label-noise")


class DpSgdConfig(Section):
    """DP-SGD on the client's adapters (Abadi et al. 2016): each example's gradient clipped to ``max_grad_norm``, summed,
    plus N(0, (noise_multiplier·max_grad_norm)²); it protects the adapters, not what crosses the cut."""

    noise_multiplier: float | None = Field(None, ge=0.0, description="noise std over max_grad_norm (give this or target_epsilon)")
    target_epsilon: float | None = Field(None, gt=0.0, description="the ε the run must stay within: the noise multiplier "
                                         "is found for the run's steps and sampling rate (opacus)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="L2 norm each example's gradient of the client's adapters is clipped to")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="the δ of the reported (ε, δ)")

    @model_validator(mode="after")
    def _one_noise(self) -> "DpSgdConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp_sgd takes either noise_multiplier or target_epsilon (exactly one)")
        return self


class RunConfig(Section):
    model: str = Field(
        "builtin:smollm2-135m",
        description="builtin:NAME | tiny:MODEL_TYPE[,layers=N,hidden=N,heads=N,kv_heads=N,ffn=N,vocab=N,seed=N] | "
        "a local directory | a hub id",
    )
    cuts: list[int] | None = Field(
        None,
        description="[a]: two-part split (labels go to the server); [a, b]: U-shaped split (labels stay); auto (null): "
        "U-shaped with two blocks each side (fewer on small models), resolved when the model is known. "
        "mode: centralized and federated have no cuts",
        json_schema_extra={"allowed": "auto | [a] | [a, b] (block indices)", "default": "auto"},
    )
    mode: Literal["split", "centralized", "federated"] = Field(
        "split", description="split | centralized (no split: the baseline) | federated (each client trains the whole model, FedAvg)"
    )
    seed: int = Field(0, description="seeds the LoRA initialisation, data splits, partitions and batch order")
    clients: int = Field(1, ge=1, description="data owners training one model with one server")
    schedule: Schedule = Field("sfl-v2", description="how clients take turns with the server (mode: split, clients > 1)")
    aggregate_every: int = Field(
        1, ge=1, description="local steps between adapter averages (sequential: steps of a client's turn before it relays)"
    )
    partition: Partition = Field("iid", description="how one dataset is split across clients")
    partition_alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (partition: dirichlet); small = skewed")
    client_overrides: list[ClientOverride] | dict[int, ClientOverride] = Field(
        default_factory=dict,
        description="per-client cuts, LoRA rank and data source: a list, or a map by client index, of "
        "{cuts: [..], lora: {rank: N}, data: {source: S}} (data: S is data.source)",
        json_schema_extra={"allowed": "a list, or a map by client index, of client sections (see client_overrides entries)"},
    )
    personal: list[SegmentName] = Field(
        default_factory=list, description="segments each client keeps for itself (trained, never replaced by the average)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)
    codec: CodecConfig = Field(default_factory=lambda: CodecConfig())
    padding_removal: bool = Field(True, description="positions the attention mask zeroes never cross the cut (lossless)")
    link: LinkConfig = Field(default_factory=lambda: LinkConfig())
    cache: CacheConfig = Field(default_factory=lambda: CacheConfig())
    defense: list[Defense] = Field(
        default_factory=list, description="defenses on what leaves the client, applied in this order (docs/privacy.md)",
        json_schema_extra={"allowed": "a list of `{name: dx, epsilon: E, snap: false}`, `{name: gaussian, sigma: S, clip: C, "
                           "delta: 1e-5}`, `{name: nopeek, alpha: A}`, `{name: label-noise, method: marvell, power: P}`"})
    dp_sgd: DpSgdConfig | None = Field(None, description="DP-SGD on the client's adapters (docs/privacy.md); null: off")
    secure_aggregation: bool = Field(
        False, description="clients' adapters reach the averaging only masked (pairwise X25519 masks, fixed point): the "
        "server learns their sum, never one client's update; needs averaging clients with one layout (docs/privacy.md)")
    defense_seed: int | None = Field(
        None, description="seeds the defenses' noise; it never leaves the client (the server knows `seed`, so noise drawn "
        "from it could be subtracted). null: a random seed, recorded in the run's config.yaml for resume")

    @field_validator("cuts", mode="before")
    @classmethod
    def _cuts_auto(cls, cuts: Any) -> Any:
        return None if cuts == "auto" else cuts

    @field_validator("cuts")
    @classmethod
    def _cuts_shape(cls, cuts: list[int] | None) -> list[int] | None:
        if cuts is None:
            return None
        if len(cuts) not in (1, 2):
            raise ValueError(f"cuts must have 1 (two-part) or 2 (U-shaped) block indices, got {len(cuts)}: {cuts}")
        if len(cuts) == 2 and cuts[0] >= cuts[1]:
            raise ValueError(f"cuts must be increasing, got {cuts}")
        if min(cuts) < 0:
            raise ValueError(f"cuts are block indices and cannot be negative, got {cuts}")
        return cuts

    def override(self, client: int) -> ClientOverride:
        overrides = self.client_overrides
        if isinstance(overrides, list):
            return overrides[client] if client < len(overrides) else ClientOverride()
        return overrides.get(client, ClientOverride())

    def client_cuts(self, client: int) -> list[int]:
        """This client's cuts; ``[]`` when the run has none (centralized, federated) or they are still auto."""
        return list(self.override(client).cuts or self.cuts or [])

    def client_rank(self, client: int) -> int:
        return self.override(client).rank or self.lora.rank

    def client_source(self, client: int) -> str:
        return self.override(client).data_source or self.data.source

    def resolve(self, n_blocks: int) -> "RunConfig":
        """This config for a model of ``n_blocks`` blocks: ``cuts: auto`` becomes real cuts in a split run
        (a centralized or federated run has none). This is the run's config (config.yaml, resume checks)."""
        if self.cuts is not None or self.mode != "split":
            return self
        return self.model_copy(update={"cuts": default_cuts(n_blocks)}, deep=True)

    @property
    def heterogeneous(self) -> bool:
        """Whether any client holds other blocks or another LoRA rank than the run's defaults."""
        cuts = list(self.cuts or [])
        return any(self.client_cuts(i) != cuts or self.client_rank(i) != self.lora.rank for i in range(self.clients))

    @model_validator(mode="after")
    def _clients_fit(self) -> "RunConfig":
        n = self.clients
        overrides = self.client_overrides
        indices = range(len(overrides)) if isinstance(overrides, list) else sorted(overrides)
        for i in indices:
            if not 0 <= i < n:
                raise ValueError(f"client_overrides names client {i}, but clients={n} (allowed indices 0..{n - 1})")
            o = self.override(i)
            if o.cuts is not None:
                try:
                    RunConfig._cuts_shape(o.cuts)
                except ValueError as err:
                    raise ValueError(f"client_overrides[{i}].cuts: {err}") from None
                run_len = len(self.cuts) if self.cuts is not None else 2  # auto cuts are U-shaped
                if self.mode == "split" and len(o.cuts) != run_len:
                    run = list(self.cuts) if self.cuts is not None else "auto (U-shaped)"
                    raise ValueError(
                        f"client_overrides[{i}].cuts={o.cuts} makes a {'two-part' if len(o.cuts) == 1 else 'U-shaped'} split, "
                        f"but the run's cuts={run} do not; every client must use the same split shape"
                    )
        if self.partition == "by_source":
            missing = [i for i in range(n) if self.override(i).data_source is None]
            if missing:
                raise ValueError(
                    f"partition: by_source takes each client's data from client_overrides[i].data.source; clients {missing} have none"
                )
        if n > 1 and self.train.eval_every % self.aggregate_every:
            raise ValueError(
                f"train.eval_every={self.train.eval_every} must be a multiple of aggregate_every={self.aggregate_every}: "
                "the global model exists only right after an average"
            )
        if self.personal and self.mode == "split" and self.schedule == "sequential":
            raise ValueError("schedule: sequential relays one client-side model from client to client; nothing can be personal")
        if "trunk" in self.personal:
            raise ValueError("personal: trunk is the server's segment; a client can keep only its own segments (bottom, top)")
        if self.heterogeneous and self.mode == "split" and self.schedule == "sequential":
            raise ValueError(
                "schedule: sequential relays one client-side model from client to client, so every client must keep "
                "the same cuts and LoRA rank; per-client overrides need sfl-v1 or sfl-v2"
            )
        if self.defense and self.mode != "split":
            raise ValueError(f"defense: {', '.join(d.name for d in self.defense)} act on what crosses a cut; mode: {self.mode} "
                             "has none (defenses need mode: split)")
        names = [d.name for d in self.defense]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"defense: {', '.join(twice)} is listed more than once; each defense takes one entry")
        if "label-noise" in names and self.mode == "split" and self.cuts is not None and len(self.cuts) == 1:
            raise ValueError(f"defense: label-noise hides the class in the gradient a U-shaped split's client sends; "
                             f"cuts={self.cuts} make a two-part split, where the server holds the labels themselves "
                             "(label-noise needs cuts: [a, b] or auto)")
        if self.dp_sgd is not None and self.mode == "centralized":
            raise ValueError("dp_sgd protects the client's adapters from the server and the other clients; mode: "
                             "centralized shares nothing (use mode: split or federated)")
        if self.dp_sgd is not None and self.train.gradient_checkpointing:
            raise ValueError("dp_sgd takes per-example gradients from the forward it saw, and train.gradient_checkpointing "
                             "runs the blocks again in backward; turn one of them off")
        if self.secure_aggregation:
            averages = n > 1 and (self.mode == "federated" or (self.mode == "split" and self.schedule != "sequential"))
            if not averages:
                raise ValueError("secure_aggregation hides each client's adapters inside an average, and this run averages "
                                 "nothing: it needs clients >= 2 and mode: federated or schedule: sfl-v1 / sfl-v2")
            if self.heterogeneous:
                raise ValueError("secure_aggregation sums every client's adapters as masked vectors of one layout, so every "
                                 "client needs the same cuts and LoRA rank (exact rank-heterogeneous averaging needs each "
                                 "client's factors in the clear); drop the cuts and lora.rank of client_overrides")
            if n < 3:
                warn("secure_aggregation with 2 clients hides each update from the server only: each client can "
                     "subtract its own update from the average it gets back and read the other's")
        if self.lora.experts and any(self.client_rank(i) != self.lora.rank for i in range(n)):
            raise ValueError("lora.experts: clients with other LoRA ranks are averaged exactly by folding each module's "
                             "update into its base weight, which splittune does not do for stacked expert weights; give "
                             "every client lora.rank, or set lora.experts: false")
        if self.lora.experts and n > 1 and self.mode == "split" and self.schedule == "sfl-v1":
            raise ValueError("lora.experts with schedule: sfl-v1 needs one batch through several clients' expert adapters, "
                             "which peft cannot mix yet; use schedule: sfl-v2 or sequential, or lora.experts: false")
        if self.personal and self.mode != "split":
            raise ValueError(f"personal segments are segments of a split; mode: {self.mode} has none")
        if self.heterogeneous and self.mode == "federated":
            if any(self.override(i).cuts for i in range(n)):
                raise ValueError("mode: federated trains the whole model on every client; per-client cuts do not apply")
        return self


def _parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, lists, null, booleans; anything else is a string)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` assignment to a nested dict, checking the key exists."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    path, _, raw = assignment.partition("=")
    keys = path.strip().split(".")
    model: type[BaseModel] = RunConfig
    node = tree
    for depth, key in enumerate(keys):
        fields = model.model_fields
        if key not in fields:
            where = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {path!r}: {key!r} is not one of {', '.join(public_fields(model))} (at {where})")
        annotation = fields[key].annotation
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if depth == len(keys) - 1:
            value = _parse_value(raw)
            shorthand = getattr(section, "shorthand", None)
            if shorthand is not None and isinstance(value, str):  # --set data=my.jsonl is data.source=my.jsonl
                _subtree(node, key, shorthand)[shorthand] = value
            else:
                node[key] = value
            return
        if section is None:
            raise ConfigError(f"config key {'.'.join(keys[: depth + 1])!r} is a value, not a section; cannot set {path!r}")
        node = _subtree(node, key, getattr(section, "shorthand", None))
        model = section


def _subtree(node: dict[str, Any], key: str, shorthand: str | None) -> dict[str, Any]:
    """The mapping under ``key`` (a section written as its shorthand string becomes ``{shorthand: string}``)."""
    value = node.get(key)
    if isinstance(value, str) and shorthand is not None:
        value = {shorthand: value}
    if not isinstance(value, dict):
        value = {}
    node[key] = value
    return value


def public_fields(model: type[BaseModel]) -> list[str]:
    """The keys a section offers (deprecated spellings still accepted are left out)."""
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config section a location points into (through lists and maps of sections), for naming its keys."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue  # a list index or map key stays in the same section
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_section(field.annotation)
    return model


def _inner_section(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional, unions, list[...] and dict[..., ...]
        found = _inner_section(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError) -> str:
    errors = err.errors()
    # a union (e.g. a list or a map of overrides) reports every member's errors, tagged like 'list[...]':
    # keep the member the input was written as, and drop the tags from the key
    tagged = [e for e in errors if any(isinstance(p, str) and "[" in p for p in e["loc"])]
    if tagged:
        mismatched = {e["loc"] for e in tagged if e["type"] in ("list_type", "dict_type")}
        errors = [e for e in errors if e["loc"] not in mismatched] or errors
    lines = []
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in loc) or "config"
        if e["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            allowed = f": {str(loc[-1])!r} is not one of {', '.join(public_fields(section))}" if section else ""
            lines.append(f"unknown config key {key!r}{allowed}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if loc else msg)
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(dict.fromkeys(lines))


def _read_yaml(path: Path) -> Any:
    """A YAML file's content, or a ConfigError naming the file (and the line and column of a syntax error)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line}; save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the builtin default), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(tree)


def validate(tree: dict[str, Any]) -> RunConfig:
    """A config from a plain mapping, or a ConfigError naming every bad key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
