"""The run configuration: YAML validated by pydantic, overridable key by key with ``--set``.

Every section forbids unknown keys, so a typo is an error that names the key and the allowed ones
instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .device import check_name

SegmentName = Literal["bottom", "trunk", "top"]
TrainMode = Literal["lora", "frozen", "full"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
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
    steps: int = Field(40, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(128, ge=8, description="tokens per example (packed text) or maximum length (instructions)")
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(2, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="global clipping across parties; null disables it")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after)")
    eval_batches: int | None = Field(None, ge=1, description="cap on evaluation batches")
    checkpoint_every: int = Field(
        0, ge=0, description="both parties checkpoint every N steps (0: only at the end); the same command resumes"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="where this process computes: auto (a GPU when there is one) | cpu | cuda | cuda:N | mps")
    model_dropout: bool = Field(
        False, description="keep the model's own dropout (off by default: each party has its own RNG)"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        return check_name(name)


class LoraConfig(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = Field(
        None, description="module names to adapt; null: the architecture's default; 'all-linear' for every linear layer"
    )


class SegmentsConfig(Section):
    """How each segment trains: LoRA adapters, frozen, or all its weights."""

    bottom: TrainMode = "lora"
    trunk: TrainMode = "lora"
    top: TrainMode = "lora"


class ClientOverride(Section):
    """What one client does differently: a weak client keeps fewer blocks and a smaller LoRA rank."""

    cuts: list[int] | None = Field(None, description="this client's cuts (same split shape as the run's cuts)")
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank of this client's own segments")
    source: str | None = Field(None, description="this client's data source (partition: by_source)")


Schedule = Literal["sequential", "sfl-v1", "sfl-v2"]
Partition = Literal["iid", "dirichlet", "by_source"]


class RunConfig(Section):
    model: str = Field("builtin:smollm2-135m", description="builtin:NAME | tiny:MODEL_TYPE | local dir | hub id")
    cuts: list[int] = Field(
        default_factory=lambda: [2, 28],
        description="[a]: two-part split (labels go to the server); [a, b]: U-shaped split (labels stay)",
    )
    mode: Literal["split", "centralized", "federated"] = Field(
        "split", description="split | centralized (no split: the baseline) | federated (each client trains the whole model, FedAvg)"
    )
    seed: int = 0
    clients: int = Field(1, ge=1, description="data owners training one model with one server")
    schedule: Schedule = Field("sfl-v2", description="how clients take turns with the server (mode: split, clients > 1)")
    aggregate_every: int = Field(
        1, ge=1, description="local steps between adapter averages (sequential: steps of a client's turn before it relays)"
    )
    partition: Partition = Field("iid", description="how one dataset is split across clients")
    partition_alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (partition: dirichlet); small = skewed")
    client_overrides: list[ClientOverride] | dict[int, ClientOverride] = Field(
        default_factory=dict, description="per-client cuts, LoRA rank and data source: a list, or a map by client index"
    )
    personal: list[SegmentName] = Field(
        default_factory=list, description="segments each client keeps for itself (trained, never replaced by the average)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)

    @field_validator("cuts")
    @classmethod
    def _cuts_shape(cls, cuts: list[int]) -> list[int]:
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
        return list(self.override(client).cuts or self.cuts)

    def client_rank(self, client: int) -> int:
        return self.override(client).lora_rank or self.lora.rank

    @property
    def heterogeneous(self) -> bool:
        """Whether any client holds other blocks or another LoRA rank than the run's defaults."""
        return any(self.client_cuts(i) != list(self.cuts) or self.client_rank(i) != self.lora.rank for i in range(self.clients))

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
                if len(o.cuts) != len(self.cuts):
                    raise ValueError(
                        f"client_overrides[{i}].cuts={o.cuts} makes a {'two-part' if len(o.cuts) == 1 else 'U-shaped'} split, "
                        f"but the run's cuts={list(self.cuts)} do not; every client must use the same split shape"
                    )
        if self.partition == "by_source":
            missing = [i for i in range(n) if self.override(i).source is None]
            if missing:
                raise ValueError(
                    f"partition: by_source takes each client's data from client_overrides[i].source; clients {missing} have none"
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
            raise ConfigError(f"unknown config key {path!r}: {key!r} is not one of {', '.join(fields)} (at {where})")
        annotation = fields[key].annotation
        if depth == len(keys) - 1:
            node[key] = _parse_value(raw)
            return
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config key {'.'.join(keys[: depth + 1])!r} is a value, not a section; cannot set {path!r}")
        node = node.setdefault(key, {})
        model = annotation


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
            allowed = f": {str(loc[-1])!r} is not one of {', '.join(section.model_fields)}" if section else ""
            lines.append(f"unknown config key {key!r}{allowed}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if loc else msg)
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(dict.fromkeys(lines))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config (or the builtin default), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
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
