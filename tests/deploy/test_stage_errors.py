"""A failure inside the model reaches the user as one line naming the architecture, the stage and the block
(issue 13); ``--debug`` adds the traceback; splittune's own errors pass unchanged."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import splittune.models.partition as partition
import splittune.parties.party as party_mod
from splittune.cli import app
from splittune.models.arch import ArchitectureError
from splittune.models.partition import AbsentBlock, plan_split
from splittune.models.stages import StageError, segment_failures, stage_errors, traceback_for
from splittune.models.zoo import ModelError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SHAPE = "The size of tensor a (16) must match the size of tensor b (64) at non-singleton dimension 3"
TRAIN = ["--set", "model=tiny:gpt2", "--set", "cuts=[1,3]", "--set", "train.steps=1", "--set", "train.seq_len=16",
         "--set", "data.max_documents=3", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=0"]


def break_block(monkeypatch, index: int, split: bool = True, error: Exception | None = None):
    """Block ``index`` raises ``error`` (a shape mismatch, as inside attention) in every party that loads it: the
    split's parties (``split``) or the unsplit reference."""
    real = party_mod.load_party_model

    def load(*args, **kwargs):
        model, weights = real(*args, **kwargs)
        spec = args[2] if len(args) > 2 else kwargs["spec"]
        blocks = model.get_submodule(spec.blocks_path)
        partial = any(isinstance(b, AbsentBlock) for b in blocks)
        if partial == split and not isinstance(blocks[index], AbsentBlock):
            def forward(*a, **k):
                raise error if error is not None else RuntimeError(f"{SHAPE}\nsecond line of the message")
            blocks[index].forward = forward
        return model, weights

    monkeypatch.setattr(party_mod, "load_party_model", load)


def run(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **(env or {})})
    return result.exit_code, result.output


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("cuts, index, split, stage", [
    ("1,3", 0, True, "the bottom forward (block 0, client) failed in block 0"),
    ("1,3", 2, True, "the trunk forward (blocks 1..2, server) failed in block 2"),  # in-process server: text relayed
    ("1,3", 3, True, "the top forward (block 3 and the head, client) failed in block 3"),
    ("2", 3, True, "the trunk forward (blocks 2..3 and the head, server) failed in block 3"),
    ("1,3", 1, False, "the unsplit model forward (blocks 0..3 and the head) failed in block 1"),
])
def test_a_failing_block_is_one_line_naming_architecture_and_stage(monkeypatch, cuts, index, split, stage):
    break_block(monkeypatch, index, split)
    code, out = run("verify", "--model", "tiny:llama", "--cuts", cuts)
    assert code == 2, out
    assert errors(out) == [f"error: llama (tiny:llama): {stage}: RuntimeError: {SHAPE}"], out
    assert "Traceback" not in out and "second line" not in out
    assert "(run `splittune --debug …` or set SPLITTUNE_DEBUG=1 for the traceback)" in out


def test_the_twin_verify_passes_without_the_failure_and_hints_nothing_for_plain_errors():
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 0 and "OK" in out and not errors(out), out
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "7")  # splittune's own refusal: no traceback to offer
    assert code == 2 and "it has 4 blocks" in out and "--debug" not in out, out


@pytest.mark.parametrize("how", [["--debug"], "env"])
def test_debug_prints_the_traceback_after_the_line(monkeypatch, how):
    break_block(monkeypatch, 2)  # the trunk: its traceback is on the server's side of the in-process link
    args = ["verify", "--model", "tiny:llama", "--cuts", "1,3"]
    code, out = run(*(how + args if how != "env" else args), env={"SPLITTUNE_DEBUG": "1"} if how == "env" else None)
    assert code == 2 and len(errors(out)) == 1, out
    after = out.split(errors(out)[0], 1)[1]
    assert "Traceback (most recent call last)" in after and "in forward" in after and "second line of the message" in after
    assert "modeling_llama.py" in after and "--debug" not in after  # transformers' frames: where it broke


