"""The family catalog: tiny models that are valid models, refusals that say why, and docs that match."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from splittune.models import catalog
from splittune.models.arch import ArchitectureError, detect_arch
from splittune.models.catalog import FAMILIES, REFUSED_ARCHITECTURES, TESTED_ARCHITECTURES
from splittune.models.tiny import DEFAULTS, TINY_VERSION, tiny_config, tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def runs_unsplit(model: torch.nn.Module) -> float:
    """One padded forward with labels in plain transformers (no cache, as splittune runs it): the loss."""
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    return float(out.loss)


@pytest.mark.parametrize("arch", [f.model_type for f in FAMILIES])
def test_every_listed_family_has_a_tiny_model_transformers_runs(arch):
    """A verify failure must mean the split is wrong, never the tiny config: the saved tiny model loads and runs
    unsplit in transformers alone, refused families included."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(f"tiny:{arch}"))
    assert torch.isfinite(torch.tensor(runs_unsplit(model)))


def test_the_unsplit_check_catches_an_invalid_tiny_config():
    """The twin: GPT-J's default rotary_dim (64) on a head of 16, the tiny config the issue reported, fails there."""
    config = tiny_config("gptj", dict(DEFAULTS))
    assert config.rotary_dim <= config.n_embd // config.n_head
    config.rotary_dim = 64
    with pytest.raises(RuntimeError, match="must match the size"):
        runs_unsplit(AutoModelForCausalLM.from_config(config))


def test_tiny_configs_follow_the_shrunken_sizes():
    opts = dict(DEFAULTS)
    head = opts["hidden"] // opts["heads"]
    gptj = tiny_config("gptj", opts)
    assert 0 < gptj.rotary_dim < head and gptj.rotary_dim % 2 == 0  # still partial, as in the released model
    neo = tiny_config("gpt_neo", opts)
    assert neo.attention_layers == ["global", "local"] * 2 and neo.window_size < 12
    odd = tiny_config("gpt_neo", {**opts, "layers": 3})
    assert len(odd.attention_layers) == 3
    for arch in ("jamba", "lfm2", "bamba", "granitemoehybrid", "zamba2"):  # hybrids keep attention among their layers
        kinds = tiny_config(arch, opts).layer_types
        assert len(kinds) == opts["layers"] and len(set(kinds)) >= 2, (arch, kinds)
    six = tiny_config("qwen2", {**opts, "layers": 6})
    assert len(six.layer_types) == 6 and "sliding_attention" in six.layer_types
    mamba2 = tiny_config("mamba2", opts)
    assert mamba2.num_heads * mamba2.head_dim == mamba2.expand * mamba2.hidden_size


def test_tiny_mamba2_mixers_are_tiny():
    """Mamba-2 configs keep the full model's 128 heads and 256 states by default (seconds per step on a 64-wide model)."""
    opts = dict(DEFAULTS)
    for arch, heads, head_dim, state, chunk in (
        ("bamba", "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_chunk_size"),
        ("granitemoehybrid", "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_chunk_size"),
        ("falcon_h1", "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_chunk_size"),
        ("nemotron_h", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "chunk_size"),
        ("mamba2", "num_heads", "head_dim", "state_size", "chunk_size"),
    ):
        config = tiny_config(arch, opts)
        assert getattr(config, heads) * getattr(config, head_dim) == 2 * opts["hidden"], arch
        assert getattr(config, state) <= 16 and getattr(config, chunk) < 12, arch  # several chunks in a test sequence


def test_tiny_xlstm_runs_with_its_cache():
    """Its cache rounds the query/key width up to a multiple of 64 and its layer does not: the tiny width lands on one.
    The twin: the default factor (0.5 of 64) fails in plain transformers as soon as the cache is used."""
    config = tiny_config("xlstm", dict(DEFAULTS))
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        AutoModelForCausalLM.from_config(config).eval()(input_ids=ids, use_cache=True)
        config.qk_dim_factor = 0.5
        with pytest.raises(ValueError, match="wrong shape"):
            AutoModelForCausalLM.from_config(config).eval()(input_ids=ids, use_cache=True)


