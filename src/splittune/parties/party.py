"""What every party has: its segments' weights, what they train, and a ``Trainer`` per adapter (stage 6, with the
global gradient norm: ``trainer.py``)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..allocator import return_large_blocks
from ..averaging import add_delta
from ..config import LoraConfig, RunConfig
from ..device import to_device
from ..models.adapters import apply_training, load_trainable_state, lora_layers, mixed_adapters, trainable, trainable_state
from ..models.arch import ArchSpec
from ..models.quantize import HEAD, Quantization, QuantizeError, is_quantized
from ..models.quantize import check as check_quantize
from ..models.partition import DTYPES, PlanError, Segment, SplitPlan, check_trainable, load_party_model, move_model, plan_split
from ..models.recompute import recomputed
from ..models.routing import RouterAux
from ..models.segment import SegmentOutput, run_segment
from ..models.sharing import own
from ..models.stages import arch_name, loading_stage, segment_failures, stage_errors
from ..models.zoo import ModelSource
from .precision import LossScale, autocast, unscale
from .trainer import Trainer


# What may differ from client to client in one run; every other field of the proposal must agree.
PER_CLIENT = ("client", "cuts", "lora_rank", "samples", "model", "run_id")  # ``model``: two clients may load the same weights from two paths
# Kept by the client, never sent: its sample count (the averaging weight travels with each aggregate, where needed).
LOCAL_ONLY = ("samples",)


def public_model_name(model: str) -> str:
    """What a hello may say about the client's model: a reference (``builtin:…``, ``tiny:…``, a hub id) as given, a
    local directory by its last component only (``/data/private/llama-8b`` → ``llama-8b``)."""
    ref = model.split(" (", 1)[0]  # ``ModelSource.describe``: "REF (where it resolved)"
    if ref.startswith(("/", "./", "../", "~")) or "\\" in ref or Path(ref).expanduser().exists():
        return ref.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return ref


@dataclass(frozen=True)
class SessionSpec:
    """Everything the parties must agree on; each client proposes it in its hello."""

    fingerprint: str
    model_type: str
    cuts: list[int]
    mode: str
    segments: dict[str, str]
    lora: dict[str, Any]  # the run's LoRA settings; ``lora_rank`` is this client's own rank
    seed: int
    dtype: str
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    steps: int
    max_grad_norm: float | None
    model_dropout: bool
    client: int = 0
    clients: int = 1
    schedule: str = "sfl-v2"
    aggregate_every: int = 1
    personal: list[str] = field(default_factory=list)
    lora_rank: int = 8
    samples: int = 0
    model: str = ""  # the client's model reference and where it resolved (messages only; the fingerprint decides)
    server_gradient_checkpointing: bool = False  # the server's blocks recompute their activations in backward
    cache_bytes: int = 0  # the activation cache's budget per client (cache.max_bytes); the server may cap it
    # the client's defenses and their parameters (never their seed): announced, as an attacker must be assumed to know them
    defenses: list[dict[str, Any]] = field(default_factory=list)
    secure_aggregation: bool = False  # clients' adapters reach the averaging only masked (parties/secure.py)
    # the client's run (a random id kept in its run directory): the server keys what it keeps of a run by it
    run_id: str = ""
    # how each segment's frozen block weights are stored (quantize:) and the dtype quantized layers compute in
    quantize: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = ""
    autocast: str = ""  # mixed precision: the dtype both parties' segments compute in over float32 weights ("": none)
    loss_scale: float | str = ""  # float16 compute: "dynamic" or a fixed scale, kept by the client ("": no scaling)
    per_round: int = 0  # clients each round samples (clients_per_round); 0: every client

    @classmethod
    def from_run(cls, cfg: RunConfig, fingerprint: str, model_type: str, client: int = 0, samples: int = 0,
                 clients: int | None = None, model: str | None = None, run_id: str = "") -> "SessionSpec":
        t = cfg.train
        return cls(
            fingerprint, model_type, cfg.client_cuts(client), cfg.mode, cfg.segments.model_dump(), cfg.lora.model_dump(),
            cfg.seed, t.dtype, t.lr, t.weight_decay, t.warmup_steps, t.schedule, t.steps, t.max_grad_norm, t.model_dropout,
            client, clients or cfg.clients, "federated" if cfg.mode == "federated" else cfg.schedule, cfg.aggregate_every,
            list(cfg.personal), cfg.client_rank(client), samples, cfg.model if model is None else model,
            server_gradient_checkpointing=t.server_gradient_checkpointing,
            cache_bytes=cfg.cache.max_bytes,
            defenses=[d.model_dump() for d in cfg.defense],
            secure_aggregation=cfg.secure_aggregation,
            run_id=run_id,
            quantize=cfg.quantize.model_dump() if cfg.quantize.active else {},
            compute_dtype=t.compute_dtype or t.autocast or t.dtype,
            autocast=t.autocast or "",
            loss_scale=t.loss_scale if cfg.scales_loss else "",
            per_round=cfg.round_size if cfg.samples_clients else 0,
        )

    def to_meta(self) -> dict[str, Any]:
        """The proposal as a hello carries it: no sample count, and the model by name and fingerprint, never the
        local path it was loaded from."""
        meta = {k: v for k, v in asdict(self).items() if k not in LOCAL_ONLY}
        meta["model"] = public_model_name(self.model)
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SessionSpec":
        fields = set(cls.__dataclass_fields__) - set(LOCAL_ONLY)
        missing = fields - set(meta)
        if missing:
            raise ValueError(f"session proposal lacks {sorted(missing)}")
        return cls(**{k: meta[k] for k in fields})

    def shared_terms(self) -> dict[str, Any]:
        """The fields every client of one run must propose identically."""
        return {k: v for k, v in asdict(self).items() if k not in PER_CLIENT}

    def plan(self, n_blocks: int) -> SplitPlan:
        return plan_split(n_blocks, self.cuts, self.mode if self.mode != "federated" else "centralized")

    def quantization(self, segment: str) -> Quantization:
        """How ``segment``'s frozen block weights are stored (``none`` unless the run quantizes it)."""
        return Quantization(self.quantize.get(segment, "none"), DTYPES[self.compute_dtype or self.dtype],
                            bool(self.quantize.get("double_quant", False)))

    @property
    def lora_config(self) -> LoraConfig:
        return LoraConfig(**{**self.lora, "rank": self.lora_rank})


