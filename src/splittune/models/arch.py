"""Architecture specs, detected rather than registered (DESIGN.md contract 2).

A decoder-only HF causal LM is: modules that run before the blocks (embeddings, positions, input
projections), one list of blocks, and modules that run after them (final norm, output projection,
head). The spec finds the block list and sorts the other parameter-holding modules into *pre* and
*post* by running the model once on the meta device (no memory, no weights) and recording which
modules execute before the first block. Nothing about a given architecture is written down here.

Layouts a split cannot carry are refused up front, before any weight loads, from what the meta model shows
(the reasons are in models/catalog.py): blocks that share one module's weights, blocks that hand the next block
a second tensor beside the hidden state (only the hidden state crosses a cut), and a loop that uses more of a
block's outputs than the weightless stand-ins for a party's absent blocks return.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..errors import SplittuneError
from .absent import AbsentBlock
from .catalog import CARRIED_STATE, OWN_CACHE, SHARED_WEIGHTS, UNPACKING_LOOP, WIDE_STREAM
from .linears import expert_weights, linear_names


class ArchitectureError(SplittuneError, ValueError):
    """A model whose layout splittune cannot split."""


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    blocks_path: str  # dotted path of the block ModuleList, e.g. "model.layers" or "transformer.h"
    n_blocks: int
    pre: tuple[str, ...]  # parameter-holding modules that run before block 0
    post: tuple[str, ...]  # parameter-holding modules that run after the last block
    tied: bool  # head weight is the embedding matrix
    max_positions: int | None = None  # longest sequence a learned position table allows; None: no hard limit
    positions_key: str = ""  # the config key (or module) that sets ``max_positions``
    block_tuple: bool = False  # a block returns a tuple whose first item is the hidden state (the loop unpacks it)
    block_outputs: int = 1  # how many items a block returns (a tuple's length; 1 for a bare tensor)
    lora_linears: tuple[tuple[str, ...], ...] = ()  # per block: the linear layers LoRA can adapt (models/linears.py)
    expert_blocks: tuple[int, ...] = ()  # blocks that hold stacked expert weights (lora.experts)
    context: int | None = None  # the context the model was trained for (rotary, ALiBi…: no table, but no farther)
    context_key: str = ""  # the config key that says so (and its rope scaling)

    @property
    def stub_returns(self) -> int:
        """What the stand-in for an absent block returns (``absent.AbsentBlock``): 0 for a bare tensor, else the
        length of the real block's tuple, so loops that unpack every block's outputs get as many."""
        return self.block_outputs if self.block_tuple else 0

    @property
    def blocks_attr(self) -> str:
        return self.blocks_path.rsplit(".", 1)[-1]

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."


def block_of(name: str, blocks_path: str) -> int | None:
    """The block index of a tensor named in the unsplit model; None outside the blocks (embeddings, norm, head)."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    index = name[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


class _Stop(Exception):
    pass


def _n_blocks(config: PretrainedConfig) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ArchitectureError(f"config of model_type {config.model_type!r} has no num_hidden_layers; not a decoder stack")
    return n


def empty_model(config: PretrainedConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The model's module tree with no weights allocated."""
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **({"dtype": dtype} if dtype else {}))
    except ValueError as err:
        raise ArchitectureError(
            f"model_type {config.model_type!r} is not a causal LM transformers can build ({str(err)[:200]})"
        ) from None


def find_blocks(model: nn.Module, n_blocks: int) -> str:
    candidates = [
        name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n_blocks and name
    ]
    if len(candidates) != 1:
        raise ArchitectureError(
            f"expected exactly one list of {n_blocks} blocks in {type(model).__name__}, found {candidates or 'none'}; "
            "this architecture does not follow the common decoder layout"
        )
    return candidates[0]


@contextlib.contextmanager
def _meta_counts_as_tracing():
    """transformers skips its data-dependent shortcuts (is the mask all ones? are the sequences packed?) on
    traced tensors; a meta tensor has no data either, so during the meta trace it counts as traced (the
    recurrent-layer masks of hybrid models read their values otherwise). Real tensors are unaffected."""
    from transformers import masking_utils

    real = masking_utils.is_tracing
    masking_utils.is_tracing = lambda tensor=None: real(tensor) or (isinstance(tensor, torch.Tensor) and tensor.is_meta)
    try:
        yield
    finally:
        masking_utils.is_tracing = real


