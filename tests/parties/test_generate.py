"""Split generation (issue 14): greedy tokens through the split equal transformers' generate on the unsplit model
with the exported adapter; one position per token crosses after the prompt; sessions are isolated, bounded and
freed; streaming, gRPC and the command line; every bad input gets its status or error line."""

import json
import threading
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from splittune.channels import LocalChannel, RemoteError
from splittune.channels.grpc import GrpcChannel
from splittune.config import load_config
from splittune.cut import ServerLink
from splittune.deploy.service import SplitService, health
from splittune.export import export_run
from splittune.generation import GenerationError, SplitModel, load_split
from splittune.models.arch import detect_arch
from splittune.models.catalog import FAMILIES, TESTED_ARCHITECTURES
from splittune.models.zoo import resolve_model
from splittune.models.arch import generation_refusal
from splittune.parties.client import generator as generator_module
from splittune.parties.server import inference as inference_module
from splittune.parties.server.inference import InferenceLimits
from splittune.parties.server.handler import Server
from splittune.taps.recording import Recording
from splittune.taps.tap import Tap
from splittune.run import train
from splittune.schedules.policy import POLICIES
from splittune.wire import Message

from served import serve_here

TRAIN = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_every=0", "train.eval_batches=1",
         "data.max_documents=6", "lora.rank=4", "train.lr=0.01", "train.warmup_steps=0"]
OWN_CACHE = {"rwkv", "xlstm", "minimax"}  # models that build a generation state object of their own
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def prompts(seed=0, rows=2, length=7):
    """Byte-token prompts, the first row left-padded by three positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def unsplit(model, adapter=None):
    m = AutoModelForCausalLM.from_pretrained(str(resolve_model(model).path)).eval()
    return PeftModel.from_pretrained(m, str(adapter)).eval() if adapter is not None else m


def max_score_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Finished runs, trained and exported once per (model, cuts)."""
    runs = {}

    def get(model, cuts):
        if (model, cuts) not in runs:
            out = tmp_path_factory.mktemp("gen") / "run"
            train(load_config(None, [f"model={model}", f"cuts={cuts}", *TRAIN]), out)
            export_run(out, out / "export")
            runs[model, cuts] = out
        return runs[model, cuts]

    return get


# -- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,cuts", [("tiny:llama", "[1,3]"), ("tiny:gpt2", "[2]")])
def test_greedy_split_generation_equals_unsplit_generate_with_the_exported_adapter(trained, model, cuts):
    run = trained(model, cuts)
    ids, mask = prompts()
    with load_split(run) as split:
        got = split.generate(ids, mask, **GREEDY)
    with torch.no_grad():
        want = unsplit(model, run / "export").generate(input_ids=ids, attention_mask=mask, **GREEDY)
        base = unsplit(model).generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert max_score_diff(got, want) < 1e-5
    assert max_score_diff(base, want) > 1e-2  # the twin: the trained adapter changes the scores, so the check can fail


@pytest.mark.parametrize("cuts", ["[1,3]", "[2]"])
@pytest.mark.parametrize("arch", TESTED_ARCHITECTURES)
def test_split_generation_is_exact_for_every_tested_architecture(arch, cuts):
    """Each family in both shapes, a left-padded batch, the base model split (the cache classes are the family's own);
    the families whose model keeps its own generation state object are refused with why."""
    ids, mask = prompts()
    cfg = load_config(None, [f"model=tiny:{arch}", f"cuts={cuts}"])
    if arch in OWN_CACHE:
        with pytest.raises(GenerationError, match=f"split generation does not support {arch}: .* cache object of its own"):
            SplitModel(cfg, None)
        return
    with SplitModel(cfg, None) as split:
        got = split.generate(ids, mask, **GREEDY)
    with torch.no_grad():
        want = unsplit(f"tiny:{arch}").generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert max_score_diff(got, want) < 1e-5


