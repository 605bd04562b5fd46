"""What each segment trains: LoRA adapters (peft), nothing (frozen), or all of its weights (full).

LoRA initialisation is seeded per module *name*, not drawn from one global stream, so an adapter
starts identical whichever party holds it and however the model is cut: split and centralized runs
begin from the same point, which the exactness contract needs.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import zlib
from typing import Iterable, Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import SplittuneError
from ..config import LoraConfig
from .arch import ArchSpec
from .linears import bypassed, expert_weights, linear_names
from .partition import Segment

PEFT_PREFIX = "base_model.model."


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; its FutureWarning
    is about peft's code, not the user's, so it stays out of their output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


class AdapterError(SplittuneError, ValueError):
    pass


def default_target_modules(model_type: str) -> list[str] | str:
    """peft's per-architecture default (attention projections); every linear layer where it has none."""
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or []) or "all-linear"


def default_targets(spec: ArchSpec) -> list[str] | str:
    """``default_target_modules``, unless some block of the model holds none of peft's targets (a hybrid whose
    state-space blocks have no attention, e.g. Nemotron-H): then every linear layer LoRA can adapt, so each block
    trains and a party holding only such blocks has adapters too. Decided from the whole model (the spec), so every
    party and the unsplit model choose alike."""
    targets = default_target_modules(spec.model_type)
    if targets == "all-linear":
        return targets
    callable_ = set().union(*spec.lora_linears)  # peft's list, kept to what the forward calls (its list may move)
    targets = [t for t in targets if t in callable_] if spec.lora_linears else targets
    if not targets or any(not set(targets) & set(names) for names in spec.lora_linears):
        return "all-linear"
    return targets


_BASE_LAYER = re.compile(r"\.base_layer\.(?!lora_)")


def canonical_name(name: str, adapter: str = "default") -> str:
    """A trainable tensor's name in the unsplit, unwrapped model (the names PEFT adapter files use).

    peft's ``base_layer`` goes, except before another adapter's factors: LoRA on two stacked expert weights
    of one module nests two wrappers, ``experts.base_layer.lora_A`` and ``experts.lora_A`` (as peft saves them)."""
    name = name.removeprefix(PEFT_PREFIX).replace(f".{adapter}.", ".")
    while (stripped := _BASE_LAYER.sub(".", name, count=1)) != name:
        name = stripped
    return name


def adapter_of(name: str) -> str | None:
    """The peft adapter a parameter belongs to (``…lora_A.<adapter>.weight``); None for base weights."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _targets(spec: ArchSpec, lora: LoraConfig, scope: nn.Module) -> list[str]:
    """The leaf names LoRA targets in ``scope`` (the adapted blocks); naming a layer whose weight the forward reads
    directly (models/linears.py) is refused, as its LoRA would never train."""
    targets = lora.target_modules if lora.target_modules is not None else default_targets(spec)
    if targets == "all-linear":  # peft cannot combine its own all-linear with a layer range
        return linear_names(scope, spec.model_type)
    targets = [targets] if isinstance(targets, str) else list(targets)
    ignored = sorted({t.rsplit(".", 1)[-1] for t in targets} & bypassed(scope))
    if ignored:
        raise AdapterError(
            f"lora.target_modules names {', '.join(ignored)}, whose weight {spec.model_type} blocks read directly (in a "
            f"fused kernel or a matrix product) rather than calling the layer, so a LoRA there would never train; LoRA "
            f"can adapt {', '.join(linear_names(scope, spec.model_type))} (or 'all-linear')"
        )
    return targets


def _lora_config(spec: ArchSpec, lora: LoraConfig, blocks: list[int], all_blocks: nn.ModuleList, scope: nn.Module) -> PeftLoraConfig:
    """``all_blocks``: the model's block list; ``scope``: the adapted blocks (blocks of a hybrid differ: attention,
    recurrent, experts)."""
    targets = _targets(spec, lora, scope)
    uses_conv1d = any(isinstance(m, Conv1D) for name, m in scope.named_modules() if name.rsplit(".", 1)[-1] in targets)
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        target_parameters=(expert_parameters(spec, all_blocks, blocks) or None) if lora.experts else None,
        layers_to_transform=blocks,
        layers_pattern=spec.blocks_attr,
        fan_in_fan_out=uses_conv1d,
        bias="none",
    )


def expert_parameters(spec: ArchSpec, all_blocks: nn.ModuleList, blocks: list[int]) -> list[str]:
    """Full names of the stacked expert weights in ``blocks`` (``all_blocks[i]`` for each): peft's ``target_parameters``
    ignores ``layers_to_transform``, so the blocks are named one by one, each with its own (a hybrid such as Jamba has
    experts in some blocks only). Empty for a party whose blocks hold none; refused for a model that has none."""
    if not spec.expert_blocks:
        raise AdapterError(f"lora.experts: {spec.model_type} blocks hold no stacked expert weights (3-D parameters); "
                           "it is not a mixture-of-experts model, or its experts are separate linear layers (use lora.target_modules)")
    return [f"{spec.blocks_path}.{i}.{n}" for i in blocks if i in spec.expert_blocks for n in expert_weights(all_blocks[i])]


def _seeded_lora_init(model: nn.Module, seed: int) -> None:
    """Every adapter of a module starts from the same draw: clients and their server-side copies agree."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter in lora_a.values():
            key = canonical_name(f"{name}.lora_A.weight")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            with torch.no_grad():
                nn.init.kaiming_uniform_(adapter.weight, a=math.sqrt(5), generator=generator)


