"""Split generation from a finished run (``splittune generate``, and the Python API): the run's fine-tuned model,
split as it was trained. The client part runs here; the server part runs in this process or in a ``splittune
serve`` reached over gRPC, and only activations cross: the prompt and the answer stay here as text.

    from splittune.generation import load_split
    with load_split("runs/demo") as split:
        ids = split.tokenizer("To be, or not to be", return_tensors="pt")
        out = split.generate(**ids, max_new_tokens=20, streamer=TextStreamer(split.tokenizer))

``SplitModel.generate`` is transformers' ``generate`` (same arguments, same return value) through the split;
``SplitModel.complete`` takes prompts as text, frames them as the run's task framed its prompts (the chat template
for instruction runs, unless ``raw``), and reports the bytes each way and the time to the first token.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .channels import Channel
from .config import RunConfig, load_config
from .cut import CutLink, ServerLink, terms_from
from .data.instruction import InstructionFormat
from .data.tokens import encode, special_prefix
from .device import resolve_device
from .export import ExportError, read_run_adapters
from .models.adapters import load_trainable_state, lora_layers, trainable
from .models.arch import detect_arch
from .models.zoo import resolve_model
from .parties import Party, Server, SessionSpec
from .parties.client.generator import GenerationError, SplitGenerator
from .parties.server.inference import InferenceLimits
from .wire.names import FOLD, split
from .averaging import add_delta
from .defenses import ClientDefenses, Placement, chain_entries
from .engines.local import in_process, server_for

__all__ = ["Completion", "GenerationError", "SplitModel", "load_split"]


@dataclass
class Completion:
    """One prompt's answer and what producing it cost (``--json`` prints these)."""

    prompt: str
    completion: str
    token_ids: list[int]
    prompt_tokens: int
    bytes_up: int
    bytes_down: int
    time_to_first_token_s: float | None
    seconds: float
    messages: int  # crossings of the cut (the prompt's forward, then one per generated token)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _split_state(party: Party, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The run's tensors as (this client's part, the server's part), by what the client party trains and holds."""
    mine = {name for name, _ in trainable(party.model)}
    layers = set(lora_layers(party.model))
    client = {k: v for k, v in state.items() if k in mine or (k.startswith(FOLD) and k.removeprefix(FOLD) in layers)}
    return client, {k: v for k, v in state.items() if k not in client}


def _load_client(party: Party, state: dict[str, torch.Tensor]) -> None:
    trained, folds = split(FOLD, state)
    load_trainable_state(party.model, trained, partial=False)
    layers = lora_layers(party.model)
    with torch.no_grad():
        for module, delta in folds.items():
            add_delta(layers[module].get_base_layer().weight, delta.to(party.device), layers[module].fan_in_fan_out)