def test_the_own_cache_refusal_is_transformers_own_and_the_server_makes_it_too(monkeypatch):
    """The refused families are the exact ones transformers cannot start from a DynamicCache; the twins: without the
    refusal xLSTM fails inside the server's trunk, and a client that skips the check is refused by the server."""
    assert {a for a in TESTED_ARCHITECTURES if generation_refusal(resolve_model(f"tiny:{a}").config())} == OWN_CACHE
    assert generation_refusal(resolve_model("tiny:mamba").config()) is None
    assert {f.model_type for f in FAMILIES if "split generation refused" in f.why} == OWN_CACHE  # splittune models says so  # Mamba's state is a per-layer Cache layer
    cfg = load_config(None, ["model=tiny:xlstm", "cuts=[1,3]"])
    monkeypatch.setattr(generator_module, "generation_refusal", lambda config: None)
    with pytest.raises(RemoteError, match="split generation does not support xlstm") as refused:
        SplitModel(cfg, None)
    assert refused.value.code == "UNIMPLEMENTED"
    monkeypatch.setattr(inference_module, "generation_refusal", lambda config: None)
    with SplitModel(cfg, None) as split, pytest.raises(RemoteError, match="rnn_state"):
        split.generate(*prompts(), **GREEDY)


def test_a_server_that_skips_its_adapter_is_caught(trained):
    """The twin of exactness on the server's side: the base trunk under the trained client differs."""
    run = trained("tiny:llama", "[1,3]")
    ids, mask = prompts()
    with load_split(run) as split:
        got = split.generate(ids, mask, **GREEDY)
    with load_split(run) as split:
        split.server.inference.sessions[split.link.session].model.party.model.disable_adapter_layers()
        skipped = split.generate(ids, mask, **GREEDY)
    assert max_score_diff(got, skipped) > 1e-3


# -- what crosses --------------------------------------------------------------------------------------------------
class Seen:
    """What the server's end of the link sees (after its receiving chain) and sends, with each frame's size."""

    def __init__(self):
        self.rows = []

    def __call__(self, direction, msg, nbytes):
        if msg.kind == "generate":
            self.rows.append((direction, msg, nbytes))

    def attach(self, server, link):
        link.add_tap(self)
        return link.serve

    def of(self, direction):
        return [(m, n) for d, m, n in self.rows if d == direction]


def test_one_position_per_token_crosses_after_the_prompt_each_way():
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    seen = Seen()
    with SplitModel(cfg, None, serve_through=seen.attach) as split:
        ids, mask = prompts(length=9)
        split.generate(ids, mask, **GREEDY)
        crossed, width = split.generator.crossings, split.party.session and 64
        bytes_up, bytes_down = split.link.bytes_up, split.link.bytes_down
    up, down = seen.of("up"), seen.of("down")
    assert crossed.positions == [9, 1, 1, 1, 1, 1]  # the 6th token needs no forward
    assert [m.tensors["hidden"].shape[1] for m, _ in up] == crossed.positions
    assert [m.meta["start"] for m, _ in up] == [0, 9, 10, 11, 12, 13]
    assert [tuple(m.tensors["hidden"].shape) for m, _ in down] == [(2, 9, width)] + [(2, 1, width)] * 5
    assert [tuple(m.tensors["attention_mask"].shape) for m, _ in up] == [(2, 9)] + [(2, 1)] * 5  # new columns only
    sizes = [n for _, n in up[1:]]
    assert max(sizes) - min(sizes) <= 2  # a token costs the same at any length (only the start field's digits grow)
    # bytes per token per direction: the hidden state of one position per row (fp32), plus a small header
    # (and one mask column per row up)
    for (m, n), (r, k) in zip(up[1:], down[1:]):
        assert m.tensors["hidden"].numel() * 4 == 2 * width * 4
        assert 2 * width * 4 < n < 2 * width * 4 + m.tensors["attention_mask"].numel() * 8 + 1024
        assert 2 * width * 4 < k < 2 * width * 4 + 1024
    assert crossed.up == [n for _, n in up] and crossed.down == [n for _, n in down]  # each message's own frame
    assert bytes_up > crossed.bytes_up and bytes_down > crossed.bytes_down  # the hello (with the server's adapter) and the close come on top


def test_int8_on_the_wire_shrinks_what_each_token_sends():
    sizes = {}
    for codec in ("raw", "int8"):
        seen = Seen()
        cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]", f"codec.up={codec}", f"codec.down={codec}"])
        with SplitModel(cfg, None, serve_through=seen.attach) as split:
            out = split.generate(*prompts(), **GREEDY)
        sizes[codec] = ([n for _, n in seen.of("up")][1:], [n for _, n in seen.of("down")][1:], out.sequences.shape)
    raw_up, raw_down, shape = sizes["raw"]
    int8_up, int8_down, shape8 = sizes["int8"]
    assert shape == shape8
    hidden = 2 * 64 * 4  # one position, two rows, fp32
    assert all(r - q >= hidden * 0.6 for r, q in zip(raw_up, int8_up))
    assert all(r - q >= hidden * 0.6 for r, q in zip(raw_down, int8_down))


