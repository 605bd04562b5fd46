"""State-space, recurrent and hybrid models: LoRA on layers the forward really calls, default targets that every
block kind holds, expert LoRA where only some blocks have experts, and stand-ins that return what the loop unpacks
(exactness itself: tests/models/test_exactness.py, which runs every family the catalog lists as exact)."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from splittune.config import LoraConfig, load_config
from splittune.models.adapters import AdapterError, apply_training, default_targets, expert_parameters
from splittune.models.arch import ArchSpec, detect_arch, empty_model
from splittune.models.linears import bypassed, linear_names
from splittune.models.partition import AbsentBlock, Segment, load_party_model, plan_split
from splittune.models.tiny import DEFAULTS, tiny_config
from splittune.models.zoo import resolve_model
from splittune.verify import verify


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _lora_changes_output(ref: str, target: str) -> bool:
    """Whether a LoRA on ``target`` alone (its B made non-zero) changes the model's output, in training mode."""
    base = AutoModelForCausalLM.from_pretrained(resolve_model(ref).path).train()
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    before = _logits(base, ids)
    model = get_peft_model(base, PeftLoraConfig(r=2, target_modules=[target]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    return float((before - _logits(model, ids)).abs().max()) > 1e-3  # a LoRA that reaches the output moves it by far more


@pytest.mark.parametrize("ref", ["tiny:mamba", "tiny:jamba"])
def test_lora_targets_are_layers_the_forward_calls(ref):
    """``all-linear`` keeps only layers whose LoRA reaches the output; the twin: the projection it leaves out
    (``dt_proj``, whose weight Mamba and Jamba multiply by directly) is ignored by the forward when peft wraps it."""
    config = resolve_model(ref).config()
    blocks = empty_model(config).get_submodule(detect_arch(config).blocks_path)
    names = linear_names(blocks)
    assert "dt_proj" in bypassed(blocks) and "dt_proj" not in names and "in_proj" in names
    mixer = [t for t in names if t in ("in_proj", "x_proj", "out_proj")]  # the state-space mixer's (attention is usual)
    assert mixer and all(_lora_changes_output(ref, t) for t in mixer)
    assert not _lora_changes_output(ref, "dt_proj")


def test_mamba_fused_kernel_projections_are_left_out():
    """Mamba's fused training kernel takes x_proj, dt_proj and out_proj by their weights (peft refuses out_proj on
    Mamba for this reason); Mamba-2's takes out_proj's. Jamba, which has no fused path, keeps x_proj and out_proj."""
    for arch, kept, left in (("mamba", ["in_proj"], {"x_proj", "dt_proj", "out_proj"}), ("mamba2", ["in_proj"], {"out_proj"}),
                             ("jamba", ["in_proj", "out_proj", "x_proj"], {"dt_proj"})):
        spec = detect_arch(tiny_config(arch, dict(DEFAULTS)))
        mamba_block = spec.lora_linears[0]
        assert set(kept) <= set(mamba_block) and not left & set(mamba_block), (arch, mamba_block)


def test_naming_a_layer_the_forward_bypasses_is_refused():
    source = resolve_model("tiny:mamba")
    config, spec = source.config(), detect_arch(source.config())
    plan = plan_split(spec.n_blocks, [1, 3])

    def adapt(targets):
        model, _ = load_party_model(source, config, spec, range(4), pre=True, post=True)
        return apply_training(model, spec, [(s, "lora") for s in plan.segments], LoraConfig(target_modules=targets), 0)

    with pytest.raises(AdapterError, match=r"names dt_proj, out_proj, whose weight mamba blocks read directly .* can adapt in_proj"):
        adapt(["in_proj", "dt_proj", "out_proj"])
    assert any("in_proj.lora_A" in n for n, _ in adapt(["in_proj"]).named_parameters())  # the twin


def test_default_targets_cover_every_block_kind():
    """peft's default for Nemotron-H is attention only, which its Mamba and MLP blocks lack: a party holding only
    those found no target. The default is then every adaptable layer, decided from the whole model."""
    nemotron = detect_arch(tiny_config("nemotron_h", dict(DEFAULTS)))
    assert default_targets(nemotron) == "all-linear"
    assert default_targets(detect_arch(tiny_config("llama", dict(DEFAULTS)))) == ["q_proj", "v_proj"]
    report = verify(load_config(None, ["model=tiny:nemotron_h", "cuts=[1]"]), batch=2, seq=8, padding=True)
    assert report.ok and any(".layers.0." in n for n in _trainable_names("tiny:nemotron_h", [0]))
    with pytest.raises(AdapterError, match="not found"):  # the twin: peft's attention-only default on the Mamba block
        _trainable_names("tiny:nemotron_h", [0], LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def _trainable_names(ref: str, blocks: list[int], lora: LoraConfig | None = None) -> list[str]:
    source = resolve_model(ref)
    config, spec = source.config(), detect_arch(source.config())
    model, _ = load_party_model(source, config, spec, blocks, pre=True, post=False)
    seg = Segment("bottom", blocks[0], blocks[-1] + 1, True, False)
    wrapped = apply_training(model, spec, [(seg, "lora")], lora or LoraConfig(), 0)
    return [n for n, p in wrapped.named_parameters() if p.requires_grad]


def test_expert_lora_where_only_some_blocks_hold_experts():
    """Jamba has experts on its attention blocks only: each block gets its own expert weights (the first adapted
    block, a Mamba block, used to stand for all), and a party without experts adapts none."""
    source = resolve_model("tiny:jamba")
    spec = detect_arch(source.config())
    blocks = empty_model(source.config()).get_submodule(spec.blocks_path)
    assert spec.expert_blocks == (1, 3)
    names = expert_parameters(spec, blocks, [0, 1, 2, 3])
    assert names and all(n.startswith(("model.layers.1.", "model.layers.3.")) for n in names)
    assert not any("conv1d" in n for n in names)  # a state-space convolution's 3-D kernel is not an expert weight
    assert expert_parameters(spec, blocks, [0, 2]) == []
    split = verify(load_config(None, ["model=tiny:jamba", "cuts=[1]", "lora.experts=true"]), batch=2, seq=8, padding=True)
    plain = verify(load_config(None, ["model=tiny:jamba", "cuts=[1]"]), batch=2, seq=8, padding=True)
    assert split.ok and split.tensors > plain.tensors
    with pytest.raises(AdapterError, match="hold no stacked expert weights"):  # the twin: a model without experts
        expert_parameters(detect_arch(tiny_config("mamba", dict(DEFAULTS))), blocks, [0])


def test_stand_ins_return_what_the_loop_unpacks():
    assert [detect_arch(tiny_config(a, dict(DEFAULTS))).stub_returns for a in ("rwkv", "xlstm", "bamba", "llama")] == [3, 2, 2, False]
    hidden = torch.zeros(1, 2, 4)
    out = AbsentBlock(None, 3, 0)(hidden)
    assert len(out) == 3 and out[0] is hidden and out[1:] == (None, None)
    assert AbsentBlock(AbsentBlock(None, 3, 0), 3, 1).block_tuple == 3  # a stand-in made from a stand-in keeps it


def test_a_stand_in_returning_only_the_hidden_state_breaks_the_rwkv_loop(monkeypatch):
    """The twin: RWKV's loop unpacks (hidden, state, attentions) from every block, so the earlier stand-ins (a 1-tuple)
    failed at the first absent block."""
    monkeypatch.setattr(ArchSpec, "stub_returns", property(lambda self: self.block_tuple))
    with pytest.raises(Exception, match="not enough values to unpack"):
        verify(load_config(None, ["model=tiny:rwkv", "cuts=[1,3]"]), batch=2, seq=8, padding=True)
