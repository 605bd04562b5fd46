"""Where parties compute: device names, their refusals, and what a run records about them.

On a machine with a GPU, ``auto`` puts the whole suite there, which is how the GPU path is exercised."""

import json

import pytest
import torch
from typer.testing import CliRunner

from splittune.cli import app
from splittune.config import ConfigError, load_config
from splittune.device import DeviceError, resolve_device, rng_state, set_rng_state
from splittune.run import train
from configs import tiny

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
TINY = tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=4", "train.batch_size=4")


def test_names_are_checked_by_the_config():
    assert load_config(None, []).train.device == "auto"
    with pytest.raises(ConfigError, match="unknown device 'gpu'; devices: auto, cpu, cuda, cuda:N, mps"):
        load_config(None, ["train.device=gpu"])
    assert load_config(None, ["train.device=cuda:3"]).train.device == "cuda:3"  # a well-formed name; its existence is checked where it runs


@no_cuda
def test_a_missing_gpu_is_refused_by_name():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{name}' is not available to this torch .*; available: cpu"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'cuda0'"):
        resolve_device("cuda0")


@no_cuda
def test_train_and_serve_refuse_a_missing_gpu_before_loading_anything(tmp_path):
    result = CliRunner().invoke(app, ["train", *sum((["--set", s] for s in [*TINY, "train.device=cuda"]), []), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "device 'cuda' is not available" in result.output
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(app, ["serve", "--model", "tiny:llama", "--device", "cuda:0"])
    assert result.exit_code == 2 and "device 'cuda:0' is not available" in " ".join(result.output.split())


def test_rng_state_round_trip():
    state = rng_state()
    first = torch.rand(4)
    torch.rand(100)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), first)


@no_cuda
def test_a_checkpoint_from_a_gpu_machine_names_what_is_missing():
    with pytest.raises(DeviceError, match="written with 2 CUDA device"):
        set_rng_state({**rng_state(), "cuda0": torch.zeros(8, dtype=torch.uint8), "cuda1": torch.zeros(8, dtype=torch.uint8)})


def test_explicit_cpu_equals_auto_here_and_the_summary_says_where(tmp_path):
    auto = train(load_config(None, TINY), tmp_path / "auto")
    cpu = train(load_config(None, [*TINY, "train.device=cpu"]), tmp_path / "cpu")
    assert cpu["device"] == cpu["server_device"] == "cpu"
    assert auto["device"] == str(resolve_device("auto"))
    if auto["device"] == "cpu":
        rows = [[json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("auto", "cpu")]
        assert rows[0] == rows[1]


def test_moving_a_party_keeps_the_weights_it_does_not_hold_unmaterialised():
    """``Tensor.to`` would allocate the embeddings and head a U-shape server never holds at full size on the new device."""
    from splittune.models.partition import is_placeholder, move_model
    from splittune.run import build

    _, server, _, _ = build(load_config(None, [*TINY, "train.device=cpu"]))
    model = server.party.model
    held = lambda: {n: t.untyped_storage().nbytes() for n, t in [*model.named_parameters(), *model.named_buffers()]}  # noqa: E731
    before = held()
    stubs = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if is_placeholder(t)}
    assert stubs and all(before[n] <= 4 for n in stubs)  # one element each
    move_model(model, torch.device("meta"))  # another device, without needing one
    after = held()
    assert all(t.device.type == "meta" for t in model.parameters())
    assert {n for n, t in [*model.named_parameters(), *model.named_buffers()] if is_placeholder(t)} == stubs
    assert after == before
    plain = torch.nn.Linear(300, 400)
    plain.weight = torch.nn.Parameter(torch.zeros(()).expand(400, 300), requires_grad=False)
    assert plain.to("meta").weight.untyped_storage().nbytes() == 400 * 300 * 4  # what move_model avoids
