"""Stage 0: the split plan (which segment holds which blocks) and each party's weights.

A party builds the full module tree with no memory (``init_empty_weights``), replaces the blocks it
does not own by weightless pass-through stubs, loads from safetensors only the tensors it owns, and
turns every other parameter slot into a zero-stride placeholder (one scalar of memory) so the model's
own forward still runs (DESIGN.md contract 3).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..errors import SplittuneError
from .absent import AbsentBlock
from .arch import ArchSpec, block_of
from .conversion import Fused, key_plan
from .plain_read import PlainReader
from .packed_head import PackedHead
from .quantize import FOUR_BIT, HEAD, Quantization, is_quantized, quantizable, quantize_block, quantize_layer, tensor_bytes
from .zoo import ModelError, ModelSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlanError(SplittuneError, ValueError):
    """A split that cannot run: cuts that do not fit the model, or segment settings the split forbids."""


@dataclass(frozen=True)
class Segment:
    name: str  # bottom | trunk | top
    start: int  # first block
    end: int  # one past the last block
    embeds: bool  # runs the modules before the blocks
    head: bool  # runs the modules after the blocks and the loss

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class SplitPlan:
    """Segments in forward order, and which party runs each (``client`` or ``server``)."""

    n_blocks: int
    cuts: tuple[int, ...]
    segments: tuple[Segment, ...]
    owners: tuple[str, ...]

    @property
    def shape(self) -> str:
        if len(set(self.owners)) == 1:
            return "centralized"
        return "two-part" if len(self.cuts) == 1 else "u-shape"

    def party_segments(self, party: str) -> list[Segment]:
        return [s for s, o in zip(self.segments, self.owners) if o == party]

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)


def plan_split(n_blocks: int, cuts: Iterable[int], mode: str = "split") -> SplitPlan:
    """Validate ``cuts`` against the model and lay out the segments.

    ``[a]`` → bottom [0, a) on the client, trunk [a, n) + head on the server (labels go to the server).
    ``[a, b]`` → bottom [0, a) and top [b, n) + head on the client, trunk [a, b) on the server.
    A cut at 0 leaves the client only the embeddings. The server's segment needs at least one block; a top
    cut at ``n`` leaves the client's top only the final norm and head (the thinnest top: the least compute
    on the client, and the most the server learns from the gradient it returns: docs/privacy.md).
    """
    cuts = tuple(int(c) for c in cuts)
    if not cuts and mode == "centralized":
        # no cuts (a centralized or federated run): every block is the trunk; the bottom holds only the
        # embeddings and the top only the final norm and head, so segments.bottom/top still say how those train
        segments = (Segment("bottom", 0, 0, True, False), Segment("trunk", 0, n_blocks, False, False),
                    Segment("top", n_blocks, n_blocks, False, True))
        return SplitPlan(n_blocks, cuts, segments, ("client",) * 3)
    if len(cuts) == 1:
        (a,) = cuts
        if not 0 <= a <= n_blocks - 1:
            raise PlanError(
                f"cut {a} is outside the model: it has {n_blocks} blocks (0..{n_blocks - 1}); a two-part cut must be "
                f"in 0..{n_blocks - 1} so the server keeps at least one block"
            )
        segments = (Segment("bottom", 0, a, True, False), Segment("trunk", a, n_blocks, False, True))
        owners = ("client", "server")
    elif len(cuts) == 2:
        a, b = cuts
        if not 0 <= a < b <= n_blocks:
            raise PlanError(
                f"cuts {list(cuts)} do not fit a model of {n_blocks} blocks (0..{n_blocks - 1}): a U-shaped split needs "
                f"0 <= a < b <= {n_blocks} (the trunk needs at least one block; b = {n_blocks} leaves the top only the "
                "final norm and head)"
            )
        segments = (
            Segment("bottom", 0, a, True, False),
            Segment("trunk", a, b, False, False),
            Segment("top", b, n_blocks, False, True),
        )
        owners = ("client", "server", "client")
    else:
        hint = "; cuts: auto becomes real cuts once the model is known (RunConfig.resolve)" if not cuts else ""
        raise PlanError(f"cuts must hold 1 (two-part) or 2 (U-shaped) block indices, got {list(cuts)}{hint}")
    if mode == "centralized":
        owners = ("client",) * len(segments)
    return SplitPlan(n_blocks, cuts, segments, owners)


def check_trainable(plan: SplitPlan, modes: dict[str, str]) -> None:
    """Refuse a plan in which nothing trains (every segment frozen, or LoRA only on segments without blocks):
    the backward pass would have nothing to differentiate."""

    def trains(s: Segment) -> bool:
        return modes.get(s.name) == "full" or (modes.get(s.name) == "lora" and len(s.blocks) > 0)

    if plan.segments and not any(trains(s) for s in plan.segments):
        keys = ", ".join(f"segments.{s.name}={modes.get(s.name)}" + (" (no blocks)" if not s.blocks else "") for s in plan.segments)
        raise PlanError(
            f"nothing would train with cuts {list(plan.cuts)}: {keys}; LoRA needs blocks to adapt, so set a segment "
            "that has blocks to lora, or any segment to full"
        )


@dataclass
class PartyWeights:
    """What a party materialised: for reports and for the memory contract."""

    params: int
    bytes: int
    tensors: int


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=False)


def is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)`` that keeps placeholders one element each: ``Tensor.to`` would materialise them
    at full size, and a client would hold the trunk it must never hold (DESIGN.md contract 3)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if is_placeholder(t):
            return torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)
        return t.to(device)

    return model._apply(move)  # what nn.Module.to uses: parameters stay the same objects, ties stay tied


def without_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` with every dropout probability (and layer drop) set to 0.

    Models apply dropout both through ``nn.Dropout`` modules and functionally from config floats
    (OPT, Falcon…); random masks drawn from each party's own RNG would make split and unsplit
    training differ, so dropout is off unless a run asks for it.
    """
    config = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key == "layerdrop"):
            setattr(config, key, 0.0)
    return config