class Party:
    """One side of the split: ``role`` is ``client`` or ``server``.

    ``adapters`` names the LoRA adapters on this party's frozen base (one per client on an ``sfl-v1``
    server, else one); ``total_steps`` is how many optimizer steps each adapter's LR schedule spans;
    ``device`` is where this party computes (the CPU when None); with ``recompute`` its blocks' training
    forwards keep only their inputs and run again in backward (``models/recompute.py``).
    """

    def __init__(self, role: str, source: ModelSource, spec: ArchSpec, session: SessionSpec, config=None,
                 adapters: tuple[str, ...] = ("default",), total_steps: int | None = None, device: torch.device | None = None,
                 recompute: bool = False):
        self.role = role
        self.recompute = recompute
        self.spec = spec
        self.session = session
        self.plan = session.plan(spec.n_blocks)
        self.segments = self.plan.party_segments(role)
        self.dtype = DTYPES[session.dtype]
        _check_tied(spec, self.plan, session.segments)
        self.arch = arch_name(spec.model_type, source.ref)  # names this model in errors from inside it (models/stages.py)
        self.device = device if device is not None else torch.device("cpu")
        quantize = {}
        for s in self.segments:
            q = session.quantization(s.name)
            check_quantize(q.kind, self.device)
            quantize.update({i: q for i in s.blocks if q.active})
        head = session.quantization("head")
        if head.active and any(s.head for s in self.segments):
            check_quantize(head.kind, self.device)
            if spec.tied:
                raise QuantizeError(f"quantize.head: the head of {spec.model_type} is its embedding matrix (tied), which the "
                                    "bottom looks tokens up in; leave quantize.head: none")
            quantize[HEAD] = head
        if quantize:  # a party quantizes because memory is tight: give large freed blocks back at once (``allocator.py``)
            return_large_blocks()
        with stage_errors(self.arch, loading_stage(role, self.plan)):
            model, self.weights = load_party_model(
                source,
                config if config is not None else source.config(),
                spec,
                [i for s in self.segments for i in s.blocks],
                pre=any(s.embeds for s in self.segments),
                post=any(s.head for s in self.segments),
                dtype=self.dtype,
                keep_dropout=session.model_dropout,
                quantize=quantize,
            )
            _check_packed(model, spec, quantize)
            modes = [(s, session.segments[s.name]) for s in self.segments]
            self.model = move_model(apply_training(model, spec, modes, session.lora_config, session.seed, adapters), self.device)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.blocks = base.get_submodule(spec.blocks_path)
        self.post = [base.get_submodule(name) for name in spec.post]
        self.router = RouterAux.of(base, self.blocks)  # None unless the model adds a router loss (MoE, output_router_logits)
        self.model.train()
        if total_steps is None:  # one client: every schedule steps each adapter once per step
            total_steps = session.steps
        self.autocast = DTYPES[session.autocast] if session.autocast else None
        scaled = role == "client" and session.loss_scale != ""
        self.trainers = {name: Trainer(trainable(self.model, name), session, total_steps,
                                       LossScale.of(session.loss_scale) if scaled else None) for name in adapters}
        self.params = [p for t in self.trainers.values() for p in t.params]
        self.adapter = adapters[0]
        self.folded: dict[str, torch.Tensor] = {}  # module -> updates added to its base weight (exact averages)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def run(self, start: int, end: int, *, routes: list[str] | None = None, **kwargs) -> SegmentOutput:
        """Blocks [start, end) (``run_segment``); ``routes`` names each row's adapter (several clients' rows in one
        batch). The routing is entered again when a recomputed block runs in backward."""
        route = functools.partial(mixed_adapters, self.model, routes) if routes is not None else contextlib.nullcontext
        recompute = self.recompute and torch.is_grad_enabled()
        routing = self.router.collect(kwargs["attention_mask"]) if self.router is not None else contextlib.nullcontext({})
        with segment_failures(self, start, end, head=kwargs.get("head")), route(), routing as box, \
                recomputed(self.blocks, range(start, end), route) if recompute else contextlib.nullcontext(), \
                autocast(self.device, self.autocast):
            forward = {"output_router_logits": False} if self.router is not None else None  # the split adds it: ``add_aux``
            out = run_segment(self.model, self.blocks, start, end, post=self.post, forward_kwargs=forward, **kwargs)
        if out.hidden is not None and out.hidden.dtype != self.dtype:  # under autocast: the cut carries the session's dtype
            out.hidden = out.hidden.to(self.dtype)
        out.router = box.get("sums")
        return out

    def add_aux(self, loss: torch.Tensor, *parts: torch.Tensor | None) -> torch.Tensor:
        """A training loss plus the router's auxiliary loss over every party's router sums (``models/routing.py``);
        ``loss`` itself when the model computes none."""
        return loss if self.router is None else self.router.add(loss, *parts)

    def trains(self, segment: Segment) -> bool:
        """Whether ``segment``'s forward uses a parameter that trains (a tied embedding trained as the head counts)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        names = (self.spec.pre if segment.embeds else ()) + (self.spec.post if segment.head else ())
        modules = [self.blocks[i] for i in segment.blocks] + [base.get_submodule(n) for n in names]
        return any(p.requires_grad for m in modules for p in m.parameters())

    def trained(self, adapter: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters one adapter trains (and fully trained weights) under canonical names, in a fixed order."""
        return trainable(self.model, adapter or self.adapter)

    def sq_grad_norm(self, adapter: str | None = None) -> float:
        return self.trainers[adapter or self.adapter].sq_grad_norm()

    def optimizer_step(self, total_sq_norm: float, adapter: str | None = None, skip: bool = False) -> None:
        self.trainers[adapter or self.adapter].step(total_sq_norm, skip)

    def catch_up(self, step: int, adapter: str | None = None) -> None:
        self.trainers[adapter or self.adapter].catch_up(step)

    def unscale(self, scale: float, adapter: str | None = None) -> bool:
        """Divide one adapter's gradients by the loss scale; whether any overflowed."""
        return unscale(self.trainers[adapter or self.adapter].params, scale)

    def loss_scale(self, adapter: str | None = None) -> LossScale | None:
        return self.trainers[adapter or self.adapter].scale

    @property
    def lr(self) -> float:
        return self.trainers[self.adapter].lr

    def lr_of(self, adapter: str) -> float:
        return self.trainers[adapter].lr

    @property
    def fan_in_fan_out(self) -> bool | None:
        """Whether this party's LoRA layers wrap transposed (Conv1D) weights; None without LoRA."""
        config = getattr(self.model, "peft_config", {}).get(self.adapter)
        return None if config is None else bool(config.fan_in_fan_out)

    def state(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        return trainable_state(self.model, adapter or self.adapter)

    def load_state(self, tensors: dict[str, torch.Tensor], adapter: str | None = None) -> None:
        """Replace some trainable tensors (an average); their optimizer moments are kept, as in FedAvg."""
        load_trainable_state(self.model, tensors, adapter or self.adapter, partial=True)

    def holds(self, module: str) -> bool:
        return module in lora_layers(self.model)

    def fold(self, module: str, delta: torch.Tensor) -> None:
        """Add ``delta`` ([out, in]) to a LoRA module's frozen base weight and restart its LoRA factors (B = 0).

        After an exact rank-heterogeneous average the module's whole update lives in the base weight; every
        adapter of the module restarts from zero, so every holder has the same effective weight.
        """
        layer = lora_layers(self.model).get(module)
        if layer is None:
            raise ValueError(f"this {self.role} holds no LoRA module {module}")
        if is_quantized(layer.get_base_layer()):
            raise QuantizeError(f"cannot fold an averaged update into {module}: its base weight is stored quantized")
        own(layer.get_base_layer().weight)  # (another run's party may share this base weight: ``models/sharing.py``)
        add_delta(layer.get_base_layer().weight, delta, layer.fan_in_fan_out)
        self.folded[module] = self.folded.get(module, 0) + delta
        with torch.no_grad():
            for name, b in layer.lora_B.items():
                b.weight.zero_()
        names = {f"{module}.lora_A.weight", f"{module}.lora_B.weight"}
        for trainer in self.trainers.values():
            trainer.forget(names)

    def optimizer_state(self, adapter: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One trainer's optimizer and schedule as tensors and plain metadata (a relay, a checkpoint)."""
        trainer = self.trainers[adapter or self.adapter]
        tensors, meta = {}, {"scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None, "steps": {}}
        if trainer.scale is not None:
            meta["loss_scale"] = trainer.scale.state()
        if trainer.optimizer is not None:
            for name, p in trainer.named:
                st = trainer.optimizer.state.get(p)
                if st:
                    tensors[f"{name}::exp_avg"] = st["exp_avg"].clone()
                    tensors[f"{name}::exp_avg_sq"] = st["exp_avg_sq"].clone()
                    meta["steps"][name] = float(st["step"])
        return tensors, meta

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], adapter: str | None = None) -> None:
        trainer = self.trainers[adapter or self.adapter]
        if trainer.scale is not None and meta.get("loss_scale") is not None:
            trainer.scale.load(meta["loss_scale"])
        if trainer.optimizer is None:
            return
        for name, p in trainer.named:
            if name in meta["steps"]:
                trainer.optimizer.state[p] = {
                    "step": torch.tensor(meta["steps"][name]),
                    "exp_avg": tensors[f"{name}::exp_avg"].to(p.device, copy=True),
                    "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device, copy=True),
                }
            else:
                trainer.optimizer.state.pop(p, None)
        if meta.get("scheduler") is not None:
            trainer.scheduler.load_state_dict(meta["scheduler"])
            for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
                group["lr"] = lr  # a scheduler's state does not carry the rate its optimizer is at


    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Everything this party trained: every adapter, its optimizer and schedule, and the folds."""
        layers = lora_layers(self.model)
        groups: dict[str, dict[str, torch.Tensor]] = {
            "folded": dict(self.folded),
            # the base weights themselves: re-adding the summed folds would round differently than adding each
            "folded_weights": {m: layers[m].get_base_layer().weight.detach().clone() for m in self.folded},
        }
        meta: dict[str, Any] = {"adapters": {}}
        for name in self.trainers:
            groups[f"state.{name}"] = self.state(name)
            groups[f"optimizer.{name}"], meta["adapters"][name] = self.optimizer_state(name)
        return groups, meta

    def restore(self, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Bring a fresh party to the saved point: folded base weights, adapters, optimizers, schedules."""
        layers = lora_layers(self.model)
        self.folded = to_device(groups.get("folded", {}), self.device)
        with torch.no_grad():
            for module, weight in groups.get("folded_weights", {}).items():
                own(layers[module].get_base_layer().weight)
                layers[module].get_base_layer().weight.copy_(weight)
        for name in self.trainers:
            load_trainable_state(self.model, groups.get(f"state.{name}", {}), name)
            self.load_optimizer_state(groups.get(f"optimizer.{name}", {}), meta["adapters"][name], name)


def _check_packed(model: torch.nn.Module, spec: ArchSpec, quantize: dict) -> None:
    """A quantized segment whose blocks hold no layer bitsandbytes can pack (a state-space mixer, fused experts only)
    would silently stay at full precision: refuse it, naming what its blocks hold."""
    blocks = model.get_submodule(spec.blocks_path)
    for i in sorted(k for k in quantize if k >= 0):
        if not any(is_quantized(m) for m in blocks[i].modules()):
            kinds = sorted({type(m).__name__ for m in blocks[i].modules() if any(True for _ in m.parameters(recurse=False))})
            raise QuantizeError(f"quantize: {quantize[i].kind} packs linear layers (nn.Linear, Conv1D), and block {i} of "
                                f"{spec.model_type} holds none (its weights are in {', '.join(kinds)}); use quantize: none there")


def _check_tied(spec: ArchSpec, plan: SplitPlan, modes: dict[str, str]) -> None:
    """A tied embedding/head split across parties cannot be trained: the two copies would drift apart.
    (And a plan in which nothing trains is refused here too, before any weights load.)"""
    check_trainable(plan, modes)
    if not spec.tied or plan.shape != "two-part":
        return
    for name in ("bottom", "trunk"):
        if modes.get(name) == "full":
            raise PlanError(
                f"{spec.model_type} ties its head to the embeddings, and a two-part split puts them on different parties; "
                f"segments.{name}=full would train two diverging copies. Use lora or frozen for {name}, or a U-shaped split"
            )
