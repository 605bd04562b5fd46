"""``tiny:<model_type>``: small random models of any HF architecture, for tests and quick experiments.

A tiny model is written once to the cache as a normal HF directory (config, byte-level tokenizer,
safetensors), so it goes through exactly the same loading path as a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from ..assets import cache_dir
from .tokenizer import byte_tokenizer

DEFAULTS = dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=320, seed=0)

# Settings that make a tiny config exercise what the real architecture does differently:
# sliding windows, mixed layer types, soft-capping, embedding projections, partial rotary.
QUIRKS: dict[str, dict] = {
    "mistral": dict(sliding_window=5),
    "phi3": dict(sliding_window=5),
    "starcoder2": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "gemma3_text": dict(sliding_window=5, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "granite": dict(embedding_multiplier=12.0, logits_scaling=8.0),
    "opt": dict(word_embed_proj_dim=32),
    "gpt_neox": dict(rotary_pct=0.25),
}


class TinyModelError(ValueError):
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


def tiny_config(model_type: str, opts: dict):
    try:
        config = AutoConfig.for_model(model_type, vocab_size=opts["vocab"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    except ValueError:
        raise TinyModelError(f"unknown model_type {model_type!r} for a tiny model") from None
    settings = dict(
        hidden_size=opts["hidden"],
        num_hidden_layers=opts["layers"],
        num_attention_heads=opts["heads"],
        num_key_value_heads=opts["kv_heads"],
        intermediate_size=opts["ffn"],
        ffn_dim=opts["ffn"],
        n_inner=opts["ffn"],
        head_dim=opts["hidden"] // opts["heads"],
        vocab_size=opts["vocab"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **QUIRKS.get(model_type, {}),
    )
    optional = {"ffn_dim", "n_inner", "head_dim", "num_key_value_heads"}
    for key, value in settings.items():
        if key in optional and not hasattr(config, key):
            continue
        try:
            setattr(config, key, value)
        except AttributeError:  # a derived property on this architecture (e.g. Falcon's head_dim)
            if key not in optional:
                raise
    if getattr(config, "layer_types", None) is not None:
        # Per-layer attention kinds for the new depth; a tiny model mixes sliding and full attention
        # wherever the architecture supports sliding windows, so both mask paths are exercised.
        kinds = list(config.layer_types)[: opts["layers"]]
        kinds += [kinds[-1]] * (opts["layers"] - len(kinds))
        if getattr(config, "sliding_window", None) and len(set(kinds)) == 1:
            kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(opts["layers"])]
        config.layer_types = kinds
    return config


def tiny_model_dir(ref: str) -> Path:
    """Materialise ``tiny:...`` in the cache (once) and return its directory."""
    model_type, opts = parse_tiny(ref)
    tag = "-".join(f"{k}{v}" for k, v in opts.items())
    out = cache_dir() / "models" / f"tiny-{model_type}-{tag}-tf{transformers.__version__}"
    if (out / "model.safetensors").exists():
        return out
    config = tiny_config(model_type, opts)
    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts["seed"])
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as err:  # not a causal LM (t5, bert…), or options the architecture rejects (heads ∤ hidden)
            raise TinyModelError(f"cannot build {ref!r}: {str(err).splitlines()[0][:300]}") from None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / "splittune.json").write_text(json.dumps({"tiny": ref, "options": opts}))
    tmp.replace(out) if not out.exists() else None
    return out
