"""Generated answers scored during training (``train.eval_metrics``): at each evaluation, greedy answers to the first
``train.eval_generate`` held-out instruction prompts, through the split as ``splittune evaluate`` makes them, scored
with the same metrics (eval/tasks.py).

The client's live party generates in an inference session of its own beside the training session, on the same
channel (so a tap records what the server saw, and the bytes count as the evaluation's): the server's part as trained
so far travels in its hello, the run's forward defenses apply with a fresh secret, as ``generation.SplitModel`` does.
Everything it changes is put back (the block stub, the hooks, train mode), and nothing draws from a generator training
uses, so a run's losses are the same with these scores or without.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import torch

from ..cut import CutLink, terms_from
from ..data import TaskData
from ..data.instruction import IGNORE_INDEX, prompt_length
from ..defenses import ClientDefenses, Placement, chain_entries
from ..parties import Client
from ..parties.client.generator import SplitGenerator
from .tasks import Item, generate_answers, score


def held_out_items(task: TaskData, tokenizer, count: int) -> tuple[list[Item], int]:
    """The first ``count`` held-out examples as items (the prompt's tokens; the response's, as the reference), and the
    longest response in tokens: no answer needs more to match."""
    items, longest = [], 0
    for example in task.eval[:count]:
        ids, labels = example["input_ids"], example["labels"]
        n = prompt_length(example)
        reference = ids[n:][labels[n:] != IGNORE_INDEX].tolist()
        longest = max(longest, len(reference))
        items.append(Item(tokenizer.decode(ids[:n]), tokenizer.decode(reference, skip_special_tokens=True).strip(),
                          ids[:n].tolist(), reference[0]))
    return items, longest


class _Generating:
    """The client's party model, generating through the split (transformers' ``generate`` signature)."""

    def __init__(self, generator: SplitGenerator, defenses: ClientDefenses):
        self.generator, self.defenses = generator, defenses

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        with self.defenses.bottom():
            return self.generator.generate(input_ids, attention_mask, **kwargs)


@contextlib.contextmanager
def generating(client: Client, cfg):
    """``client``'s model as it is now, something to call ``generate`` on (a client without a cut holds the whole
    model and generates alone)."""
    party = client.party
    training = party.model.training
    if not client.split:
        party.model.eval()
        try:
            yield party.model
        finally:
            party.model.train(training)
        return
    state = client.server_state()
    link = CutLink(client.link.channel, uuid.uuid4().hex[:12], terms_from(cfg.codec.model_dump(), False, chain_entries(cfg)))
    defenses = ClientDefenses.build(cfg, Placement(party, None), keys=("defense",))
    try:
        generator = SplitGenerator(party, link, state)
        try:
            yield _Generating(generator, defenses)
        finally:
            generator.close()
    finally:
        defenses.close()  # the channel stays open: it is the training session's
        party.model.train(training)


def generated_scores(client: Client, cfg, task: TaskData, tokenizer) -> dict[str, Any]:
    """``generated_<metric>`` of the client's model now on the first held-out prompts (``train.eval_generate``);
    empty unless the task is instruction data and ``train.eval_metrics`` names a metric."""
    t = cfg.train
    if not t.eval_metrics or task.kind != "instruction" or not task.eval:
        return {}
    items, longest = held_out_items(task, tokenizer, t.eval_generate)
    with generating(client, cfg) as model:
        answers = generate_answers(model, tokenizer, items, max_new_tokens=longest + 1, batch_size=t.batch_size)
    means, _ = score(items, answers, t.eval_metrics)
    return {f"generated_{m}": v for m, v in means.items()} | {"generated_n": len(items)}