def test_tiny_moe_configs_have_few_experts():
    for arch, experts in (("mixtral", "num_local_experts"), ("qwen3_moe", "num_experts"), ("deepseek_v3", "n_routed_experts")):
        config = tiny_config(arch, dict(DEFAULTS))
        assert getattr(config, experts) == 4 and config.num_experts_per_tok == 2, arch
    dense = tiny_config("llama", dict(DEFAULTS))
    assert not hasattr(dense, "num_local_experts") and not hasattr(dense, "num_experts")  # a dense model stays dense


def test_a_changed_tiny_rule_is_never_served_from_an_old_cache():
    assert f"-v{TINY_VERSION}-" in tiny_model_dir("tiny:gpt2").name


@pytest.mark.parametrize("arch", REFUSED_ARCHITECTURES)
def test_refused_families_are_refused_up_front_saying_why(arch):
    """From the config alone (the meta device, no weights), as verify and train both call it first."""
    with pytest.raises(ArchitectureError) as err:
        detect_arch(tiny_config(arch, dict(DEFAULTS)))
    message = str(err.value)
    assert f"({arch}) cannot be split: " in message and catalog.family(arch).why in message
    assert "\n" not in message


def test_the_shared_weight_refusal_fires_on_any_model_that_shares_a_module(monkeypatch):
    """The twin of the zamba refusal: llama passes, and the same llama with two blocks sharing an MLP is refused."""
    from splittune.models import arch as arch_mod

    config = tiny_config("llama", dict(DEFAULTS))
    assert detect_arch(config).n_blocks == 4
    real = arch_mod.empty_model

    def shared(config):
        model = real(config)
        model.model.layers[3].mlp = model.model.layers[1].mlp
        return model

    monkeypatch.setattr(arch_mod, "empty_model", shared)
    with pytest.raises(ArchitectureError, match=r"blocks 1 and 3 share model\.layers\.1\.mlp"):
        detect_arch(config)


def test_loops_that_take_the_first_item_of_a_tuple_are_not_refused():
    """The twin of the rwkv refusal: Falcon, BLOOM and GPT-Neo blocks return tuples too, and their loops read
    ``outputs[0]``, which the stand-ins satisfy."""
    for arch in ("falcon", "bloom", "gpt_neo"):
        spec = detect_arch(tiny_config(arch, dict(DEFAULTS)))
        assert spec.block_tuple and spec.block_outputs == 2


def test_state_kept_inside_a_block_is_not_refused():
    """The twin of the zaya and inkling2 refusals: RWKV and xLSTM blocks return a recurrent state too, but in training
    their loops do not hand it to the next block (stand-ins return None for it); Inkling, unlike Inkling2, mixes no
    earlier blocks' hidden states into later ones; and no hybrid's stream between blocks is wider than its hidden size."""
    for arch in ("rwkv", "xlstm", "inkling_text", "qwen3_next"):
        spec = detect_arch(tiny_config(arch, dict(DEFAULTS)))
        assert spec.n_blocks == 4


def test_the_exact_list_is_the_catalog_s():
    assert TESTED_ARCHITECTURES == tuple(f.model_type for f in FAMILIES if f.status == catalog.EXACT)
    assert {"gptj", "codegen", "gpt_neo"} <= set(TESTED_ARCHITECTURES)
    assert not set(TESTED_ARCHITECTURES) & set(REFUSED_ARCHITECTURES)
    assert len({f.model_type for f in FAMILIES}) == len(FAMILIES)


def families_block(doc: str) -> str:
    match = re.search(r"<!-- families:[^\n]*-->\n(.*?)\n<!-- /families -->", doc, re.S)
    return match.group(1) if match else ""


def test_docs_table_is_the_catalog():
    doc = (ROOT / "docs" / "models-and-data.md").read_text()
    assert families_block(doc) == catalog.markdown_table()
    # the twin: a status edited by hand (or a family added to the catalog only) is caught
    assert families_block(doc.replace("| `gptj` | exact |", "| `gptj` | refused |")) != catalog.markdown_table()
