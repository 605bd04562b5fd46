"""Model references: ``builtin:NAME``, ``tiny:TYPE[,opt=v…]``, a local directory, or a hub id.

Every reference resolves to a :class:`ModelSource` that knows the config, the tokenizer and where each
weight tensor lives, so that a party can read only the tensors it owns (DESIGN.md contract 3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..errors import SplittuneError
from .builtin import BUILTIN_MODELS, builtin_model_dir
from .tiny import tiny_model_dir

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class ModelError(SplittuneError, ValueError):
    """A model reference that cannot be resolved or loaded."""


# the files a tokenizer is made from (fast, sentencepiece, BPE/WordPiece vocabularies, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken", "vocab.model")


@dataclass
class ModelSource:
    ref: str
    path: Path | None  # local directory; None for a hub id not yet downloaded
    repo_id: str | None = None
    _weight_map: dict[str, str] | None = field(default=None, repr=False)

    def config(self) -> PretrainedConfig:
        where = self.path / "config.json" if self.path else f"the config.json of {self.repo_id}"
        if self.path is not None:
            try:
                json.loads((self.path / "config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise ModelError(f"{where} is not a readable JSON file ({_reason(err)}); {self._fix_hint()}") from None
        try:
            return AutoConfig.from_pretrained(str(self.path) if self.path else self.repo_id)
        except (OSError, ValueError, KeyError) as err:  # no or unknown model_type, a config transformers cannot read
            raise ModelError(f"cannot read the model config {where}: {str(err)[:300]}") from None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self.path is not None and not any((self.path / f).exists() for f in TOKENIZER_FILES):
            raise ModelError(f"{self.path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                             "files of the model it comes from into it (AutoTokenizer.from_pretrained(NAME)"
                             ".save_pretrained(DIR))")
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path) if self.path else self.repo_id)
        except Exception as err:  # missing or malformed tokenizer files end here, with the directory named
            raise ModelError(
                f"cannot load the tokenizer of {self.path or self.repo_id} ({type(err).__name__}: {str(err)[:200]}); "
                "a model directory needs its tokenizer files (tokenizer.json or tokenizer_config.json and vocabulary)"
            ) from None
        if len(tok.get_vocab()) == 0:
            raise ModelError(f"the tokenizer of {self.path or self.repo_id} has an empty vocabulary; its tokenizer files are "
                             "incomplete (tokenizer.json, or a vocabulary beside tokenizer_config.json)")
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
        from safetensors import SafetensorError, safe_open

        index = self._optional_file(SAFETENSORS_INDEX)
        if index is not None:
            try:
                return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
                raise ModelError(
                    f"{index} is not a valid safetensors index (JSON with a 'weight_map'): {_reason(err)}; {self._fix_hint()}"
                ) from None
        single = self._optional_file(SAFETENSORS_SINGLE)
        if single is None:
            where = self.path or self.repo_id
            raise ModelError(
                f"{where} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; splittune reads safetensors checkpoints "
                "(convert a .bin checkpoint with transformers' save_pretrained first)"
            )
        try:
            with safe_open(single, "pt") as f:
                return {key: SAFETENSORS_SINGLE for key in f.keys()}
        except SafetensorError as err:
            raise self.corrupt(single, err) from None

    def corrupt(self, file: Path, err: Exception) -> ModelError:
        """The error for a weight file safetensors cannot read: it names the file and how to get a good copy."""
        return ModelError(f"{file} is corrupt or truncated ({err}); {self._fix_hint()}")

    def _fix_hint(self) -> str:
        if self.ref.startswith("builtin:"):
            return f"it is splittune's cache of {self.ref}: delete {self.path} and run `splittune fetch {self.ref}` to rebuild it"
        if self.ref.startswith("tiny:"):
            return f"it is splittune's cache of {self.ref}: delete {self.path} and it is rebuilt on next use"
        if self.path is None:
            return f"it is in the Hugging Face cache: download {self.repo_id} again (e.g. `hf download {self.repo_id} --force-download`)"
        return "download or save the model again"

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

    def describe(self) -> str:
        """The reference and where it resolved, for messages: ``tiny:gpt2 (/home/me/.cache/…/tiny-gpt2-…)``."""
        where = str(self.path or self.repo_id or "")
        return self.ref if where in ("", self.ref) else f"{self.ref} ({where})"

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


def _reason(err: Exception) -> str:
    """An OS or parse error in a few words (the file itself is named by the caller)."""
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: byte {err.start}"
    return f"{type(err).__name__}: {str(err)[:200]}"


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