def apply_training(
    model: nn.Module,
    spec: ArchSpec,
    segments: Iterable[tuple[Segment, str]],
    lora: LoraConfig,
    seed: int,
    adapters: tuple[str, ...] = ("default",),
) -> nn.Module:
    """Wrap ``model`` so that exactly the parameters each (segment, mode) trains require grad.

    Several ``adapters`` put one LoRA adapter per name on the same frozen base (the server of ``sfl-v1``
    keeps one per client); they all start identical and all train.
    """
    segments = list(segments)
    for p in model.parameters():
        p.requires_grad_(False)
    lora_blocks = sorted(i for seg, mode in segments if mode == "lora" for i in seg.blocks)
    if lora_blocks:
        all_blocks = model.get_submodule(spec.blocks_path)
        scope = nn.ModuleList(all_blocks[i] for i in lora_blocks)
        config = _lora_config(spec, lora, lora_blocks, all_blocks, scope)
        try:
            with quiet_peft():
                model = get_peft_model(model, config, adapter_name=adapters[0])
            for name in adapters[1:]:
                model.add_adapter(name, config)
        except ValueError as err:
            detail = str(err).split(". Note:", 1)[0]  # peft's note on layers_to_transform is about internals
            raise AdapterError(
                f"cannot place LoRA adapters on {spec.model_type} (lora.target_modules={lora.target_modules!r}): {detail}; "
                f"the linear layers of {spec.model_type} blocks are {', '.join(linear_names(scope, spec.model_type))} (or 'all-linear')"
            ) from None
        _seeded_lora_init(model, seed)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
    full = [seg for seg, mode in segments if mode == "full"]
    if full:
        prefixes = []
        for seg in full:
            prefixes += [spec.block_prefix(i) for i in seg.blocks]
            prefixes += [m + "." for m in (spec.pre if seg.embeds else ()) + (spec.post if seg.head else ())]
        # every name of a shared tensor: a tied head is listed under the embedding's name alone otherwise
        for name, p in model.named_parameters(remove_duplicate=False):
            if canonical_name(name).startswith(tuple(prefixes)) and "lora_" not in name:
                p.requires_grad_(True)
    return model


def trainable(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of one adapter (and fully trained weights) under canonical names, in a fixed order."""
    return [
        (canonical_name(n, adapter), p)
        for n, p in model.named_parameters()
        if p.requires_grad and adapter_of(n) in (None, adapter)
    ]


def trainable_state(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in trainable(model, adapter)}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], adapter: str = "default", partial: bool = False) -> None:
    """Set trainable tensors from ``state``; ``partial`` allows a subset (an average touches some tensors only)."""
    params = dict(trainable(model, adapter))
    missing, unexpected = set(params) - set(state), set(state) - set(params)
    if (missing and not partial) or unexpected:
        raise AdapterError(f"adapter state does not match this party: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if p.shape != value.shape:
                raise AdapterError(f"tensor {name} has shape {tuple(value.shape)}; this party's has {tuple(p.shape)}")
            p.copy_(value)


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """peft LoRA layers by canonical module name (the name of the weight they adapt, minus ``.weight``)."""
    from peft.tuners.lora import LoraLayer

    return {canonical_name(n, adapter): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class mixed_adapters:
    """Within the context, each row of a batch goes through its own adapter (``names[row]``).

    peft implements mixed-adapter batches for inference and refuses them in training mode at the model
    level only; the per-layer computation is differentiable, so we pass the names to the layers directly.
    This is how one frozen base serves several clients' adapters in one batched forward.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.layers = list(lora_layers(model).values())
        self.names = names
        self.handles: list = []

    def __enter__(self) -> "mixed_adapters":
        def hook(module, args, kwargs):
            return args, {**kwargs, "adapter_names": self.names}

        self.handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
