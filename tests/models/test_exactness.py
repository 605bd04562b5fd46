"""Contract 1: split training equals unsplit training, for every tested architecture and both shapes."""

import pytest

from splittune.config import load_config
from splittune.models.catalog import TESTED_ARCHITECTURES
from splittune.verify import verify

REQUIRED = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt_neox"]


def test_catalog_covers_required_architectures():
    assert set(REQUIRED) <= set(TESTED_ARCHITECTURES)


@pytest.mark.parametrize("cuts", [[2], [1, 3], [1, 4]], ids=["two-part", "u-shape", "u-shape-head-only-top"])
@pytest.mark.parametrize("arch", TESTED_ARCHITECTURES)
def test_split_equals_unsplit_with_padding(arch, cuts):
    cfg = load_config(None, [f"model=tiny:{arch}", f"cuts={cuts}", "lora.target_modules=all-linear"])
    report = verify(cfg, batch=4, seq=12, padding=True)
    assert not report.problems
    assert report.tensors > 0
    assert report.loss_diff <= 1e-5, report
    assert report.max_grad_diff <= 1e-5, report
    assert report.max_update_diff <= 1e-5, report
    assert report.bytes_up > 0 and report.bytes_down > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["cuts=[0]"],  # the client keeps only the embeddings
        ["cuts=[0,3]"],
        ["cuts=[1,3]", "segments.trunk=frozen"],
        ["cuts=[1,3]", "segments.bottom=full", "segments.top=full"],  # tied embeddings trained on the client
        ["cuts=[2]", "segments.bottom=frozen", "lora.rank=4"],
        ["cuts=[1,3]", "train.max_grad_norm=1e-4"],  # clipping active: the global norm must be exact
        ["cuts=[1,4]", "segments.bottom=full", "segments.top=full"],  # a top of norm and head only, trained with the tied embedding
        ["cuts=[0,4]", "train.micro_batches=2", "train.max_in_flight=2"],  # the thinnest parts on both ends, pipelined
    ],
    ids=lambda o: " ".join(o),
)
def test_split_variants_are_exact(overrides):
    report = verify(load_config(None, ["model=tiny:gpt2", *overrides]), batch=4, seq=12, padding=True)
    assert report.ok, report


def test_verify_detects_a_wrong_split(monkeypatch):
    """A verify that cannot fail proves nothing: perturb the server's activations and it must fail."""
    from splittune.parties import server as server_mod

    original = server_mod.Server._activations

    def perturbed(self, member, msg, meta):
        reply = original(self, member, msg, meta)
        if "hidden" in reply.tensors:
            reply.tensors["hidden"] = reply.tensors["hidden"] * 1.001
        return reply

    monkeypatch.setattr(server_mod.Server, "_activations", perturbed)
    report = verify(load_config(None, ["model=tiny:llama", "cuts=[1,3]"]), batch=2, seq=8, padding=True)
    assert not report.ok
    assert report.max_grad_diff > 1e-5


def test_a_fully_trained_top_trains_its_tied_head():
    """verify compares like with like, so a tied head left frozen on both sides passed it: check it trains."""
    from splittune.run import build

    client, server, link, _ = build(load_config(None, ["model=tiny:gpt2", "cuts=[1,3]", "segments.bottom=frozen", "segments.top=full"]))
    try:
        head = client.party.model.get_output_embeddings().weight
        assert head.requires_grad and any(p is head for p in client.party.params)
        assert client.party.trains(client.plan.segment("bottom"))  # the shared weight: the bottom keeps its graph
    finally:
        link.close()
        server.close()


@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_a_long_run_of_absent_blocks_hands_on_the_right_shape(arch):
    """Falcon's loop takes ``outputs[0]`` of each block: stubs returning the bare tensor lost one dimension per
    block, so any top starting past block 3 failed (a real Falcon split [2, 30] crashed); stubs now return what
    the block returns (``ArchSpec.block_tuple``), traced once on the meta device."""
    cfg = load_config(None, [f"model=tiny:{arch},layers=8", "cuts=[6,7]"])
    assert verify(cfg, batch=2, seq=8, padding=True).ok