# -- sampling and streaming ------------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible():
    cfg = load_config(None, ["model=tiny:llama", "cuts=[2]"])
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, pad_token_id=0)
    with SplitModel(cfg, None) as split:
        a = split.generate(*prompts(), seed=5, **kw)
        state = torch.random.get_rng_state()
        b = split.generate(*prompts(), seed=5, **kw)
        c = split.generate(*prompts(), seed=6, **kw)
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the twin: another seed samples otherwise


def test_generation_stops_at_the_end_of_sequence_token_and_at_stop_strings():
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    ids = torch.tensor([[40, 50, 60]])  # the tiny model's greedy answer: '<' (30), then 192, 108, 192, ...
    with SplitModel(cfg, None) as split:
        free = split.generate(ids, max_new_tokens=6, do_sample=False)[0, 3:].tolist()
        ended = split.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=free[1])[0, 3:].tolist()
        stopped = split.generate(ids, max_new_tokens=6, do_sample=False, stop_strings=["<"])[0, 3:].tolist()
        assert split.tokenizer.decode(free[:1]) == "<"
    assert len(free) == 6 and free[1] not in free[:1]  # the twin: without them the run goes on
    assert ended[:2] == free[:2] and set(ended[2:]) <= {0}  # ended, then padded
    assert stopped[:1] == free[:1] and set(stopped[1:]) <= {0}


class Collect(BaseStreamer):
    def __init__(self):
        self.values = []
        self.ended = False

    def put(self, value):
        self.values.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_a_streamer_gets_the_prompt_then_each_token_as_it_comes():
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    ids = torch.tensor([[5, 6, 7, 8]])
    streamer = Collect()
    with SplitModel(cfg, None) as split:
        out = split.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, streamer=streamer)
    assert streamer.values[0] == [5, 6, 7, 8] and streamer.ended
    assert [v for vs in streamer.values[1:] for v in vs] == out[0, 4:].tolist()


# -- sessions: isolation, bounds, cleanup ------------------------------------------------------------------------
def shared_server(limits=None, model="tiny:llama"):
    source = resolve_model(model)
    config = source.config()
    server = Server(source, detect_arch(config), config, policies=POLICIES, inference=limits)
    return server, ServerLink(server.handle)


