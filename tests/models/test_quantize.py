"""Contract 1 for quantized frozen weights: a split whose segments are quantized computes what the unsplit model
loaded by transformers with the same BitsAndBytesConfig computes, with the same peft LoRA (loss and every LoRA
gradient), for both shapes, with padding; the twin: a trunk quantized where the reference is not is caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from splittune.config import load_config  # noqa: E402
from splittune.models.adapters import apply_training, trainable  # noqa: E402
from splittune.models.arch import detect_arch  # noqa: E402
from splittune.models.partition import plan_split  # noqa: E402
from splittune.models.quantize import Quantization, is_quantized  # noqa: E402
from splittune.models.zoo import resolve_model  # noqa: E402
from splittune.run import build  # noqa: E402
from splittune.verify import _grads, _max_diff, make_batch  # noqa: E402

TOLERANCE = 1e-5  # float32 compute: the same packed weights, the same kernels; only summation order may differ


def unsplit(model: str, cfg, q: Quantization | None, head: bool = False):
    """The reference: transformers loads the whole model (quantized by its own BitsAndBytesConfig when ``q``), and
    the run's LoRA goes on it the way a party puts it on (peft, the same per-module initialisation)."""
    source = resolve_model(model)
    extra = {"quantization_config": q.transformers_config(head), "device_map": "cpu"} if q is not None else {}
    ref = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32, **extra).train()  # a training step
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    spec = detect_arch(ref.config)
    plan = plan_split(spec.n_blocks, cfg.cuts, "centralized")
    modes = [(s, "lora") for s in plan.party_segments("client")]
    return apply_training(ref, spec, modes, cfg.lora, cfg.seed)


def step(model: str, cuts: list[int], quantize: str, reference: Quantization | None, batch: int = 3, seq: int = 10,
         head: bool = False):
    cfg = load_config(None, [f"model={model}", f"cuts={cuts}", f"quantize={quantize}", "lora.target_modules=all-linear"])
    client, server, link, source = build(cfg)
    try:
        data = make_batch(source.config().get_text_config().vocab_size, batch, seq, True, 0)
        loss_split, _ = client.backward(1, [data])
        split = _grads(client.party, server.party)
        quantized = [m for m in server.party.model.modules() if is_quantized(m)]
    finally:
        link.close()
        server.close()
    ref = unsplit(model, cfg, reference, head)
    out = ref(**data)
    out.loss.backward()
    grads = {name: p.grad for name, p in trainable(ref)}
    assert set(grads) == set(split) and grads
    return abs(float(out.loss) - loss_split), _max_diff(grads, split)[0], quantized


@pytest.mark.parametrize("cuts", [[2], [1, 3]], ids=["two-part", "u-shape"])
@pytest.mark.parametrize("model", ["tiny:llama", "tiny:qwen2", "tiny:gpt2", "tiny:mistral", "tiny:mixtral"])
def test_nf4_split_equals_nf4_unsplit_loaded_by_transformers(model, cuts):
    loss_diff, grad_diff, quantized = step(model, cuts, "nf4", Quantization("nf4"))
    assert quantized, "the server's blocks hold no quantized layer"
    assert loss_diff <= TOLERANCE and grad_diff <= TOLERANCE, (loss_diff, grad_diff)


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_fp4_and_int8_are_exact_too(kind):
    loss_diff, grad_diff, _ = step("tiny:llama", [1, 3], kind, Quantization(kind))
    assert loss_diff <= TOLERANCE and grad_diff <= TOLERANCE, (loss_diff, grad_diff)


@pytest.mark.parametrize("cuts", [[2], [1, 3]], ids=["two-part", "u-shape"])
def test_the_head_quantized_too_equals_transformers_with_no_module_skipped(cuts, monkeypatch):
    """The packed head is computed a slice of the vocabulary at a time (here 50 rows: slices of every size, the last
    one short), forward and backward, and still equals bitsandbytes' whole-weight products."""
    from splittune.models import packed_head

    monkeypatch.setattr(packed_head, "ROWS", 50)
    loss_diff, grad_diff, _ = step("tiny:llama", cuts, "{bottom: nf4, trunk: nf4, top: nf4, head: nf4}", Quantization("nf4"),
                                   head=True)
    assert loss_diff <= TOLERANCE and grad_diff <= TOLERANCE, (loss_diff, grad_diff)
    loss_diff, grad_diff, _ = step("tiny:llama", cuts, "nf4", Quantization("nf4"), head=True)
    assert max(loss_diff, grad_diff) > 1e-4  # the twin: a full-precision head is not the quantized one


def test_a_head_tied_to_the_embeddings_cannot_be_quantized():
    from splittune.models.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="quantize.head: the head of gpt2 is its embedding matrix \\(tied\\)"):
        build(load_config(None, ["model=tiny:gpt2", "cuts=[1,3]", "quantize.head=nf4"]))


