"""``RunConfig``: a whole run's config, its cross-section checks, and each client's view of it (overrides applied)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..defenses import configured
from .base import Section, warn
from .sections import RayConfig, CacheConfig, ClientOverride, CodecConfig, DataConfig, Defense, DpSgdConfig, LinkConfig, LoraConfig, Partition, Schedule, SegmentName, SegmentsConfig, QuantizeConfig, TrainConfig, default_cuts



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
    clients_per_round: int | float | None = Field(
        None, description="client sampling: the clients each round (aggregate_every steps) trains, an integer or a fraction "
        "of clients, drawn from seed and recorded in the summary; the average weighs the sampled clients' data. null: all",
        json_schema_extra={"allowed": "null | an integer 1..clients | a fraction in (0, 1]"})
    partition: Partition = Field("iid", description="how one dataset is split across clients")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = Field(
        default_factory=list, description="tracking tools that receive every step, evaluation and the run's outcome, as in "
        "transformers' report_to (tensorboard: RUN_DIR/tensorboard; mlflow: RUN_DIR/mlruns or MLFLOW_TRACKING_URI; "
        "wandb: RUN_DIR/wandb, offline unless logged in; pip install 'splittune[tracking]')",
        json_schema_extra={"allowed": "a list of: tensorboard, mlflow, wandb, none (or one name)"})
    engine: Literal["local", "ray"] = Field(
        "local", description="where parties execute: local (this process; a client of `splittune serve` with --server) | ray "
        "(the server's trunk in a Ray actor: ray.*; pip install 'splittune[ray]')")
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
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
    quantize: QuantizeConfig = Field(default_factory=lambda: QuantizeConfig(),
                                     json_schema_extra={"allowed": "none | nf4 | fp4 | int8, or a map {bottom, trunk, top, "
                                                        "double_quant}"})
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
    def round_size(self) -> int:
        """Clients each round samples (every client without ``clients_per_round``)."""
        k = self.clients_per_round
        if k is None:
            return self.clients
        return k if isinstance(k, int) else max(1, round(k * self.clients))

    @property
    def samples_clients(self) -> bool:
        return self.round_size < self.clients

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("clients_per_round", mode="before")
    @classmethod
    def _per_round(cls, value: Any) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, float) and 0 < value <= 1:
            return value
        raise ValueError(f"must be an integer >= 1 or a fraction in (0, 1], got {value!r}")

    @property
    def heterogeneous(self) -> bool:
        """Whether any client holds other blocks or another LoRA rank than the run's defaults."""
        cuts = list(self.cuts or [])
        return any(self.client_cuts(i) != cuts or self.client_rank(i) != self.lora.rank for i in range(self.clients))

    @property
    def scales_loss(self) -> bool:
        """Whether anything computes in float16 (the weights, autocast, or quantized layers), so the loss is scaled."""
        t = self.train
        return "float16" in (t.dtype, t.autocast) or (self.quantize.active and (t.compute_dtype or t.dtype) == "float16")

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
        ranks = {self.client_rank(i) for i in range(n)}
        if isinstance(self.clients_per_round, int) and self.clients_per_round > n:
            raise ValueError(f"clients_per_round={self.clients_per_round} exceeds clients={n}; sample at most every client")
        if self.engine == "ray" and self.mode == "centralized":
            raise ValueError("engine: ray runs the server's trunk in a Ray actor, and mode: centralized has no server; "
                             "use engine: local")
        if self.ray.trunk_spans > 1 and (self.engine != "ray" or (self.cuts is not None and len(self.cuts) != 2)):
            raise ValueError(f"ray.trunk_spans={self.ray.trunk_spans} cuts the server's trunk into Ray actors: it needs "
                             "engine: ray and a U-shaped split (cuts: [a, b])")
        if self.ray.client_workers and self.engine != "ray":
            raise ValueError(f"ray.client_workers={self.ray.client_workers} spreads the clients over Ray actors; it needs "
                             "engine: ray")
        if self.ray.client_workers > n:
            raise ValueError(f"ray.client_workers={self.ray.client_workers} exceeds clients={n}: a worker hosts at least "
                             "one client")
        if self.samples_clients:
            if self.mode == "centralized":
                raise ValueError("clients_per_round samples data owners, and mode: centralized pools their data in one party")
            if self.secure_aggregation:
                raise ValueError("secure_aggregation's pairwise masks are set up for every client of the run, and "
                                 "clients_per_round leaves some out of each average; use one of them")
            if len(ranks) > 1:
                raise ValueError("clients_per_round with clients of other LoRA ranks: their exact average folds updates into "
                                 "the base weights, which a client left out of a round would miss; give every client one rank")
        if self.quantize.active and len(ranks) > 1:
            raise ValueError(
                f"quantize: clients with LoRA ranks {sorted(ranks)} are averaged exactly by adding the update into the frozen "
                "base weights, which a quantized segment stores packed; give every client one rank, or quantize: none"
            )
        if self.defense and self.mode != "split":
            raise ValueError(f"defense: {', '.join(d.name for d in self.defense)} act on what crosses a cut; mode: {self.mode} "
                             "has none (defenses need mode: split)")
        names = [d.name for d in self.defense]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"defense: {', '.join(twice)} is listed more than once; each defense takes one entry")
        for cls, settings in configured(self):  # what each defense needs of the run (``Defense.check``)
            cls.check(settings, self)
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