def test_concurrent_sessions_are_isolated_and_freed_on_close(trained):
    run = trained("tiny:llama", "[1,3]")
    server, link = shared_server()
    ids_a, mask_a = prompts(1)
    ids_b, mask_b = prompts(2, length=5)
    want_a = unsplit("tiny:llama", run / "export").generate(input_ids=ids_a, attention_mask=mask_a, **GREEDY).sequences
    want_b = unsplit("tiny:llama").generate(input_ids=ids_b, attention_mask=mask_b, **GREEDY).sequences
    a = load_split(run, channel=LocalChannel(link.serve))
    b = SplitModel(load_config(None, ["model=tiny:llama", "cuts=[1,3]"]), None, channel=LocalChannel(link.serve))
    assert len(server.inference.sessions) == 2 and len(server.inference.models) == 2  # two adapters, two segments
    got = {}

    def go(name, split, ids, mask):
        for _ in range(3):  # three sequences each, interleaved token by token with the other session
            got[name] = split.generate(ids, mask, **GREEDY).sequences

    threads = [threading.Thread(target=go, args=("a", a, ids_a, mask_a)), threading.Thread(target=go, args=("b", b, ids_b, mask_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(got["a"], want_a) and torch.equal(got["b"], want_b)
    a.close()
    assert len(server.inference.sessions) == 1 and len(server.inference.models) == 1
    b.close()
    assert not server.inference.sessions and not server.inference.models and not link.chains
    server.close()


def test_sessions_with_one_adapter_share_one_segment():
    server, link = shared_server()
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    splits = [SplitModel(cfg, None, channel=LocalChannel(link.serve)) for _ in range(2)]
    assert len(server.inference.sessions) == 2 and len(server.inference.models) == 1
    for s in splits:
        s.close()
    assert not server.inference.models
    server.close()


def ask(channel, msg):
    """The server's reply, a refusal as an ``error`` message (``Channel.call`` raises it)."""
    try:
        return channel.call(msg)
    except RemoteError as err:
        return Message("error", msg.session, meta={"reason": str(err), "code": err.code})


def raw_session(link, cfg_sets=("model=tiny:llama", "cuts=[1,3]"), tensors=None):
    """An inference hello by hand; the channel and its session id."""
    from splittune.parties import SessionSpec

    cfg = load_config(None, list(cfg_sets))
    source = resolve_model(cfg.model)
    spec = SessionSpec.from_run(cfg, source.fingerprint(), "llama")
    channel = LocalChannel(link.serve)
    sid = f"s{time.monotonic_ns()}"
    reply = ask(channel, Message("hello", sid, tensors=tensors or {}, meta={**spec.to_meta(), "inference": True}))
    return channel, sid, reply


def step(channel, sid, start, new, rows=1, width=64, columns=None):
    columns = new if columns is None else columns
    return ask(channel, Message("generate", sid, tensors={"hidden": torch.randn(rows, new, width),
                                                           "attention_mask": torch.ones(rows, columns, dtype=torch.long)},
                                meta={"start": start}))


def test_bad_inference_messages_get_a_status_and_the_server_keeps_serving():
    server, link = shared_server()
    channel, sid, reply = raw_session(link)
    assert reply.kind == "hello" and reply.meta["inference"] is True
    assert step(channel, sid, 0, 4).tensors["hidden"].shape == (1, 4, 64)
    bad = step(channel, sid, 2, 1)  # the cache holds 4 positions
    assert bad.kind == "error" and bad.meta["code"] == "FAILED_PRECONDITION"
    assert "cache position out of order: this session's cache holds 4 positions, the message starts at 2" in bad.meta["reason"]
    bad = step(channel, sid, 4, 1, columns=5)  # the whole mask: the session holds the first 4 columns already
    assert bad.kind == "error" and "attention_mask must be int64 of shape [1, 1] (the new positions' columns)" in bad.meta["reason"]
    bad = step(channel, sid, 4, 1, rows=2)
    assert bad.kind == "error" and "the sequence has 1 rows" in bad.meta["reason"]
    nan = ask(channel, Message("generate", sid, tensors={"hidden": torch.full((1, 1, 64), float("nan")),
                                                          "attention_mask": torch.ones(1, 1, dtype=torch.long)}, meta={"start": 4}))
    assert nan.kind == "error" and "NaN" in nan.meta["reason"]
    two = ask(channel, Message("generate", sid, tensors={"hidden": torch.randn(1, 1, 64), "attention_mask": torch.ones(1, 1, dtype=torch.long)},
                               meta={"start": 4, "keep": 1}))
    assert two.kind == "error" and "does not end the model" in two.meta["reason"]
    extra = ask(channel, Message("generate", sid, meta={"start": 4, "speed": 2}))
    assert extra.kind == "error" and "unknown meta field 'speed'" in extra.meta["reason"]
    assert step(channel, sid, 4, 1).kind == "generate"  # the session still works, at the position it held
    maskless = ask(channel, Message("generate", sid, tensors={"hidden": torch.randn(1, 3, 64)}, meta={"start": 0}))
    assert maskless.kind == "generate"  # a forward without a mask (Mamba's) is served without one
    late = step(channel, sid, 3, 1)
    assert late.kind == "error" and "earlier positions came without one" in late.meta["reason"]
    ghost = step(channel, "nobody", 0, 1)
    assert ghost.kind == "error" and ghost.meta["code"] == "NOT_FOUND" and "unknown inference session 'nobody'" in ghost.meta["reason"]
    wrong = ask(channel, Message("activations", sid, tensors={}))
    assert wrong.kind == "error" and "an inference session does not serve 'activations'" in wrong.meta["reason"]
    unfit = raw_session(link, tensors={"model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)})[2]
    assert unfit.kind == "error" and "does not fit the run's server part" in unfit.meta["reason"] and "unexpected" in unfit.meta["reason"]
    closed = ask(channel, Message("close", sid))
    assert closed.kind == "close" and not server.inference.sessions
    again = step(channel, sid, 0, 1)
    assert again.kind == "error" and again.meta["code"] == "NOT_FOUND"
    server.close()


def test_session_and_memory_bounds_refuse_with_resource_exhausted():
    server, link = shared_server(InferenceLimits(max_sessions=1, max_bytes=20_000))
    channel, sid, _ = raw_session(link)
    full = raw_session(link)[2]
    assert full.kind == "error" and full.meta["code"] == "RESOURCE_EXHAUSTED" and "maximum of 1 inference sessions" in full.meta["reason"]
    assert step(channel, sid, 0, 4).kind == "generate"  # 4 positions: 2 layers x k,v x 4 heads... well under the cap
    held = server.inference.bytes
    assert held > 0
    per = held / 4
    far = int(20_000 / per) + 1
    over = step(channel, sid, 4, far)
    assert over.kind == "error" and over.meta["code"] == "RESOURCE_EXHAUSTED" and "cap of 20000 bytes" in over.meta["reason"]
    assert server.inference.bytes == held and step(channel, sid, 4, 1).kind == "generate"  # refused before computing
    server.close()


def test_idle_sessions_time_out_and_are_freed():
    server, link = shared_server(InferenceLimits(timeout_s=0.05))
    channel, sid, _ = raw_session(link)
    assert step(channel, sid, 0, 2).kind == "generate"
    for _ in range(100):  # freed by the server's own sweep, with no message arriving
        if not server.inference.sessions:
            break
        time.sleep(0.02)
    assert not server.inference.sessions
    gone = step(channel, sid, 2, 1)
    assert gone.kind == "error" and gone.meta["code"] == "NOT_FOUND" and not server.inference.models
    server.close()


def test_an_inference_hello_does_not_touch_the_training_run():
    from splittune.parties import SessionSpec

    server, link = shared_server()
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    spec = SessionSpec.from_run(cfg, resolve_model(cfg.model).fingerprint(), "llama", 0, 4)
    channel = LocalChannel(link.serve)
    assert channel.call(Message("hello", "train-1", meta=spec.to_meta())).kind == "hello"
    group = server.group
    _, sid, reply = raw_session(link)
    assert reply.kind == "hello" and server.group is group and "train-1" in server.sessions
    assert ask(channel, Message("generate", "train-1", meta={"start": 0})).meta["code"] == "NOT_FOUND"
    same = ask(channel, Message("hello", "train-1", meta={**spec.to_meta(), "inference": True}))
    assert same.kind == "error" and "is a training session" in same.meta["reason"]
    server.close()


# -- gRPC ---------------------------------------------------------------------------------------------------------
def test_grpc_generation_equals_in_process_and_a_disconnect_frees_the_session(trained):
    run = trained("tiny:llama", "[1,3]")
    source = resolve_model("tiny:llama")
    config = source.config()
    server = Server(source, detect_arch(config), config, policies=POLICIES)
    service = SplitService(server, None)
    bound, port = serve_here(service)
    url = f"grpc://127.0.0.1:{port}"
    try:
        ids, mask = prompts()
        with load_split(run) as local:
            want = local.generate(ids, mask, **GREEDY)
        split = load_split(run, channel=GrpcChannel(url))
        got = split.generate(ids, mask, **GREEDY)
        assert torch.equal(got.sequences, want.sequences) and max_score_diff(got, want) == 0.0
        assert health(url)["inference_sessions"] == 1 and health(url)["inference_bytes"] > 0
        split.link.close()  # the stream ends without a close message
        for _ in range(100):
            if not server.inference.sessions:
                break
            time.sleep(0.05)
        assert not server.inference.sessions and health(url)["inference_sessions"] == 0
    finally:
        bound.stop(0)
        server.close()


# -- taps -------------------------------------------------------------------------------------------------------
def tapped_generation(tmp_path, *sets, new_tokens=3):
    """A two-part generation of 5 prompt tokens with the server tapped: the tap, and the clean bottom's output."""
    from splittune.models.segment import run_segment

    cfg = load_config(None, ["model=tiny:llama", "cuts=[2]", *sets])
    recording = Recording(tmp_path / "tap", ("server",), 1 << 30, truth=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with SplitModel(cfg, None, serve_through=recording.attach) as split:
        split.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        clean = run_segment(split.party.model, split.party.blocks, 0, 2, input_ids=ids, attention_mask=torch.ones_like(ids))
    recording.close()
    return Tap.open(tmp_path / "tap" / "server", "server"), clean.hidden


def test_the_server_tap_holds_the_prompt_and_each_token_as_the_server_saw_them(tmp_path):
    tap, bottom = tapped_generation(tmp_path)
    up = list(tap.records("generate", "up"))
    assert [r.tensor("hidden").shape[1] for r in up] == [5, 1, 1]
    assert torch.allclose(up[0].tensor("hidden"), bottom, atol=1e-6)  # the pretrained bottom's output: invertible
    down = list(tap.records("generate", "down"))
    vocab = resolve_model("tiny:llama").config().vocab_size
    assert down[0].tensor("logits").shape == (1, 1, vocab)  # two-part: the server holds the head, and sees the logits


@pytest.mark.parametrize("defense", ["{name: gaussian, sigma: 0.5, clip: 10}", "{name: dx, epsilon: 20}"])
def test_a_noise_defense_changes_what_the_server_sees_during_generation(tmp_path, defense):
    """The twin of the tap test above: with the run's noise defense the server's view is not the clean bottom's."""
    tap, clean = tapped_generation(tmp_path, f"defense=[{defense}]", new_tokens=2)
    seen = next(tap.records("generate", "up")).tensor("hidden")
    assert (seen - clean).norm() > 0.1 * clean.norm()


# -- from a run directory and the command line -------------------------------------------------------------------
def test_an_instruction_run_frames_prompts_with_its_chat_template(tmp_path, trained):
    cfg = load_config(None, ["model=tiny:llama", "cuts=[1,3]"])
    with SplitModel(cfg, None, task="instruction") as split:
        framed = split.tokenizer.decode(split.encode_prompts(["hi"])[0])
        raw = split.tokenizer.decode(split.encode_prompts(["hi"], raw=True)[0])
    assert framed == "<|im_start|>user\nhi<|endoftext|>\n<|im_start|>assistant\n" and raw == "hi"


def test_a_run_without_adapters_is_refused_with_what_is_missing(tmp_path):
    (tmp_path / "config.yaml").write_text("model: tiny:llama\ncuts: [1, 3]\n")
    with pytest.raises(GenerationError, match="not a finished run directory.*a run that did not finish has no adapters"):
        load_split(tmp_path)
    with pytest.raises(GenerationError, match="not a run directory"):
        load_split(tmp_path / "nothing")


class Ran:
    def __init__(self, result):
        self.returncode, self.stdout = result.exit_code, result.stdout
        self.stderr = result.stderr


def cli(*args):
    from typer.testing import CliRunner

    from splittune.cli import app

    return Ran(CliRunner().invoke(app, ["generate", *map(str, args)]))


def test_generate_command_prints_json_and_refuses_bad_input(trained, tmp_path):
    run = trained("tiny:llama", "[1,3]")
    ok = cli(run, "--prompt", "To be", "--prompt", "or not", "-n", "4", "--json", "--batch")
    assert ok.returncode == 0, ok.stderr
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "or not"]
    assert all(len(r["token_ids"]) <= 4 and r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["messages"] == 4 for r in rows)
    assert rows[0]["time_to_first_token_s"] > 0
    with load_split(run) as split:  # the command's greedy completion is the API's
        assert split.complete(["To be"], max_new_tokens=4)[0].token_ids == rows[0]["token_ids"] or len(rows[0]["token_ids"]) < 4
    for args, message in [
        (["--prompt", "x", "-n", "0"], "error: --max-new-tokens must be at least 1, got 0"),
        ([], "error: give a prompt: --prompt TEXT or --prompt-file FILE"),
        (["--prompt", ""], "error: a prompt is empty"),
        (["--prompt", "x", "--greedy", "--temperature", "0.7"], "error: --greedy decodes without sampling"),
        (["--prompt", "x", "--temperature", "0"], "error: sampling needs --temperature > 0"),
        (["--prompt-file", tmp_path / "missing.txt"], "error: --prompt-file"),
    ]:
        bad = cli(run, *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
    streamed = cli(run, "--prompt", "To be", "-n", "4", "--stream")
    assert streamed.returncode == 0 and streamed.stdout.startswith("To be\n")
    empty = cli(tmp_path / "nowhere", "--prompt", "x")
    assert empty.returncode == 2 and "is not a run directory" in empty.stderr


def test_compare_base_shows_the_base_models_completion_beside_the_fine_tuned_one(trained):
    """The base completion is the unsplit base model's own greedy continuation; the fine-tuned one is the run's."""
    run = trained("tiny:llama", "[1,3]")
    rows = [json.loads(line) for line in cli(run, "--prompt", "To be", "-n", "6", "--json", "--compare-base").stdout.splitlines()]
    with load_split(run, base=True) as base, load_split(run) as tuned:
        ids = base.tokenizer("To be", return_tensors="pt")["input_ids"]
        want = unsplit("tiny:llama").generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert base.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True) == rows[0]["base_completion"]
        assert tuned.complete(["To be"], max_new_tokens=6)[0].completion == rows[0]["completion"]
    plain = cli(run, "--prompt", "To be", "-n", "6", "--compare-base").stdout  # not a terminal: labelled lines
    assert f"base model: {rows[0]['base_completion']}" in plain and f"fine-tuned: {rows[0]['completion']}" in plain
