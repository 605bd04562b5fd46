"""Client memory savers: recomputed blocks (gradient checkpointing) change no result, and a frozen bottom keeps no
graph and asks for no gradient at the bottom cut."""

import json

import pytest
import torch
from safetensors.torch import load_file

from splittune.config import load_config
from splittune.models.recompute import saved_bytes
from splittune.run import build, train
from splittune.verify import verify
from configs import tiny

TINY = tiny("train.steps=3", "data.max_documents=4", "train.lr=0.01", "train.micro_batches=2")
CLIENT, SERVER = "train.gradient_checkpointing=true", "train.server_gradient_checkpointing=true"


def trained(out, *overrides):
    summary = train(load_config(None, [*TINY, *overrides]), out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapters = {}
    for path in sorted((out / "adapters").rglob("*.safetensors")):  # one client's, or each client's and the average
        adapters.update({f"{path.relative_to(out)}:{k}": v for k, v in load_file(path).items()})
    return summary, losses, adapters


@pytest.fixture(scope="module")
def without(tmp_path_factory):
    """The run without recomputation, trained once for both savers."""
    runs = {}

    def get(run):
        if tuple(run) not in runs:
            runs[tuple(run)] = trained(tmp_path_factory.mktemp("without"), *run)
        return runs[tuple(run)]

    return get


@pytest.mark.parametrize(
    "run",
    [
        ["cuts=[1,3]"],
        ["cuts=[2]"],
        ["cuts=[2]", "mode=centralized"],
        # dropout everywhere (the model's and LoRA's): the recompute must draw the same masks. One micro-batch: parties
        # that compute at once in one process share torch's RNG, and draw from it in no fixed order
        ["model=tiny:gpt2", "cuts=[1,3]", "train.model_dropout=true", "lora.dropout=0.1", "train.micro_batches=1"],
        # sfl-v1 batches both clients' rows, each through its adapter: the routing must hold in the recompute too
        ["cuts=[1,3]", "clients=2", "schedule=sfl-v1", "data.max_documents=8"],
    ],
    ids=["u-shape", "two-part", "centralized", "dropout", "sfl-v1"],
)
@pytest.mark.parametrize("saver", [[CLIENT], [SERVER]], ids=["client", "server"])
def test_recomputed_blocks_train_exactly_as_without(tmp_path, without, run, saver):
    if "mode=centralized" in run and saver == [SERVER]:
        pytest.skip("a centralized run has no server")
    _, want_losses, want = without(run)
    _, losses, got = trained(tmp_path, *run, *saver)
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)  # the adapters did move


def _batch(rows=2, seq=16):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (rows, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _count_block_forwards(party) -> list[int]:
    """Forward calls of each block's MLP: a recomputed block runs its forward again in backward."""
    calls = [0] * len(party.blocks)
    for i, block in enumerate(party.blocks):
        if hasattr(block, "mlp"):
            block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("saver", [[], [CLIENT, SERVER]], ids=["off", "on"])
def test_recomputed_blocks_run_twice_and_save_less(saver):
    client, server, _, _ = build(load_config(None, [*TINY, "cuts=[1,3]", "train.micro_batches=1", *saver]))
    mine, theirs = _count_block_forwards(client.party), _count_block_forwards(server.party)
    client.train_step(1, [_batch()])
    runs = 2 if saver else 1
    assert mine == [runs, 0, 0, runs] and theirs == [0, runs, runs, 0]

    party, ids = client.party, _batch()["input_ids"]
    bottom = lambda: party.run(0, 1, input_ids=ids, attention_mask=torch.ones_like(ids))  # noqa: E731
    kept = saved_bytes(bottom, party.model)
    party.recompute = not party.recompute
    other = saved_bytes(bottom, party.model)
    with_, without = (kept, other) if saver else (other, kept)
    hidden = ids.numel() * 64 * 4
    assert hidden <= with_ < without / 4  # the block's input (and its mask and rotary tables), not its insides
    with torch.no_grad():
        assert saved_bytes(bottom, party.model) == 0


def _bottom_step(overrides, unfreeze_embeddings=False):
    """One training step: bytes down per message kind, and the smashed activations the bottom produced."""
    client, _, channel, _ = build(load_config(None, [*TINY, "train.micro_batches=1", *overrides]))
    if unfreeze_embeddings:
        base = client.party.model.get_base_model() if hasattr(client.party.model, "get_base_model") else client.party.model
        base.get_submodule(client.party.spec.pre[0]).weight.requires_grad_(True)
    down, smashed = {}, []
    channel.add_tap(lambda d, m, n: d == "down" and down.__setitem__(m.kind, down.get(m.kind, 0) + n))
    run = client.party.run

    def recorded(start, end, **kwargs):
        out = run(start, end, **kwargs)
        if start == 0:
            smashed.append(out.hidden)
        return out

    client.party.run = recorded
    client.train_step(1, [_batch()])
    return down, smashed[0]


@pytest.mark.parametrize("cuts", [[1, 3], [2]], ids=["u-shape", "two-part"])
def test_frozen_bottom_keeps_no_graph_and_gets_no_gradient(cuts):
    frozen_down, frozen = _bottom_step([f"cuts={cuts}", "segments.bottom=frozen"])
    lora_down, lora = _bottom_step([f"cuts={cuts}"])
    assert frozen.grad_fn is None and not frozen.requires_grad
    assert lora.grad_fn is not None  # the twin: a bottom that trains keeps its graph
    grad = frozen.numel() * 4  # the gradient at the bottom cut (fp32); headers and timings differ by a few bytes
    assert abs(lora_down["gradients"] - frozen_down["gradients"] - grad) < 100


def test_frozen_blocks_with_a_training_embedding_keep_the_bottom_graph():
    """Frozen bottom blocks under an embedding that trains (a tied head trained by the top would be one) are not a
    frozen bottom: the graph and the gradient at the bottom cut stay."""
    down, hidden = _bottom_step(["cuts=[1,3]", "segments.bottom=frozen"], unfreeze_embeddings=True)
    assert hidden.grad_fn is not None
    assert down["gradients"] > hidden.numel() * 4
    overrides = ["model=tiny:gpt2", "cuts=[1,3]", "segments.bottom=frozen", "segments.top=full"]  # tied head, frozen bottom
    report = verify(load_config(None, overrides), batch=2, seq=8, padding=True)
    assert report.ok, report
