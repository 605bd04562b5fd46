"""Architecture families and what splittune knows about each (``splittune models``, docs/models-and-data.md).

- ``exact``: split training equals unsplit training on the family's tiny model, two-part and U-shaped, with
  padding; tests/models/test_exactness.py runs every family listed so (``TESTED_ARCHITECTURES``).
- ``refused``: ``detect_arch`` stops it before any weight is loaded, with the reason listed here
  (tests/models/test_catalog.py checks that the refusal says so).

Any other model_type is detected automatically: ``splittune verify`` says whether it splits exactly.
Adding a family is one ``Family`` line; an exact one then runs in the exactness suite.
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT, REFUSED = "exact", "refused"
DETECTED = "detected automatically; run splittune verify"


# Why detect_arch refuses a model (models/arch.py words its refusal with these; a refused family names one).
SHARED_WEIGHTS = ("its blocks share the weights of one module, and each party loads and trains only its own blocks, "
                  "so a module shared across a cut would become two diverging copies")
CARRIED_STATE = ("its blocks take, beside the hidden state, a tensor computed from weights before them (a router state "
                 "or attention selection handed from block to block, earlier blocks' hidden states, or a learned "
                 "position bias), and only the hidden state crosses a cut, so the blocks after a cut would run without it")
WIDE_STREAM = ("what runs from block to block is wider than its hidden size (several residual streams, as with "
               "hyper-connections), and a cut carries one hidden state of the model's hidden size")
# Why split generation refuses a model whose training splits exactly (models/arch.py: generation_refusal).
OWN_CACHE = ("keeps its generation state in a cache object of its own, not transformers' per-layer Cache whose layers "
             "each party keeps for its own blocks; training, verify and export work, and the exported adapter "
             "(splittune export) generates unsplit")
UNPACKING_LOOP = ("its model loop unpacks a different number of values from different blocks, and splittune's "
                  "stand-ins for the blocks a party does not hold return one shape for all")


@dataclass(frozen=True)
class Family:
    model_type: str
    status: str  # EXACT | REFUSED
    why: str  # exact: what its tiny model exercises; refused: why it cannot be split (part of the refusal)


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", EXACT, "learned positions, Conv1D projections, tied head"),
    Family("llama", EXACT, "rotary positions, grouped-query attention"),
    Family("mistral", EXACT, "sliding-window attention"),
    Family("qwen2", EXACT, "sliding windows on some layers only"),
    Family("qwen3", EXACT, "query/key norms"),
    Family("gemma", EXACT, "scaled embeddings, tied head"),
    Family("phi3", EXACT, "fused projections, sliding windows"),
    Family("opt", EXACT, "learned positions with an offset, embedding projections"),
    Family("gpt_neox", EXACT, "partial rotary, parallel attention and MLP"),
    Family("falcon", EXACT, "multi-query attention, blocks that return tuples"),
    Family("gemma3_text", EXACT, "mixed sliding and full layers, soft-capping"),
    Family("granite", EXACT, "embedding and logit multipliers"),
    Family("starcoder2", EXACT, "sliding windows, biases"),
    Family("olmo2", EXACT, "norms after attention and MLP"),
    Family("gptj", EXACT, "partial rotary applied inside attention"),
    Family("codegen", EXACT, "fused QKV with rotary inside attention"),
    Family("mixtral", EXACT, "experts stored one by one, fused on load per party; the router loss when on"),
    Family("phimoe", EXACT, "experts sampled in training (sparsemixer), a router that returns a tuple; exact given the "
                            "same random draws, which verify gives both sides"),
    Family("qwen3_moe", EXACT, "fused experts, query/key norms"),
    Family("gpt_neo", EXACT, "alternating local (windowed) and global attention"),
    Family("bloom", EXACT, "ALiBi positions, embedding norm"),
    Family("gemma2", EXACT, "alternating sliding and full layers, soft-capping"),
    Family("phi", EXACT, "partial rotary, parallel attention and MLP"),
    Family("cohere", EXACT, "parallel blocks, logit scale, tied head"),
    Family("stablelm", EXACT, "partial rotary, layer norms"),
    Family("lfm2", EXACT, "short-convolution layers between attention layers"),
    Family("recurrent_gemma", EXACT, "recurrent (RG-LRU) layers between local attention layers"),
    # state-space and linear-attention layers: the state runs along the sequence inside a layer, so in training only
    # hidden states cross a cut; LoRA goes on the layers the forward calls (models/linears.py)
    Family("mamba", EXACT, "selective state-space layers; LoRA on in_proj (a fused kernel reads the other projections)"),
    Family("falcon_mamba", EXACT, "Mamba layers with norms on the state-space inputs"),
    Family("mamba2", EXACT, "Mamba-2 layers, a chunked scan; LoRA on in_proj"),
    Family("bamba", EXACT, "Mamba-2 and attention layers; blocks return tuples the loop unpacks"),
    Family("falcon_h1", EXACT, "attention and Mamba-2 side by side in every layer, multipliers"),
    Family("jamba", EXACT, "Mamba and attention layers, experts on some layers only"),
    Family("granitemoehybrid", EXACT, "Mamba-2 and attention layers, experts in every layer"),
    Family("nemotron_h", EXACT, "Mamba-2, attention, MLP and expert layers; default LoRA on every layer kind"),
    Family("rwkv", EXACT, "RWKV time-mixing recurrence; blocks return (hidden, state, attentions); split generation refused (its own cache object)"),
    Family("xlstm", EXACT, "mLSTM recurrence; blocks return (hidden, state); split generation refused (its own cache object)"),
    Family("qwen3_next", EXACT, "gated DeltaNet layers between attention layers, experts"),
    Family("qwen3_5", EXACT, "gated DeltaNet layers between attention layers, from a composite config"),
    Family("qwen3_5_moe", EXACT, "gated DeltaNet layers between attention layers, experts"),
    Family("olmo_hybrid", EXACT, "gated DeltaNet layers between attention layers"),
    Family("kimi_linear", EXACT, "Kimi delta attention between latent (MLA) attention layers, experts"),
    Family("bailing_hybrid", EXACT, "delta attention between attention layers, experts"),
    Family("lara_mini", EXACT, "gated DeltaNet, sliding and full attention layers, experts"),
    Family("minimax", EXACT, "lightning (linear) attention alternating with attention, experts; split generation refused (its own cache object)"),
    Family("lfm2_moe", EXACT, "short-convolution and attention layers, experts"),
    Family("lfm3", EXACT, "short-convolution, sliding and full attention layers"),
    Family("inkling_text", EXACT, "short convolutions inside sliding and full attention layers, experts"),
    Family("zamba", REFUSED, SHARED_WEIGHTS),
    Family("zamba2", REFUSED, SHARED_WEIGHTS),
    Family("zaya", REFUSED, CARRIED_STATE),
    Family("inkling2_text", REFUSED, CARRIED_STATE),
    Family("inkling2_loop_text", REFUSED, CARRIED_STATE),
    Family("glm_moe_dsa", REFUSED, CARRIED_STATE),
    Family("hy_v4", REFUSED, CARRIED_STATE),
    Family("cpmant", REFUSED, CARRIED_STATE),
    Family("qwen4_exp", REFUSED, WIDE_STREAM),
    Family("qwen4_exp_text", REFUSED, WIDE_STREAM),
)

TESTED_ARCHITECTURES = tuple(f.model_type for f in FAMILIES if f.status == EXACT)
REFUSED_ARCHITECTURES = tuple(f.model_type for f in FAMILIES if f.status == REFUSED)


def family(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if f.model_type == model_type), None)


def status_line(f: Family) -> str:
    """How ``splittune models`` and the docs describe a family's status."""
    if f.status == EXACT:
        return f"exact (tested: two-part and U-shaped splits, with padding); {f.why}"
    return f"refused: {f.why}"


def markdown_table() -> str:
    """The families table in docs/models-and-data.md (a test keeps the two equal)."""
    rows = ["| model_type | status | why |", "|---|---|---|"]
    rows += [f"| `{f.model_type}` | {f.status} | {f.why} |" for f in FAMILIES]
    rows.append(f"| any other | detected | {DETECTED} |")
    return "\n".join(rows)
