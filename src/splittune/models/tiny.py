"""``tiny:<model_type>``: small random models of any HF architecture, for tests and quick experiments.

A tiny model is written once to the cache as a normal HF directory (config, byte-level tokenizer,
safetensors), so it goes through exactly the same loading path as a real checkpoint.

A tiny config must be a valid model of its architecture, or a failing ``verify`` would blame the split
for a broken config. It is built through the config class's own constructor (so ``__post_init__`` derives
per-layer lists and other dependent fields for the new depth, and the class's validators run), and every
size a default config ties to the full-size dimensions is rescaled with them (rotary and per-head
dimensions, expert counts, layer indices, attention windows). A hybrid keeps every kind of layer it has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import SplittuneError
from ..assets import cache_dir
from .tokenizer import byte_tokenizer

DEFAULTS = dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=320, seed=0)

# Bump when what a tiny config contains changes: the cache directory names it, so a model built by an
# older rule is never reused.
TINY_VERSION = 4


def _alternate(first: str, second: str):
    return lambda o: [first if i % 2 == 0 else second for i in range(o["layers"])]


# Mamba-2 mixers at the tiny width (the defaults keep the full model's 128 heads and 256 states, which made one
# training step of a 64-wide model take seconds): heads x head_dim = expand (2) x hidden, chunks shorter than a test
# sequence so the scan carries its state from chunk to chunk.
_SSM_HEADS = lambda o: 2 * o["hidden"] // 16  # noqa: E731
_MAMBA2 = dict(mamba_n_heads=_SSM_HEADS, mamba_d_state=16, mamba_chunk_size=8)

# Settings that make a tiny config exercise what the real architecture does differently (sliding windows,
# mixed layer types, soft-capping, embedding projections, partial rotary), or that no generic rule can
# derive. A value may be a function of the options (for lists that follow the depth).
QUIRKS: dict[str, dict] = {
    "mistral": dict(sliding_window=5),
    "phi3": dict(sliding_window=5),
    "starcoder2": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "gemma3_text": dict(sliding_window=5, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "granite": dict(embedding_multiplier=12.0, logits_scaling=8.0),
    "opt": dict(word_embed_proj_dim=32),
    "gpt_neox": dict(rotary_pct=0.25),
    # local (windowed) and global attention alternate, as in the released models
    "gpt_neo": dict(window_size=5, attention_types=lambda o: [[["global", "local"], o["layers"] // 2]]
                    + ([[["global"], 1]] if o["layers"] % 2 else [])),
    # one attention layer among the state-space layers, as the released models interleave them
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "lfm2": dict(full_attn_idxs=lambda o: list(range(1, o["layers"], 2))),
    "inkling2_text": dict(unpadded_vocab_size=lambda o: o["vocab"]),  # the head's rows (the default is the full 200k)
    "inkling2_loop_text": dict(unpadded_vocab_size=lambda o: o["vocab"]),
    "lfm2_moe": dict(layer_types=_alternate("conv", "full_attention")),  # no default list: released configs name one
    # QSA sparse attention needs its indexer sized (the default names none), a budget shorter than a test sequence
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                           indexer_compress_ratio=2, hc_lowrank=8),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=0),  # two hybrid layers share one attention block
    "granitemoehybrid": dict(layer_types=_alternate("linear_attention", "full_attention"), **_MAMBA2),
    "mamba2": dict(num_heads=_SSM_HEADS, head_dim=16, state_size=16, n_groups=2, chunk_size=8),
    "bamba": dict(attn_layer_indices=lambda o: list(range(1, o["layers"], 2)), **_MAMBA2),
    "falcon_h1": dict(mamba_d_ssm=lambda o: 2 * o["hidden"], **_MAMBA2),
    "nemotron_h": dict(mamba_num_heads=_SSM_HEADS, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8),
    # the query/key width rounds up to a multiple of 64 in the cache but not in the layer: a factor that lands on one
    "xlstm": dict(num_heads=lambda o: o["heads"], qk_dim_factor=lambda o: max(1, o["hidden"] // 64) * 64 / o["hidden"]),
}

ATTENTION_KINDS = {"full_attention", "sliding_attention"}
KIND_LISTS = {"layer_types", "layers_block_type"}  # what configs call their per-layer kinds


def _caps(opts: dict) -> dict:
    """Upper bounds for settings that only some configs have: expert counts small enough to build quickly and
    large enough that routing chooses among experts; expert widths; the dense layers before the first MoE layer;
    attention windows.
    A config whose default is below a bound (0 or None: a dense model) keeps it."""
    return dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                first_k_dense_replace=1, moe_intermediate_size=opts["ffn"] // 2,
                shared_expert_intermediate_size=opts["ffn"] // 2, kv_lora_rank=opts["hidden"] // 2,
                q_lora_rank=opts["hidden"] // 2,
                # windows shorter than a test batch's sequences, so windowed attention differs from full attention
                sliding_window=5, sliding_window_size=5, attention_window_size=5, attention_chunk_size=5)


class TinyModelError(SplittuneError, ValueError):
    pass


def tiny_reference() -> str:
    """How a tiny model is named, with every option and its default (``splittune models``, docs/models-and-data.md)."""
    return "tiny:MODEL_TYPE[," + ",".join(f"{k}={v}" for k, v in DEFAULTS.items()) + "]"


def parse_tiny(ref: str) -> tuple[str, dict]:
    """``tiny:llama`` or ``tiny:llama,layers=6,seed=1`` → ("llama", settings)."""
    body = ref.split(":", 1)[1]
    model_type, *pairs = body.split(",")
    opts = dict(DEFAULTS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in DEFAULTS:
            raise TinyModelError(f"bad tiny model option {pair!r} in {ref!r}; allowed: {', '.join(DEFAULTS)} (e.g. layers=6)")
        try:
            opts[key] = int(value)
        except ValueError:
            raise TinyModelError(f"tiny model option {key}={value!r} in {ref!r} must be an integer (e.g. {key}={DEFAULTS[key]})") from None
        if opts[key] < (0 if key == "seed" else 1):
            raise TinyModelError(f"tiny model option {key}={value} in {ref!r} must be {'>= 0' if key == 'seed' else 'positive'}")
    if not model_type:
        raise TinyModelError(f"{ref!r} names no model type; e.g. tiny:llama")
    return model_type, opts


def _sizes(opts: dict) -> dict:
    ffn = opts["ffn"]
    return dict(
        hidden_size=opts["hidden"],
        num_hidden_layers=opts["layers"],
        num_attention_heads=opts["heads"],
        num_key_value_heads=opts["kv_heads"],
        intermediate_size=ffn,
        ffn_dim=ffn,
        n_inner=ffn,
        head_dim=opts["hidden"] // opts["heads"],
        vocab_size=opts["vocab"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _peek(config: PretrainedConfig, name: str, default=None):
    """``config.name``, or ``default`` where reading it raises: a config with per-layer settings (Gemma 4) refuses
    a global read of one that varies across layers; such a setting is left as the constructor derives it."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError and kin
        return default