def test_debug_for_an_error_raised_here_shows_the_chain(monkeypatch):
    break_block(monkeypatch, 0)  # the bottom: the StageError itself reaches the command, its cause chained
    code, out = run("--debug", "verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 2 and "The above exception was the direct cause of the following exception" in out, out
    assert "StageError: llama (tiny:llama): the bottom forward" in out


def test_loading_failures_name_loading_and_the_party(monkeypatch):
    def unreadable(*a, **k):
        raise RuntimeError("simulated read failure")

    monkeypatch.setattr(partition, "safe_open", unreadable)  # inside transformers/safetensors, not a ModelError
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 2 and errors(out) == ["error: llama (tiny:llama): loading the unsplit model failed: RuntimeError: simulated read failure"], out
    monkeypatch.undo()

    real = party_mod.load_party_model

    def server_fails(*args, pre, post, **kwargs):  # the U-shape's trunk holds neither embeddings nor head
        if not pre and not post:
            raise KeyError("model.layers.1.mlp.experts.0.w1.weight")
        return real(*args, pre=pre, post=post, **kwargs)

    monkeypatch.setattr(party_mod, "load_party_model", server_fails)
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 2, out
    assert errors(out) == ["error: llama (tiny:llama): loading the trunk (server) failed: KeyError: 'model.layers.1.mlp.experts.0.w1.weight'"]


def test_splittune_errors_inside_the_model_pass_unchanged(monkeypatch):
    break_block(monkeypatch, 0, error=ModelError("this model needs its tokenizer files"))
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 2 and errors(out) == ["error: this model needs its tokenizer files"] and "--debug" not in out, out
    for own in (ModelError("clear already"), KeyboardInterrupt()):
        with pytest.raises(type(own)) as caught, stage_errors("llama", "the bottom forward"):
            raise own
        assert caught.value is own
    with pytest.raises(StageError) as caught, stage_errors("llama", "the bottom forward"):
        raise IndexError("index 7 is out of bounds")
    assert isinstance(caught.value, ArchitectureError) and isinstance(caught.value.__cause__, IndexError)
    assert str(caught.value) == "llama: the bottom forward failed: IndexError: index 7 is out of bounds"


def test_backward_stages_for_the_lead_to_wrap():
    blocks = [object() for _ in range(4)]
    client = SimpleNamespace(arch="llama (tiny:llama)", role="client", plan=plan_split(4, [1, 3]), blocks=blocks)
    server = SimpleNamespace(**{**vars(client), "role": "server"})
    with pytest.raises(StageError) as caught, segment_failures(server, 1, 3, backward=True):
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace operation")
    assert str(caught.value).startswith("llama (tiny:llama): the trunk backward (blocks 1..2, server) failed: RuntimeError: one of")
    with pytest.raises(StageError) as caught, segment_failures(client, 0, 0, backward=True):
        raise RuntimeError("x")
    assert "the bottom backward (the embeddings, client)" in str(caught.value)
    with pytest.raises(StageError) as caught, segment_failures(client, 4, 4):
        raise RuntimeError("x")
    assert "the top forward (the final norm and head, client)" in str(caught.value)
    assert traceback_for(None, f"client 0: {caught.value}") is not None  # recorded: a relayed or prefixed text finds it
    assert traceback_for(None, "an unrelated error") is None


def test_train_with_a_failing_trunk_is_one_line(monkeypatch, tmp_path):
    break_block(monkeypatch, 2)
    code, out = run("train", *TRAIN, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in out, out
    assert errors(out) == [f"error: gpt2 (tiny:gpt2): the trunk forward (blocks 1..2, server) failed in block 2: RuntimeError: {SHAPE}"]
    monkeypatch.undo()  # the twin: the same run without the failure trains
    code, out = run("train", *TRAIN, "--out", tmp_path / "twin")
    assert code == 0 and not errors(out), out


def test_over_grpc_the_client_reads_the_architecture_and_stage(monkeypatch, tmp_path):
    from test_deploy_errors import _server

    break_block(monkeypatch, 2)  # only the server holds block 2
    server, port = _server(model="tiny:gpt2")
    try:
        code, out = run("train", *TRAIN, "--server", f"grpc://127.0.0.1:{port}", "--out", tmp_path / "run")
    finally:
        server.stop(None)
    assert code == 2 and "Traceback" not in out, out
    assert errors(out) == [f"error: gpt2 (tiny:gpt2): the trunk forward (blocks 1..2, server) failed in block 2: RuntimeError: {SHAPE}"]


def global_options_missing_from(readme: str) -> list[str]:
    import typer.main

    options = [o for p in typer.main.get_command(app).params for o in p.opts if o.startswith("--") and o != "--help"]
    return [o for o in options if not re.search(re.escape(o) + r"\b", readme)]


def test_readme_names_the_global_options():
    readme = (ROOT / "README.md").read_text()
    assert global_options_missing_from(readme) == []
    assert global_options_missing_from(readme.replace("--debug", "")) == ["--debug"]  # the twin: a lost option is named


class FailsBackward(torch.autograd.Function):
    """Identity forward; its backward raises, as a faulty op inside a block would."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated backward failure")


def break_backward(monkeypatch, index: int):
    real = party_mod.load_party_model

    def load(*args, **kwargs):
        model, weights = real(*args, **kwargs)
        spec = args[2] if len(args) > 2 else kwargs["spec"]
        blocks = model.get_submodule(spec.blocks_path)
        if any(isinstance(b, AbsentBlock) for b in blocks) and not isinstance(blocks[index], AbsentBlock):
            block, forward = blocks[index], blocks[index].forward

            def failing(*a, **k):
                out = forward(*a, **k)
                return (FailsBackward.apply(out[0]), *out[1:]) if isinstance(out, tuple) else FailsBackward.apply(out)
            block.forward = failing
        return model, weights

    monkeypatch.setattr(party_mod, "load_party_model", load)


@pytest.mark.parametrize("index, stage", [
    (0, "the bottom backward (block 0, client)"),
    (2, "the trunk backward (blocks 1..2, server)"),
    (3, "the top backward (block 3 and the head, client)"),
])
def test_a_failing_backward_names_its_stage(monkeypatch, index, stage):
    break_backward(monkeypatch, index)
    code, out = run("verify", "--model", "tiny:llama", "--cuts", "1,3")
    assert code == 2 and "Traceback" not in out, out
    assert errors(out) == [f"error: llama (tiny:llama): {stage} failed: RuntimeError: simulated backward failure"], out
