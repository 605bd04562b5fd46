"""The planner knows quantization: weights packed as bitsandbytes packs them, and a budget too small for full
precision finds a quantized plan (the 8B-shaped client in 2 GB), never one the budget does not need."""

from dataclasses import replace

import pytest
import torch
import yaml

from splittune.bench.shapes import shape_config
from splittune.config import load_config
from splittune.models.arch import detect_arch
from splittune.plan import predict, search
from splittune.plan.estimate import estimate_profile
from splittune.plan.output import config_yaml
from splittune.plan.sizes import model_sizes

RUNTIME = 500 << 20  # a party process's baseline, fixed (measuring it takes a fresh process)
BASE = load_config(None, ["model=tiny:llama", "train.batch_size=1", "train.seq_len=128", "train.dtype=bfloat16"])


@pytest.fixture(scope="module")
def eight_b():
    """A profile of the Llama-3.1-8B shape from its config alone (no weights exist or load)."""
    config = shape_config("llama-3.1-8b")
    sizes = model_sizes(config, detect_arch(config), BASE.lora)
    common = dict(model="llama-3.1-8b", sizes=sizes, batch=1, seq_len=128, dtype="bfloat16", device="cpu", threads=1,
                  runtime_server=RUNTIME, runtime_client=RUNTIME, runtime_client_peak=RUNTIME, batches=[], eval_tokens=128,
                  lazy_embeddings=True, notes=[])
    return estimate_profile(BASE, torch.device("cpu"), **common)


def test_packed_weights_are_what_bitsandbytes_stores(eight_b):
    s = eight_b.sizes
    assert s.linear_params == 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336  # q, k, v, o and the MLP
    nf4 = s.block_bytes(2, "nf4")
    assert nf4 == int((s.block_params - s.linear_params) * 2 + s.linear_params / 2 + s.linear_params / 64 * 4)
    assert s.block_bytes(2, "nf4", double_quant=True) < nf4 < s.block_bytes(2, "int8") < s.block_bytes(2) == s.block_params * 2


def test_a_2gb_client_of_an_8b_shape_gets_an_nf4_plan(eight_b):
    budget = 2 << 30
    best = search(BASE, eight_b, budget, 6 << 30, bandwidth_mbps=1000, shape="u-shape").ranked[0]
    assert best.choice.client_quantize == "nf4" and best.prediction.client_peak_bytes <= budget
    assert best.choice.head_quantize == "nf4"  # its bf16 head alone is 1 GB: packed last, computed in slices
    assert best.prediction.server_peak_bytes <= 6 << 30
    written = yaml.safe_load(config_yaml(best, eight_b, budget, 6 << 30, 1000, 0.0))
    assert written["quantize"]["bottom"] == written["quantize"]["top"] == written["quantize"]["head"] == "nf4"
    # the twins: the same cuts at full precision, and with the head unpacked, are over the budget
    plain = replace(best.choice, client_quantize="none", server_quantize="none", head_quantize="none")
    assert predict(plain.apply(BASE), eight_b).client_peak_bytes > 1.5 * budget
    assert predict(replace(best.choice, head_quantize="none").apply(BASE), eight_b).client_peak_bytes > budget
    roomier = search(BASE, eight_b, int(2.5 * 2**30), 6 << 30, bandwidth_mbps=1000, shape="u-shape").ranked[0]
    assert roomier.choice.client_quantize == "nf4" and roomier.choice.head_quantize == "none"  # only as far as needed


def test_a_budget_below_the_smallest_packed_footprint_names_it(eight_b):
    from splittune.plan import BudgetError

    with pytest.raises(BudgetError, match=r"smallest client footprint is 1\.\d GiB, with cuts \[1, 31\] .*client blocks nf4.*head nf4"):
        search(BASE, eight_b, 1 << 30, 6 << 30, bandwidth_mbps=1000, shape="u-shape")


def test_a_budget_that_fits_full_precision_quantizes_nothing(eight_b):
    ranked = search(BASE, eight_b, 64 << 30, bandwidth_mbps=1000, shape="u-shape").ranked
    assert ranked[0].choice.client_quantize == ranked[0].choice.server_quantize == ranked[0].choice.head_quantize == "none"
