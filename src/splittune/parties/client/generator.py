"""The client's half of split generation: transformers' own ``generate`` on the client's party model, with the
server's blocks reached across the cut.

The client's model already has weightless stubs where the server's blocks are (``AbsentBlock``); they keep the
client's KV cache in step with one value per position. The stub at the first server block becomes a
:class:`RemoteSegment`: it sends the hidden state of the new positions (with their columns of the attention mask,
which the server appends to the ones it holds, and the position ids the model's forward was given, which a
forward pre-hook records) in a ``generate`` message, and returns what the server's segment made of it. In the
two-part split the server ends the model: its reply is the head's raw output, which a forward hook puts in place
of the client's own (weightless) head's, so whatever the model does after its head (logit scaling, soft-capping)
runs once, on the client, as in the unsplit model.

Everything else (sampling, stopping on EOS or stop strings, streamers, left padding, the cache classes) is
transformers' code. Beam search reorders caches, which a split cannot do across parties: it is refused, and so
are models whose generation state lives in a cache object of their own rather than transformers' layered ``Cache``
(RWKV, xLSTM, the original MiniMax): each party keeps the layers of its own blocks, which such a cache does not have.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ...errors import SplittuneError
from ...channels import RemoteError
from ...cut.link import CutLink
from ...device import to_device
from ...models.arch import generation_refusal
from ...models.absent import AbsentBlock
from ...wire import Message
from ..party import Party


class GenerationError(SplittuneError, ValueError):
    """A generation request splittune cannot serve (named argument, allowed values)."""


class RemoteSegment(AbsentBlock):
    """The first server block, as the client sees it during generation: the server's whole segment."""

    def __init__(self, original: AbsentBlock, generator: "SplitGenerator"):
        super().__init__(original, original.block_tuple, original.layer_idx)
        self.generator = generator

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        shaped = super().forward(*args, **kwargs)  # this party's cache keeps the server's layers in step too
        out = self.generator.cross(hidden)
        return (out, *shaped[1:]) if isinstance(shaped, tuple) else out  # in the form the real block returns


@dataclass
class Crossings:
    """What the generation sent across the cut, one entry per message: its new positions (the prompt's, then 1 per
    token) and its bytes each way."""

    positions: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return len(self.positions)

    @property
    def bytes_up(self) -> int:
        return sum(self.up)

    @property
    def bytes_down(self) -> int:
        return sum(self.down)