def test_a_quantized_trunk_against_a_full_precision_reference_is_caught():
    """The twin: the comparison above can fail. A run that quantizes the trunk only (the typical deployment) is
    not the full-precision model, and not the all-nf4 one either."""
    loss_diff, grad_diff, quantized = step("tiny:llama", [1, 3], "{trunk: nf4}", None)
    assert quantized and max(loss_diff, grad_diff) > 1e-3
    loss_diff, grad_diff, _ = step("tiny:llama", [1, 3], "{trunk: nf4}", Quantization("nf4"))
    assert max(loss_diff, grad_diff) > 1e-3


def test_an_evaluation_between_training_steps_changes_no_quantized_weight():
    """bitsandbytes' CPU eval path repacks 4-bit weights, and repacks them back for training lossily: a party's
    evaluation must compute as training does and leave the weights as they were."""
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]", "quantize=nf4"])
    client, server, link, source = build(cfg)
    try:
        data = make_batch(source.config().get_text_config().vocab_size, 2, 8, True, 0)
        before = {k: v.clone() for k, v in client.party.model.state_dict().items()}
        client.party.model.eval()  # the client's bottom and top in eval mode, as an evaluation puts a model
        eval_loss, _, _ = client.eval_batch(data)
        client.party.model.train()
        train_loss, _ = client.backward(1, [data])
        after = client.party.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert abs(eval_loss / int((data["labels"][:, 1:] != -100).sum()) - train_loss) <= TOLERANCE
    finally:
        link.close()
        server.close()


def test_a_server_started_quantized_serves_the_same_run_over_grpc(tmp_path):
    """``serve --quantize nf4``: a client proposing quantize.trunk: nf4 trains as the in-process run does (losses and
    adapters bit for bit); one proposing another trunk is refused with what to set."""
    from safetensors.torch import load_file

    from configs import tiny
    from served import serve_here
    from splittune.channels import RemoteError
    from splittune.channels.grpc import GrpcChannel
    from splittune.deploy.service import SplitService
    from splittune.parties import Server
    from splittune.run import train, train_remote
    from splittune.schedules.policy import POLICIES

    run = tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=6", "train.warmup_steps=0", "quantize.trunk=nf4")
    source = resolve_model("tiny:llama")
    service = SplitService(Server(source, detect_arch(source.config()), wait_s=30, policies=POLICIES, quantize="nf4"), None)
    server, port = serve_here(service)
    channel = lambda i: GrpcChannel(f"grpc://127.0.0.1:{port}")  # noqa: E731
    try:
        remote = train_remote(load_config(None, run), tmp_path / "remote", 0, channel)
        with pytest.raises(RemoteError, match=r"quantized nf4 \(serve --quantize nf4\); the client proposed quantize.trunk: none; "
                                              r"set quantize.trunk: nf4"):
            train_remote(load_config(None, [*run, "quantize.trunk=none"]), tmp_path / "plain", 0, channel)
    finally:
        server.stop(None)
    local = train(load_config(None, run), tmp_path / "local")
    assert remote["train_loss_last"] == local["train_loss_last"] and remote["server_bytes"] == local["server_bytes"]
    a, b = load_file(tmp_path / "remote/adapters/server.safetensors"), load_file(tmp_path / "local/adapters/server.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_quantize_settings_get_one_clear_error(monkeypatch):
    from splittune.models.quantize import QuantizeError, check

    with pytest.raises(QuantizeError, match=r"quantize: nf4 runs on cpu, cuda, xpu \(bitsandbytes\); this party computes on mps"):
        check("nf4", torch.device("mps"))
    with pytest.raises(QuantizeError, match="unknown kind 'int4'; kinds: none, nf4, fp4, int8"):
        check("int4", torch.device("cpu"))
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(QuantizeError, match=r"need the bitsandbytes package, which is not installed: pip install 'splittune\[quantize\]'"):
        check("nf4", torch.device("cpu"))
    check("none", torch.device("mps"))  # nothing to quantize: nothing needed
    with pytest.raises(Exception, match=r"LoRA ranks \[4, 8\] are averaged exactly by adding the update into the frozen base"):
        load_config(None, ["clients=2", "quantize=nf4", "client_overrides={1: {lora: {rank: 4}}}"])


def test_export_loads_on_a_full_precision_and_an_nf4_base_and_split_generation_equals_the_nf4_one(tmp_path):
    """The exported adapter is the standard one: PeftModel.from_pretrained on a full-precision base and on an NF4 base
    loaded by transformers both generate; greedy generation through the quantized split equals the NF4 one."""
    from peft import PeftModel

    from splittune.export import export_run
    from splittune.generation import load_split
    from splittune.run import train

    out = tmp_path / "run"
    train(load_config(None, ["model=tiny:llama", "cuts=[1,3]", "quantize=nf4", "train.steps=3", "train.batch_size=2",
                             "train.seq_len=32", "train.lr=0.01", "train.warmup_steps=0", "train.eval_batches=1",
                             "data.max_documents=6", "lora.rank=4"]), out)
    export_run(out, out / "export")
    path = str(resolve_model("tiny:llama").path)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with load_split(out) as split:
        got = split.generate(ids, mask, **greedy)
    nf4 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                               quantization_config=Quantization("nf4").transformers_config())
    for m in nf4.modules():  # the kernel a party uses in evaluation too (bitsandbytes' CPU eval path computes otherwise)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(nf4, str(out / "export")).eval().generate(input_ids=ids, attention_mask=mask, **greedy)
        plain = PeftModel.from_pretrained(full, str(out / "export")).eval().generate(input_ids=ids, attention_mask=mask, **greedy)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, want.scores)) < 1e-4
    assert plain.sequences.shape == want.sequences.shape  # the same adapter on a full-precision base generates too
    assert max((a - b).abs().max().item() for a, b in zip(plain.scores, want.scores)) > 1e-3  # the twin: nf4 is not fp32


