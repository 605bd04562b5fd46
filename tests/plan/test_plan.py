"""Cuts and configs: clear errors that name the block count and what is allowed."""

import pytest

from splittune.config import ConfigError, load_config
from splittune.models.arch import ArchitectureError, detect_arch
from splittune.models.partition import PlanError, plan_split
from splittune.models.zoo import ModelError, resolve_model


def test_u_shape_plan():
    plan = plan_split(30, [2, 28])
    assert plan.shape == "u-shape"
    assert [(s.name, s.start, s.end) for s in plan.segments] == [("bottom", 0, 2), ("trunk", 2, 28), ("top", 28, 30)]
    assert plan.owners == ("client", "server", "client")
    assert plan.segment("top").head and plan.segment("bottom").embeds
    head_only = plan_split(30, [2, 30]).segment("top")  # the thinnest top: the final norm and head alone
    assert (head_only.start, head_only.end, head_only.head, len(head_only.blocks)) == (30, 30, True, 0)


def test_two_part_plan_gives_server_the_head():
    plan = plan_split(30, [5])
    assert plan.shape == "two-part"
    assert plan.party_segments("server")[0].head
    assert plan_split(30, [5], mode="centralized").shape == "centralized"


@pytest.mark.parametrize(
    "cuts, fragment",
    [
        ([30], "cut 30 is outside the model: it has 30 blocks (0..29)"),
        ([31], "it has 30 blocks"),
        ([2, 31], "0 <= a < b <= 30"),
        ([30, 30], "the trunk needs at least one block"),
        ([-1], "outside the model"),
    ],
)
def test_bad_cuts(cuts, fragment):
    with pytest.raises(PlanError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_split(30, cuts)


def test_config_errors_name_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\): 'stepz' is not one of steps, batch_size"):
        load_config(None, ["train.stepz=5"])
    with pytest.raises(ConfigError, match=r"cuts must be increasing"):
        load_config(None, ["cuts=[3,1]"])
    with pytest.raises(ConfigError, match=r"mode: Input should be 'split', 'centralized' or 'federated'"):
        load_config(None, ["mode=banana"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rnk'"):
        load_config(None, ["lora.rnk=4"])
    with pytest.raises(ConfigError, match=r"'model' is a value, not a section"):
        load_config(None, ["model.name=x"])
    for overrides in ("{1: {rank: 4}}", "[{}, {rank: 4}]"):  # a map or a list of per-client sections
        with pytest.raises(ConfigError) as err:
            load_config(None, ["clients=2", f"client_overrides={overrides}"])
        assert str(err.value) == "unknown config key 'client_overrides.1.rank': 'rank' is not one of cuts, lora, data"
    with pytest.raises(ConfigError, match=r"^client_overrides.1.lora_rank: Input should be greater than or equal to 1 \(got 0\)$"):
        load_config(None, ["clients=2", "client_overrides=[{}, {lora_rank: 0}]"])


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny:llama\ntrain:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes' \(did you mean 'train.steps'\?\): 'stpes' is not one of steps, batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_reach_every_documented_key():
    cfg = load_config(None, ["model=tiny:gpt2", "cuts=[1,3]", "data.source=builtin:sentiment", "mode=centralized", "seed=7",
                             "train.steps=5", "train.batch_size=3", "train.seq_len=64", "train.lr=0.001", "lora.rank=4"])
    assert (cfg.model, cfg.cuts, cfg.mode, cfg.seed) == ("tiny:gpt2", [1, 3], "centralized", 7)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.lr, cfg.lora.rank) == (5, 3, 64, 1e-3, 4)
    assert cfg.data.source == "builtin:sentiment"


def test_unknown_model_references(tmp_path):
    with pytest.raises(ModelError, match="directory without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(Exception, match="unknown model_type 'nosucharch'"):
        resolve_model("tiny:nosucharch")
    with pytest.raises(Exception, match="unknown builtin model 'nope'"):
        resolve_model("builtin:nope")


def test_non_decoder_architecture_is_refused():
    from transformers import BertConfig

    with pytest.raises(ArchitectureError):
        detect_arch(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64))


def test_arch_detection_sorts_modules_before_and_after_blocks():
    opt = detect_arch(resolve_model("tiny:opt").config())
    assert opt.blocks_path == "model.decoder.layers" and opt.n_blocks == 4 and opt.tied
    assert set(opt.pre) == {"model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"}
    assert set(opt.post) >= {"model.decoder.final_layer_norm", "model.decoder.project_out"}
    gpt2 = detect_arch(resolve_model("tiny:gpt2").config())
    assert gpt2.blocks_path == "transformer.h" and set(gpt2.pre) == {"transformer.wte", "transformer.wpe"}