class SplitModel:
    """A run's model split at its cuts: the client's party here and an inference session with the server's part.

    ``state``: the run's trained tensors under the unsplit model's names (``export.read_run_adapters``; None: the
    adapters as initialised, which leave the base model as it is); ``channel``:
    to a served run's server (None: a server in this process, bounded by ``limits``); ``task``: how the run framed
    prompts (``instruction`` applies the chat template)."""

    def __init__(self, cfg: RunConfig, state: dict[str, torch.Tensor] | None, *, client: int = 0, channel: Channel | None = None,
                 device: torch.device | None = None, task: str = "causal_lm", limits: InferenceLimits | None = None,
                 serve_through: Callable[[Server, ServerLink], Callable[[bytes], bytes]] | None = None):
        self.source = resolve_model(cfg.model)
        config = self.source.config()
        self.spec = detect_arch(config)
        self.cfg = cfg = cfg.resolve(self.spec.n_blocks)
        if cfg.mode == "centralized" or not cfg.client_cuts(client):
            raise GenerationError("this run has no cut (mode centralized): export its adapter (splittune export) and "
                                  "generate with transformers")
        self.device = device if device is not None else resolve_device(cfg.train.device)
        self.task = task
        self.tokenizer = self.source.tokenizer()
        session = SessionSpec.from_run(cfg, self.source.fingerprint(), self.spec.model_type, client, 0, model=self.source.describe())
        self.party = Party("client", self.source, self.spec, session, config, device=self.device)
        theirs: dict[str, torch.Tensor] = {}
        if state is not None:  # None: the run's adapters as initialised (LoRA B = 0), i.e. the base model split
            mine, theirs = _split_state(self.party, state)
            _load_client(self.party, mine)
        self.server: Server | None = None
        if channel is None:
            self.server = server_for(self.source, self.spec, config, device=self.device, inference=limits)
            channel = in_process(self.server, serve_through)()
        # the run's noise defenses apply to generation's crossings, drawn from a fresh secret (noise repeated across
        # sessions would cancel out in their difference); no padding removal: see docs/generation.md
        self.defenses = ClientDefenses.build(cfg, Placement(self.party, None), keys=("defense",))
        terms = terms_from(cfg.codec.model_dump(), False, chain_entries(cfg))
        self.link = CutLink(channel, uuid.uuid4().hex[:12], terms)  # no secret: the chain's defenses draw a fresh one
        try:
            self.generator = SplitGenerator(self.party, self.link, theirs)
        except BaseException:
            self._shut()
            raise

    # -- transformers-like -----------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' ``generate`` through the split: the same arguments (``streamer`` included) and return value;
        ``seed`` makes sampling reproducible."""
        kwargs.setdefault("pad_token_id", self.pad_id)
        if kwargs.get("stop_strings") is not None:
            kwargs.setdefault("tokenizer", self.tokenizer)
        with self.defenses.bottom():
            return self.generator.generate(input_ids, attention_mask, **kwargs)

    # -- text in, text out ------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int | None:
        """What pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` of token ids as one batch padded on the left, so every row ends together, and its attention mask."""
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def encode_prompts(self, prompts: list[str], raw: bool = False) -> list[list[int]]:
        """Token ids of each prompt, framed as the run framed prompts in training (``raw``: the text alone)."""
        if raw:
            return encode(self.tokenizer, prompts)
        if self.task == "instruction":
            return InstructionFormat(self.tokenizer).prompt_ids(prompts)
        return [special_prefix(self.tokenizer) + ids for ids in encode(self.tokenizer, prompts)]

    def complete(self, prompts: list[str], *, raw: bool = False, max_new_tokens: int = 64, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: list[str] | None = None, streamer=None, batch: bool = False) -> list[Completion]:
        """Each prompt's completion (one at a time, or all in one left-padded batch with ``batch``)."""
        if not prompts or any(not p for p in prompts):
            raise GenerationError("a prompt is empty; give the text to continue (--prompt or --prompt-file)")
        if max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if not greedy and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise GenerationError("sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0 (0: no top-k)")
        ids = self.encode_prompts(prompts, raw)
        if any(not row for row in ids):
            raise GenerationError("a prompt encodes to no tokens")
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy, "seed": seed}
        if not greedy:
            options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # the model's generation config may ask for sampling settings; greedy means none of them
            options.update(temperature=None, top_p=None, top_k=None)
        if stop:
            options["stop_strings"] = stop
        groups = [list(range(len(ids)))] if batch else [[i] for i in range(len(ids))]
        results: list[Completion | None] = [None] * len(ids)
        for group in groups:
            input_ids, mask = self.left_padded([ids[i] for i in group])
            width = input_ids.shape[1]
            before = self.generator.crossings.messages
            t0 = time.perf_counter()
            with self.link.channel.metered() as sent:
                out = self.generate(input_ids, mask, streamer=streamer if len(group) == 1 else None, **options)
            seconds = time.perf_counter() - t0
            times = self.generator.last_times["tokens"]
            ttft = times[0] - self.generator.last_times["started"] if times else None
            up, down = sent.up, sent.down
            messages = self.generator.crossings.messages - before
            for j, i in enumerate(group):
                new = out[j, width:].tolist()
                new = _until_end(new, self.tokenizer, self.pad_id)
                results[i] = Completion(prompts[i], self.tokenizer.decode(new, skip_special_tokens=True), new, len(ids[i]),
                                        up, down, ttft, seconds, messages)
        return results  # type: ignore[return-value]

    # -- lifetime ------------------------------------------------------------------------------------------------
    def _shut(self) -> None:
        self.link.close()
        if self.server is not None:
            self.server.close()

    def close(self) -> None:
        self.generator.close()
        self._shut()

    def __enter__(self) -> "SplitModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _until_end(tokens: list[int], tokenizer, pad: int | None) -> list[int]:
    """A row's new tokens up to and including its end-of-sequence token (rows that stopped early are padded after)."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def run_task(run_dir: Path) -> str:
    """How a run framed its examples (``summary.json``'s task): instruction runs get the chat template."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("task", "causal_lm")
    return "causal_lm"


def load_split(run_dir: Path | str, *, channel: Channel | None = None, client: int | None = None,
               device: torch.device | None = None, limits: InferenceLimits | None = None, base: bool = False,
               **kwargs) -> SplitModel:
    """A finished run's split model (``client``: that client's own model in a run of several; default the global one;
    ``base``: the run's base model through the same split, its adapters as initialised, for comparison)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise GenerationError(f"{run_dir} is not a run directory (no config.yaml); train one with splittune train --out DIR")
    try:
        state, _ = read_run_adapters(run_dir, client)
    except ExportError as err:
        raise GenerationError(f"{err}; a run that did not finish has no adapters to generate with "
                              "(finish it: run the same train command again to resume)") from None
    cfg = load_config(run_dir / "config.yaml")
    return SplitModel(cfg, None if base else state, client=client or 0, channel=channel, device=device, task=run_task(run_dir),
                      limits=limits, **kwargs)