@contextlib.contextmanager
def _open_weights(source: ModelSource, filename: str):
    """One safetensors file of ``source``; a corrupt, truncated or missing file is a ModelError naming it."""
    path = source.weight_file(filename)
    if not path.exists():
        raise ModelError(f"{source.ref}: weight file {path} is missing (the checkpoint's index lists it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise source.corrupt(path, err) from None


def load_party_model(
    source: ModelSource,
    config: PretrainedConfig,
    spec: ArchSpec,
    blocks: Iterable[int],
    pre: bool,
    post: bool,
    dtype: torch.dtype = torch.float32,
    keep_dropout: bool = False,
    quantize: dict[int, Quantization] | None = None,
) -> tuple[nn.Module, PartyWeights]:
    """Build the model tree and load only blocks ``blocks`` plus the pre/post modules if owned.

    Blocks load one after another, and a block in ``quantize`` is quantized as soon as its weights are in, so a
    quantizing party never holds more than one block at full precision."""
    owned_blocks = set(blocks)
    quantize = quantize or {}
    if not keep_dropout:
        config = without_dropout(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied heads must be the embedding Parameter itself, so it is loaded once
    model.config.use_cache = False
    block_list = model.get_submodule(spec.blocks_path)
    for i in range(spec.n_blocks):
        if i not in owned_blocks:
            block_list[i] = AbsentBlock(block_list[i], spec.stub_returns, i)

    owned_modules = (spec.pre if pre else ()) + (spec.post if post else ())
    block_prefixes = tuple(spec.block_prefix(i) for i in owned_blocks)

    def is_owned(param_name: str) -> bool:
        module = param_name.rsplit(".", 1)[0]
        return module in owned_modules or param_name.startswith(block_prefixes)

    aliases: dict[int, list[str]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
        params[id(p)] = p

    weight_map = source.weight_map()
    names_in_file = key_plan(model, weight_map)
    # what each block loads (-1: the embeddings, final norm and head): plain tensors, and conversions of several
    work: dict[int, list[tuple[int, str]]] = defaultdict(list)
    fused: dict[int, dict[int, tuple[Fused, str]]] = defaultdict(dict)
    missing = []
    for pid, names in aliases.items():
        if any(is_owned(n) for n in names):
            name = next((n for n in names if n in names_in_file), None)
            key = names_in_file.get(name) if name is not None else None
            owner = block_of(names[0], spec.blocks_path)
            owner = -1 if owner is None else owner
            if key is None:
                missing.append(names[0])
            elif isinstance(key, Fused):
                fused[owner][pid] = (key, name)
            else:
                work[owner].append((pid, key))
        else:
            _place(model, aliases[pid], _placeholder(params[pid].shape, dtype))
    if missing:
        raise ModelError(
            f"{source.ref}: the checkpoint lacks {len(missing)} tensor(s) this party needs, e.g. {missing[:3]}"
        )
    stats = PartyWeights(0, 0, 0)

    def take(pid: int, tensor: torch.Tensor, what: str) -> None:
        expected = params[pid].shape
        if tensor.shape != expected:
            raise ModelError(f"{source.ref}: tensor {what!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        _place(model, aliases[pid], nn.Parameter(tensor, requires_grad=False))
        stats.params += tensor.numel()

    owners = sorted(set(work) | set(fused))
    last_use: dict[str, int] = {}  # each shard is closed after the last block that reads it: a mapped shard's pages
    for owner in owners:           # that were read stay resident while it is open, quantized or not
        for _, key in work[owner]:
            last_use[weight_map[key]] = owner
        for conversion, _ in fused[owner].values():
            last_use.update({weight_map[k]: owner for k in conversion.keys})
    with contextlib.ExitStack() as files:
        opened: dict[str, object] = {}
        closers: dict[str, contextlib.ExitStack] = {}

        def read(key: str) -> torch.Tensor:  # each shard opened once (memory-mapped), whichever blocks it holds
            filename = weight_map[key]
            if filename not in opened:
                closers[filename] = files.enter_context(contextlib.ExitStack())
                opened[filename] = closers[filename].enter_context(_open_weights(source, filename))
            return opened[filename].get_tensor(key)

        plain: dict[str, PlainReader] = {}

        def read_plain(key: str, lazy: bool = False) -> torch.Tensor:
            filename = weight_map[key]
            path = source.weight_file(filename)
            try:
                if filename not in plain:  # each shard opened once, checked once
                    if not path.exists():
                        raise ModelError(f"{source.ref}: weight file {path} is missing (the checkpoint's index lists it)")
                    plain[filename] = files.enter_context(contextlib.closing(PlainReader(path)))
                return plain[filename].lazy(key) if lazy else plain[filename].get_tensor(key)
            except ModelError:
                raise
            except (OSError, ValueError) as err:
                raise source.corrupt(path, err) from None

        for owner in owners:
            q = quantize.get(owner)
            for pid, key in sorted(work[owner], key=lambda e: (weight_map[e[1]], e[1])):  # a layer's bias before its weight
                if q is None or (owner == HEAD and not aliases[pid][0].startswith(f"{spec.post[-1]}.")):
                    take(pid, read(key).to(dtype), key)
                else:  # read into memory of its own, packed as soon as it arrives
                    module_name, _, leaf = aliases[pid][0].rpartition(".")
                    parent, _, child = module_name.rpartition(".")
                    packs = leaf == "weight" and quantizable(model.get_submodule(module_name))
                    # a 4-bit nn.Linear is packed a chunk at a time as the chunks are read: never the whole layer
                    sliced = packs and q.kind in FOUR_BIT and type(model.get_submodule(module_name)) is nn.Linear
                    tensor = read_plain(key, lazy=sliced)
                    if packs:
                        if tensor.shape != params[pid].shape:
                            raise ModelError(f"{source.ref}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                                             f"{tuple(params[pid].shape)}")
                        quantize_layer(model.get_submodule(parent), child, q, tensor, dtype)
                        stats.params += tensor.numel()
                    else:
                        take(pid, tensor.to(dtype, copy=True), key)
                    del tensor
                stats.tensors += 1
            for conversion in {id(c): c for c, _ in fused[owner].values()}.values():
                made = conversion.convert(model, read)
                stats.tensors += len(conversion.keys)
                for pid, (c, name) in fused[owner].items():
                    if c is conversion:
                        take(pid, made[name].to(dtype), f"{name} (made from {len(c.keys)} checkpoint tensors)")
            if q is not None and owner != HEAD:  # what is left: layers made by a conversion, and the norms' copies
                quantize_block(block_list[owner], q)
            if owner == HEAD and q is not None and q.kind in FOUR_BIT and post:  # computed a vocabulary slice at a time
                parent, _, child = spec.post[-1].rpartition(".")
                if is_quantized(model.get_submodule(spec.post[-1])):
                    holder = model.get_submodule(parent) if parent else model
                    setattr(holder, child, PackedHead(getattr(holder, child)))
            for filename in [f for f, last in last_use.items() if last == owner]:
                if filename in opened:
                    closers.pop(filename).close()
                    del opened[filename]
                if filename in plain:
                    plain.pop(filename).close()
    _load_owned_buffers(model, source, is_owned, weight_map, names_in_file)
    if not keep_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    stats.bytes = _stored_bytes(model, spec, owned_blocks, owned_modules)
    return model, stats


def _place(model: nn.Module, names: list[str], param: nn.Parameter) -> None:
    """``param`` under every name it has in ``model`` (a tied embedding and head share one)."""
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = param


def _stored_bytes(model: nn.Module, spec: ArchSpec, blocks: set[int], modules: tuple[str, ...]) -> int:
    """Bytes of the weights a party holds as stored (quantized ones packed), each tensor once (a tied head is the
    embedding)."""
    block_list = model.get_submodule(spec.blocks_path)
    roots = [block_list[i] for i in sorted(blocks)] + [model.get_submodule(m) for m in modules]
    unique = {id(p): p for root in roots for p in root.parameters() if not is_placeholder(p)}
    return sum(tensor_bytes(p) for p in unique.values())


def _load_owned_buffers(model, source, is_owned, weight_map, names_in_file) -> None:
    """Persistent buffers stored in the checkpoint (rare; e.g. learned scales) come from the file too."""
    by_file: dict[str, list[tuple[str, str, torch.Tensor]]] = defaultdict(list)
    for name, buf in model.named_buffers():
        key = names_in_file.get(name)
        if isinstance(key, str) and is_owned(name):
            by_file[weight_map[key]].append((name, key, buf))
    for filename, entries in by_file.items():
        with _open_weights(source, filename) as f:
            for name, key, buf in entries:
                module_name, _, leaf = name.rpartition(".")
                model.get_submodule(module_name)._buffers[leaf] = f.get_tensor(key).to(buf.dtype)