def detect_arch(config: PretrainedConfig) -> ArchSpec:
    n_blocks = _n_blocks(config)
    config = copy.deepcopy(config)
    config.pad_token_id = None  # the padding warning inspects token values, which meta tensors do not have
    model = empty_model(config)
    blocks_path = find_blocks(model, n_blocks)
    blocks = model.get_submodule(blocks_path)
    if getattr(blocks[0], "is_decoder", None) is False:  # BERT-style blocks built as a "causal LM" still attend both ways
        raise ArchitectureError(f"{type(model).__name__}: its blocks attend in both directions (an encoder, is_decoder: false), "
                                "so it is not a causal LM splittune can train")
    _refuse_shared_weights(model, blocks, blocks_path)

    holders = {
        name: mod
        for name, mod in model.named_modules()
        if name and not name.startswith(blocks_path + ".") and any(True for _ in mod.parameters(recurse=False))
    }
    ran: list[str] = []
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: ran.append(n)) for name, mod in holders.items()]
    seen: dict[str, object] = {}

    def entered(module, args, kwargs):
        seen["pre"] = list(ran)
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen["width"] = hidden.shape[-1] if isinstance(hidden, torch.Tensor) else None
        seen["dims"] = hidden.dim() if isinstance(hidden, torch.Tensor) else None

    hooks.append(blocks[0].register_forward_pre_hook(entered, with_kwargs=True))
    try:
        _trace_blocks(model, blocks, seen)
    except Exception as err:
        if "pre" not in seen:
            raise ArchitectureError(
                f"could not trace {type(model).__name__} to find its embeddings ({type(err).__name__}: {str(err)[:200]})"
            ) from None
    finally:
        for h in hooks:
            h.remove()
    if "outputs" not in seen:  # block 0 could not run on meta: some kernels check dtypes there (grouped_mm wants bf16)
        with contextlib.suppress(Exception):  # a block that cannot run on meta only leaves its output form unknown
            again = empty_model(config, dtype=torch.bfloat16)
            _trace_blocks(again, again.get_submodule(blocks_path), seen)
    ran = seen.get("pre", [])
    if not ran:
        raise ArchitectureError(f"{type(model).__name__}: no embedding module runs before the first block")
    pre = tuple(n for n in holders if n in ran)
    post = tuple(n for n in holders if n not in ran)
    width = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)
    if isinstance(width, int) and seen.get("width") not in (None, width):
        raise ArchitectureError(f"{type(model).__name__} ({config.model_type}) cannot be split: {WIDE_STREAM} "
                                f"({seen['width']} wide between blocks; hidden_size {width})")
    if seen.get("carried"):
        raise ArchitectureError(f"{type(model).__name__} ({config.model_type}) cannot be split: {CARRIED_STATE} "
                                "(block 1 takes such a tensor beside its hidden state)")
    if seen.get("dims") not in (None, 3):  # streams side by side: [batch, seq, streams, hidden] (DeepSeek-V4)
        raise ArchitectureError(f"{type(model).__name__} ({config.model_type}) cannot be split: {WIDE_STREAM} "
                                f"({seen['dims']} dimensions between blocks, not [batch, seq, hidden])")
    if seen.get("outputs", 1) > 1:
        _refuse_unpacking_loop(model, blocks, [holders[n] for n in post], int(seen["outputs"]))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    limit, key = _position_limit(config, model, embed, ran)
    context, context_key = trained_context(config)
    return ArchSpec(config.model_type, blocks_path, n_blocks, pre, post, tied, limit, key, bool(seen.get("tuple", False)),
                    int(seen.get("outputs", 1)), tuple(tuple(linear_names(b, config.model_type)) for b in blocks),
                    tuple(i for i, b in enumerate(blocks) if expert_weights(b)), context, context_key)


def _trace_blocks(model: nn.Module, blocks: nn.ModuleList, seen: dict) -> None:
    """Run ``model`` on meta up to block 1, recording in ``seen`` what block 0 returns (what the decoder loop unpacks,
    which weightless stand-ins must match) and whether block 1 takes, beside the hidden state, a tensor that only the
    blocks before it can compute."""

    def returned(module, args, kwargs, output):
        seen["tuple"] = isinstance(output, tuple)
        seen["outputs"] = len(output) if isinstance(output, tuple) else 1
        seen["extra"] = [x for x in output[1:] if x is not None] if isinstance(output, tuple) else []
        if len(blocks) == 1:
            raise _Stop

    def next_block(module, args, kwargs):
        others = [*args[1:], *(v for k, v in kwargs.items() if not (k == "hidden_states" and not args))]
        others += [x for v in others if isinstance(v, (tuple, list)) for x in v]
        others += [x for v in others if isinstance(v, dict) for x in v.values()]
        # what block 0 returned beside the hidden state, or any other tensor computed from weights (it has a gradient
        # path: made from the embeddings or earlier blocks): a party starting at a cut could not compute either
        seen["carried"] = any(any(v is x for x in seen.get("extra", [])) or (isinstance(v, torch.Tensor) and v.requires_grad)
                              for v in others)
        raise _Stop

    hooks = [blocks[0].register_forward_hook(returned, with_kwargs=True)]
    if len(blocks) > 1:
        hooks.append(blocks[1].register_forward_pre_hook(next_block, with_kwargs=True))
    try:
        ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
        with _meta_counts_as_tracing():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()