def _head_dim(config: PretrainedConfig) -> int | None:
    heads = _peek(config, "num_attention_heads", None)
    hidden = _peek(config, "hidden_size", None)
    if isinstance(_peek(config, "head_dim", None), int):
        return config.head_dim
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def _even_share(value: int, old: int, new: int) -> int:
    """``value`` (a part of ``old``) as the same share of ``new``, even and at least 2."""
    return max(2, min(new, round(value * new / old / 2) * 2))


def _derived(cls: type, default: PretrainedConfig, kwargs: dict, opts: dict) -> dict:
    """Settings that follow from the new sizes: rotary and per-head dimensions rescaled by the head
    dimension, expert counts capped, lists of layer indices folded into the new depth."""
    out: dict = {}
    old_head, new_head = _head_dim(default), opts["hidden"] // opts["heads"]
    depth, caps = _peek(default, "num_hidden_layers", None), _caps(opts)
    for name in _fields(cls) - set(kwargs):
        value = _peek(default, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if name in caps and value > caps[name]:
                out[name] = caps[name]
            elif old_head and (name == "rotary_dim" or (name.endswith("head_dim") and name != "head_dim")):
                out[name] = _even_share(value, old_head, new_head)
        elif _is_layer_indices(name, value, depth) and any(i >= opts["layers"] for i in value):
            out[name] = type(value)(sorted({i % opts["layers"] for i in value}))
    return out


def _is_layer_indices(name: str, value, depth) -> bool:
    return (any(w in name for w in ("layer", "idx", "indices")) and isinstance(value, (list, tuple)) and bool(value)
            and isinstance(depth, int) and all(type(i) is int and 0 <= i < depth for i in value))


def _per_layer(config: PretrainedConfig, default: PretrainedConfig, opts: dict) -> dict:
    """Per-layer lists the constructor left at the default depth (given as fixed lists rather than derived),
    cut or extended to the new depth. A tiny model mixes sliding and full attention wherever the architecture
    supports sliding windows, so both mask paths are exercised."""
    depth, n = _peek(default, "num_hidden_layers", None), opts["layers"]
    out: dict = {}
    for name in _fields(type(config)):
        value = _peek(config, name, None)
        if isinstance(value, (list, tuple)) and value and len(value) == depth != n:
            new = list(value)[:n] + [value[-1]] * (n - len(value))
            out[name] = type(value)(new)
    for name in KIND_LISTS & _fields(type(config)):  # a hybrid keeps every kind of layer it has at full depth
        full, tiny = _peek(default, name, None), out.get(name, _peek(config, name, None))
        if isinstance(full, (list, tuple)) and isinstance(tiny, (list, tuple)) and len(set(tiny)) < min(len(set(full)), n):
            kinds = list(dict.fromkeys(full))
            out[name] = [kinds[i % len(kinds)] for i in range(n)]
    kinds = out.get("layer_types", _peek(config, "layer_types", None))
    if "layer_types" in _fields(type(config)) and isinstance(kinds, (list, tuple)) and len(set(kinds)) == 1 \
            and kinds[0] in ATTENTION_KINDS and _peek(config, "sliding_window", None):
        out["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return out


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [""])[0][:300]


def _build(cls: type, kwargs: dict) -> PretrainedConfig:
    try:
        return cls(**kwargs)
    except Exception as err:  # noqa: BLE001 -- validators raise their own types (StrictDataclassClassValidationError)
        raise TinyModelError(f"cannot build a tiny {cls.model_type!r} config: {_first_line(err)}") from None


def _tiny(cls: type, opts: dict) -> PretrainedConfig:
    try:
        default = cls()
    except Exception as err:  # noqa: BLE001 -- a config class whose defaults are not a valid model
        raise TinyModelError(f"cannot build a default {cls.model_type!r} config: {_first_line(err)}") from None
    fields = _fields(cls)
    attribute_map = getattr(cls, "attribute_map", {})
    kwargs: dict = {}
    for key, value in _sizes(opts).items():
        name = attribute_map.get(key, key)
        if name in fields:
            kwargs[name] = value
    for key, value in QUIRKS.get(cls.model_type, {}).items():
        kwargs[attribute_map.get(key, key)] = value(opts) if callable(value) else value
    kwargs.update(_derived(cls, default, kwargs, opts))
    if "kv_lora_rank" in fields and "num_key_value_heads" in kwargs:  # latent attention: keys and values per query head
        kwargs["num_key_value_heads"] = opts["heads"]
    for key in getattr(cls, "sub_configs", None) or {}:  # composite configs: every part tiny
        part = getattr(default, key, None)
        if isinstance(part, PretrainedConfig) and key in fields:
            kwargs[key] = _tiny(type(part), opts)
    try:
        config = _build(cls, kwargs)
    except TinyModelError:  # per-layer lists the constructor does not derive from the depth (a fixed default)
        kwargs.update(_per_layer(default, default, opts))
        config = _build(cls, kwargs)
    lists = _per_layer(config, default, opts)
    if lists:
        config = _build(cls, {**kwargs, **lists})
    return config


def tiny_config(model_type: str, opts: dict) -> PretrainedConfig:
    if model_type not in CONFIG_MAPPING:
        raise TinyModelError(f"unknown model_type {model_type!r} for a tiny model")
    return _tiny(CONFIG_MAPPING[model_type], opts)


def tiny_model_dir(ref: str) -> Path:
    """Materialise ``tiny:...`` in the cache (once) and return its directory."""
    model_type, opts = parse_tiny(ref)
    tag = "-".join(f"{k}{v}" for k, v in opts.items())
    out = cache_dir() / "models" / f"tiny-{model_type}-{tag}-v{TINY_VERSION}-tf{transformers.__version__}"
    if (out / "model.safetensors").exists():
        return out
    config = tiny_config(model_type, opts)
    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts["seed"])
        try:
            model = AutoModelForCausalLM.from_config(config)
        except Exception as err:  # noqa: BLE001 -- not a causal LM (t5, bert…), or options the architecture rejects
            raise TinyModelError(f"cannot build {ref!r}: {type(err).__name__}: {_first_line(err)}") from None
    # a directory of this process's own, renamed into place: processes building the same model at once (parallel
    # test workers, clients on one machine) never see a half-written one, and the first rename wins
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / "splittune.json").write_text(json.dumps({"tiny": ref, "options": opts}))
    try:
        tmp.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").exists():
            raise
    return out