class _Clock(BaseStreamer):
    """Records when each new token exists (transformers calls ``put`` with the prompt, then each step's tokens)
    and passes everything on to the caller's streamer."""

    def __init__(self, inner: BaseStreamer | None):
        self.inner, self.times, self.calls = inner, [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call is the prompt
            self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class SplitGenerator:
    """Generation through the split for one client party over ``link``, in one inference session.

    ``server_state``: the tensors the run's server part trained (sent once, in the session's hello)."""

    def __init__(self, party: Party, link: CutLink, server_state: dict[str, torch.Tensor]):
        self.party, self.link = party, link
        plan = party.plan
        if plan.shape == "centralized":
            raise GenerationError("a centralized run has no cut; generate with the exported adapter instead")
        refusal = generation_refusal(party.model.config)
        if refusal:
            raise GenerationError(refusal)
        self.start = plan.cuts[0]  # the server's segment (the trunk) starts at the first cut
        self.two_part = plan.shape == "two-part"
        self.model = party.model
        self.base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.model.eval()
        self.crossings = Crossings()
        self._seen: dict[str, Any] = {}
        self._positions = 0  # what the server's cache holds for the current sequence
        self._logits: torch.Tensor | None = None
        stub = party.blocks[self.start]
        if not isinstance(stub, AbsentBlock):
            raise GenerationError(f"block {self.start} is the client's own; the server's segment must start there")
        party.blocks[self.start] = RemoteSegment(stub, self)
        self._hooks = [self.base.register_forward_pre_hook(self._record, with_kwargs=True)]
        if self.two_part:
            self._hooks.append(self.base.get_output_embeddings().register_forward_hook(self._server_logits))
        self.session = link.session
        meta = {**party.session.to_meta(), "inference": True}
        state = {k: v.detach().cpu().contiguous() for k, v in server_state.items()}
        try:
            self.info = dict(link.hello(meta, tensors=state).meta)
        except BaseException:
            self._restore()
            raise

    # -- hooks --------------------------------------------------------------------------------------------
    def _record(self, module, args, kwargs):
        """The model forward's inputs the server's segment needs too (the whole mask, positions, logits kept)."""
        self._seen = {"attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids"),
                      "logits_to_keep": kwargs.get("logits_to_keep")}

    def _server_logits(self, module, args, output):
        logits, self._logits = self._logits, None
        if logits is None:
            raise GenerationError("the head ran without the server's logits (a forward that did not cross the cut)")
        return logits.to(output.dtype)

    def cross(self, hidden: torch.Tensor) -> torch.Tensor:
        """The new positions' hidden state to the server's segment and back (two-part: the logits are kept for the
        head, and the hidden state passes on unchanged through the client's stubs)."""
        seen = self._seen
        mask = seen.get("attention_mask")
        rows, new = hidden.shape[:2]
        tensors = {"hidden": hidden.detach()}
        if mask is None:  # the forward got none (Mamba drops it after the prompt): the server's segment gets none either
            start = self._positions
        elif mask.dim() != 2:
            raise GenerationError("split generation needs a 2-D attention mask ([batch, positions])")
        else:
            start = mask.shape[1] - new
            tensors["attention_mask"] = mask[:, start:].to(torch.int64)  # the new columns: the server keeps the rest
        if start != self._positions and start != 0:
            raise GenerationError(f"the model's forward starts at position {start}, but the server holds {self._positions}; "
                                  "split generation sends each position once, in order")
        if seen.get("position_ids") is not None:
            tensors["position_ids"] = seen["position_ids"].to(torch.int64)
        meta: dict[str, Any] = {"start": start}
        if self.two_part and seen.get("logits_to_keep") is not None:
            keep = seen["logits_to_keep"]
            if not isinstance(keep, int):
                raise GenerationError("logits_to_keep must be an integer for split generation")
            meta["keep"] = keep
        with self.link.channel.metered() as sent:
            reply = self.link.call(Message("generate", self.session, 0, 0, tensors, meta))
        c = self.crossings
        c.positions.append(new)
        c.up.append(sent.up)
        c.down.append(sent.down)
        self._positions = start + new
        out = to_device(reply.tensors, hidden.device)
        if self.two_part:
            self._logits = out["logits"]
            return hidden
        return out["hidden"].to(hidden.dtype)

    # -- the call ------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, seed: int | None = None,
                 streamer: BaseStreamer | None = None, **kwargs):
        """transformers' ``generate`` through the split (same arguments and return value). ``seed`` makes sampling
        reproducible without touching the caller's random state."""
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_beam_groups", 1) != 1:
            raise GenerationError("num_beams: split generation samples or decodes greedily (1); beam search would "
                                  "reorder the server's cache, which splittune does not do across parties")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise GenerationError("assisted decoding verifies several positions and rolls the cache back; "
                                  "split generation does not support it")
        device = self.party.device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        self._positions, self._logits = 0, None
        clock = _Clock(streamer)
        fork = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]) if seed is not None else contextlib.nullcontext()
        started = time.perf_counter()
        with torch.no_grad(), fork:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=clock, **kwargs)
        self.last_times = {"started": started, "tokens": list(clock.times)}
        return out

    def _restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        remote = self.party.blocks[self.start]
        if isinstance(remote, RemoteSegment):
            self.party.blocks[self.start] = AbsentBlock(remote, remote.block_tuple, remote.layer_idx)

    def close(self) -> None:
        """End the inference session (the server frees its cache) and give the client's block its stub back."""
        self._restore()
        try:
            self.link.call(Message("close", self.session))
        except RemoteError:  # a server that is gone, or that timed the session out, has freed it already
            pass