@pytest.mark.parametrize("kind,double", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_chunked_packing_equals_bitsandbytes_own_bit_for_bit(monkeypatch, tmp_path, kind, double):
    """A layer is packed a chunk at a time from the checkpoint's dtype (no full-precision copy of it): the bytes,
    scales and nested scales are bitsandbytes' own for the whole weight."""
    import bitsandbytes as bnb

    from splittune.models import quantize as quantize_mod

    monkeypatch.setattr(quantize_mod, "CHUNK", 256)  # many chunks, and a last one that is short
    weight = torch.randn(48, 70, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = Quantization(kind, double_quant=double)
    mine = quantize_mod.pack_4bit(weight, q, torch.float32, bnb)
    theirs = bnb.nn.Params4bit(weight.float(), requires_grad=False, quant_type=kind, compress_statistics=double).to("cpu")
    assert torch.equal(mine.data, theirs.data)
    a, b = mine.quant_state, theirs.quant_state
    assert torch.equal(a.absmax, b.absmax) and a.shape == b.shape and a.dtype == b.dtype == torch.float32
    if double:
        assert torch.equal(a.offset, b.offset) and torch.equal(a.state2.absmax, b.state2.absmax)
    x = torch.randn(3, 70)
    assert torch.equal(bnb.matmul_4bit(x, mine.t(), quant_state=a), bnb.matmul_4bit(x, theirs.t(), quant_state=b))
    # read from the checkpoint a chunk at a time (a loading party's path): the same bytes again
    from safetensors.torch import save_file

    from splittune.models.plain_read import PlainReader

    save_file({"w": weight}, str(tmp_path / "w.safetensors"))
    reader = PlainReader(tmp_path / "w.safetensors")
    lazy = quantize_mod.pack_4bit(reader.lazy("w"), q, torch.float32, bnb)
    reader.close()
    assert torch.equal(lazy.data, mine.data) and torch.equal(lazy.quant_state.absmax, a.absmax)
    monkeypatch.setattr(quantize_mod, "CHUNK", 100)  # the twin: chunks that cut blocks of 64 give other scales
    other = quantize_mod.pack_4bit(weight, q, torch.float32, bnb).quant_state.absmax
    assert other.shape != a.absmax.shape or not torch.equal(other, a.absmax)


def test_a_block_with_no_layer_to_pack_is_refused_not_left_at_full_precision(monkeypatch):
    from splittune.channels import RemoteError
    from splittune.models import partition, quantize

    monkeypatch.setattr(partition, "quantizable", lambda module: False)  # as a block of layers bitsandbytes cannot pack
    monkeypatch.setattr(quantize, "quantizable", lambda module: False)
    with pytest.raises(RemoteError, match=r"quantize: nf4 packs linear layers \(nn.Linear, Conv1D\), and block 1 of llama holds "
                                            r"none \(its weights are in .*Linear.*\); use quantize: none there"):
        build(load_config(None, ["model=tiny:llama", "cuts=[1,3]", "quantize.trunk=nf4"]))  # the server refuses the hello


def test_a_truncated_shard_read_by_a_quantizing_party_names_the_file(tmp_path):
    """A quantizing party reads its blocks without mapping the shard: a cut-short file is still one clear error
    naming it (whichever reader meets it first)."""
    import shutil

    from splittune.models.zoo import ModelError

    folder = tmp_path / "model"
    shutil.copytree(resolve_model("tiny:llama").path, folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors is corrupt or truncated \(.*\); download or save the model again"):
        build(load_config(None, [f"model={folder}", "cuts=[1,3]", "mode=centralized", "quantize=nf4"]))


def test_the_plain_reader_refuses_a_cut_short_tensor_and_a_file_that_is_not_safetensors(tmp_path):
    from safetensors.torch import save_file

    from splittune.models.plain_read import PlainReader

    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "a.safetensors"))
    whole = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-8])
    assert torch.equal(PlainReader(tmp_path / "a.safetensors").get_tensor("w"), torch.ones(4, 4))  # the twin: whole reads
    with pytest.raises(ValueError, match="tensor 'w' is cut short"):
        PlainReader(tmp_path / "cut.safetensors").get_tensor("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        PlainReader(tmp_path / "junk.safetensors")
