"""Tokenizing many texts at once, and a token cache for the (public) builtin sources.

Tokenizing all of Shakespeare (5 M characters), or rendering and tokenizing the 10 k sentiment
conversations, takes a few seconds; the cache makes every later run take a fraction of a second. Only
builtin sources are cached: a client's private text is never copied into the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerBase

from ..assets import cache_dir

_PROBE = "Hello world"


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts in front of a single text (e.g. a BOS token), found by probing."""
    full = tokenizer(_PROBE)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    return []


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched call."""
    if not texts:
        return []
    # verbose=False: whole documents are longer than the model's context by design; they are cut into blocks later
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of everything that decides a fast tokenizer's output; None for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(backend.to_str().encode())
    return digest.hexdigest()


def _digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cached(
    name: str, tokenizer: PreTrainedTokenizerBase, key: Sequence[str], compute: Callable[[], list[Sequence[int]]]
) -> list[np.ndarray]:
    """``compute()`` (lists of token ids), stored under ``cache_dir()/tokens`` by tokenizer and ``key`` texts.

    ``key`` must hold everything besides the tokenizer that decides the result (the texts, templates, a
    version tag). Files are safetensors; a damaged one is rebuilt. Slow tokenizers are never cached.
    """
    fp = fingerprint(tokenizer)
    if fp is None:
        return [np.asarray(ids, dtype=np.int64) for ids in compute()]
    path = cache_dir() / "tokens" / f"{name}-{_digest([fp, *key])[:16]}.safetensors"
    if path.exists():
        try:
            stored = load_file(path)
            ids, lengths = stored["ids"], stored["lengths"]
            if ids.ndim == lengths.ndim == 1 and (lengths >= 0).all() and lengths.sum() == len(ids):
                return np.split(ids.astype(np.int64), np.cumsum(lengths)[:-1])
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    lists = compute()
    if not lists:
        return []
    lengths = np.asarray([len(x) for x in lists], dtype=np.int64)
    flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in lists])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"ids": flat, "lengths": lengths}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1])


def encode_cached(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], name: str) -> list[np.ndarray]:
    """:func:`encode`, cached."""
    return cached(name, tokenizer, ["encode-v1", *texts], lambda: encode(tokenizer, texts))
