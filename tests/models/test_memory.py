"""Contract 3: each party reads and holds only its own segments' weights."""

import safetensors

from splittune.models.arch import detect_arch
from splittune.models.partition import AbsentBlock, is_placeholder, load_party_model, plan_split
from splittune.models.zoo import resolve_model


def _owned_keys(weight_map, spec, blocks, pre, post):
    prefixes = tuple(spec.block_prefix(i) for i in blocks)
    modules = (spec.pre if pre else ()) + (spec.post if post else ())
    return {k for k in weight_map if k.startswith(prefixes) or k.rsplit(".", 1)[0] in modules}


def test_parties_read_only_their_tensors(reads):
    source = resolve_model("tiny:llama,layers=8")
    spec = detect_arch(source.config())
    plan = plan_split(spec.n_blocks, [2, 6])
    read = reads
    server_blocks = list(plan.segment("trunk").blocks)
    model, stats = load_party_model(source, source.config(), spec, server_blocks, pre=False, post=False)
    assert set(read) == _owned_keys(source.weight_map(), spec, server_blocks, False, False)
    assert all(k.startswith("model.layers.") for k in read)
    blocks = model.get_submodule(spec.blocks_path)
    assert [isinstance(b, AbsentBlock) for b in blocks] == [i not in server_blocks for i in range(8)]
    real = [p for p in model.parameters() if not is_placeholder(p)]
    assert stats.params == sum(p.numel() for p in real)
    assert model.get_input_embeddings().weight.untyped_storage().nbytes() <= 4  # a zero-stride placeholder

    read.clear()
    client_blocks = [0, 1, 6, 7]
    model, client_stats = load_party_model(source, source.config(), spec, client_blocks, pre=True, post=True)
    assert set(read) == _owned_keys(source.weight_map(), spec, client_blocks, True, True)
    assert stats.params + client_stats.params == sum(
        t.numel() for t in [safetensors.safe_open(str(source.path / "model.safetensors"), "pt").get_tensor(k) for k in source.weight_map()]
    )