def _refuse_shared_weights(model: nn.Module, blocks: nn.ModuleList, blocks_path: str) -> None:
    """Each party loads and trains only the blocks it holds: a module whose weights several blocks reuse (Zamba's
    shared attention block) would become diverging copies on the two sides of a cut."""
    owners: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters(remove_duplicate=False):
            first = owners.setdefault(id(p), (i, name))
            if first[0] != i:
                module = first[1].split(".", 1)[0]
                raise ArchitectureError(
                    f"{type(model).__name__} ({model.config.model_type}) cannot be split: {SHARED_WEIGHTS} "
                    f"(blocks {first[0]} and {i} share {blocks_path}.{first[0]}.{module})"
                )


def _refuse_unpacking_loop(model: nn.Module, blocks: nn.ModuleList, post: list[nn.Module], n: int) -> None:
    """Run the model on meta with every block replaced by the stand-in a party uses for blocks it does not hold (a
    tuple as long as block 0's: the hidden state, then None): a loop that unpacks another number of values from some
    blocks (block kinds that return different tuples) fails on it, and would fail the same way in every split."""
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = AbsentBlock(block, n, i)
    stops = [m.register_forward_pre_hook(_raise_stop) for m in post]
    try:
        ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
        with _meta_counts_as_tracing():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except (ValueError, TypeError) as err:
        if "unpack" in str(err):
            raise ArchitectureError(
                f"{type(model).__name__} ({model.config.model_type}) cannot be split: {UNPACKING_LOOP} "
                f"({n} values from each block)"
            ) from None
    except Exception:  # noqa: BLE001 -- anything else on meta says nothing about the stand-ins
        pass
    finally:
        for h in stops:
            h.remove()
        for i, block in enumerate(originals):
            blocks[i] = block


def _raise_stop(module, args):
    raise _Stop


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "max_seq_len", "seq_length")


def trained_context(config: PretrainedConfig) -> tuple[int | None, str]:
    """The longest context the config says the model was trained for, scaled by its rope scaling factor; (None, "")
    when it names none. Positions without a table (rotary, ALiBi) run past it, but at distances the model never
    saw: the outputs fall apart while the run costs quadratically more."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            scaling = getattr(text, "rope_scaling", None) or {}
            factor = scaling.get("factor") if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None
            if isinstance(factor, (int, float)) and factor > 1:
                return int(value * factor), f"{key} × rope_scaling.factor {factor:g}"
            return value, key
    return None, ""


def _position_limit(config: PretrainedConfig, model: nn.Module, embed: nn.Module | None, ran: list[str]) -> tuple[int | None, str]:
    """A hard limit on sequence length: a learned position table (an embedding other than the tokens')
    that runs before the first block. Rotary, ALiBi and sinusoidal positions extend to any length."""
    tables = [
        mod for name, mod in model.named_modules()
        if name in ran and isinstance(mod, nn.Embedding) and mod is not embed
    ]
    if not tables:
        return None, ""
    rows = min(t.num_embeddings for t in tables)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and 0 < value <= rows:  # a table may keep a few extra rows (OPT's offset of 2)
            return value, key
    return rows, ""


def generation_refusal(config: PretrainedConfig) -> str | None:
    """Why split generation cannot serve this model, or None. transformers' own test of the model class decides: a
    model that cannot start from a ``DynamicCache`` builds a state object of its own (RWKV, xLSTM, MiniMax), whose
    per-model layout the parties' stubs cannot keep in step layer by layer."""
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    if cls._supports_default_dynamic_cache():
        return None
    return f"split generation does not support {config.model_type}: {cls.__name__} {OWN_CACHE}"


def check_seq_len(spec: ArchSpec, seq_len: int, key: str = "train.seq_len", model: str | None = None) -> None:
    """Refuse a sequence length the model's position table cannot index (an IndexError deep in the model otherwise)."""
    if spec.max_positions is not None and seq_len > spec.max_positions:
        from ..config import ConfigError

        raise ConfigError(
            f"{key}={seq_len} is longer than {model or spec.model_type} allows: it has learned positions for "
            f"{spec.max_positions} tokens ({f'{spec.positions_key} in its config' if spec.positions_key else 'the rows of its position table'}); "
            f"use {key} <= {spec.max_positions}"
        )
    if spec.context is not None and seq_len > spec.context:
        from ..config import ConfigError

        raise ConfigError(
            f"{key}={seq_len} is longer than {model or spec.model_type} was trained for: {spec.context} tokens "
            f"({spec.context_key} in its config); its positions run past that, but at distances it never saw, so the "
            f"outputs fall apart while each step costs ever more; use {key} <= {spec.context}, or extend the context "
            "with rope_scaling in the model's config.json"
        )
