"""Model references: ``builtin:NAME``, ``tiny:TYPE[,opt=v…]``, a local directory, or a hub id.

Every reference resolves to a :class:`ModelSource` that knows the config, the tokenizer and where each
weight tensor lives, so that a party can read only the tensors it owns (DESIGN.md contract 3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .builtin import BUILTIN_MODELS, builtin_model_dir
from .tiny import tiny_model_dir

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class ModelError(ValueError):
    """A model reference that cannot be resolved or loaded."""


@dataclass
class ModelSource:
    ref: str
    path: Path | None  # local directory; None for a hub id not yet downloaded
    repo_id: str | None = None
    _weight_map: dict[str, str] | None = field(default=None, repr=False)

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(str(self.path) if self.path else self.repo_id)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        tok = AutoTokenizer.from_pretrained(str(self.path) if self.path else self.repo_id)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def weight_map(self) -> dict[str, str]:
        """Tensor name → safetensors file name (relative), read from the index or the single file's header."""
        if self._weight_map is None:
            self._weight_map = self._read_weight_map()
        return self._weight_map

    def weight_file(self, filename: str) -> Path:
        if self.path is not None:
            return self.path / filename
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename))

    def _read_weight_map(self) -> dict[str, str]:
        from safetensors import safe_open

        index = self._optional_file(SAFETENSORS_INDEX)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self._optional_file(SAFETENSORS_SINGLE)
        if single is None:
            where = self.path or self.repo_id
            raise ModelError(
                f"{where} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; splittune reads safetensors checkpoints "
                "(convert a .bin checkpoint with transformers' save_pretrained first)"
            )
        with safe_open(single, "pt") as f:
            return {key: SAFETENSORS_SINGLE for key in f.keys()}

    def _optional_file(self, filename: str) -> Path | None:
        if self.path is not None:
            candidate = self.path / filename
            return candidate if candidate.exists() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, filename))
        except EntryNotFoundError:
            return None

    def fingerprint(self) -> str:
        """Identity of the base model (config + tensor names and file digests) that both parties must share."""
        import hashlib

        digest = hashlib.sha256(json.dumps(self.config().to_dict(), sort_keys=True, default=str).encode())
        for name, filename in sorted(self.weight_map().items()):
            digest.update(f"{name}:{filename}".encode())
        if self.path is not None:
            for filename in sorted(set(self.weight_map().values())):
                stat = (self.path / filename).stat()
                digest.update(f"{filename}:{stat.st_size}".encode())
        return digest.hexdigest()[:16]


def resolve_model(ref: str) -> ModelSource:
    """Turn a model reference into a local source, fetching builtin assets or writing tiny models on first use."""
    if ref.startswith("builtin:"):
        return ModelSource(ref, builtin_model_dir(ref.split(":", 1)[1]))
    if ref.startswith("tiny:"):
        return ModelSource(ref, tiny_model_dir(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{ref!r} is a directory without config.json; expected a Hugging Face model directory")
        return ModelSource(ref, path.resolve())
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"model {ref!r} is not a model directory; use builtin:NAME, tiny:TYPE, a directory or a hub id")
    return _hub_source(ref)


def _hub_source(repo_id: str) -> ModelSource:
    """A hub model: config and tokenizer now, weight shards only when a party asks for its tensors."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, unknown repo, gated repo: all end here with the reason
        builtin = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise ModelError(
            f"cannot load {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}); "
            f"offline, use a local directory, {builtin}, or tiny:TYPE"
        ) from None
    return ModelSource(repo_id, None, repo_id=repo_id)
