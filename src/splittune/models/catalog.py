"""Architecture families and what splittune knows about each (``splittune models``, docs/models-and-data.md).

- ``exact``: split training equals unsplit training on the family's tiny model, two-part and U-shaped, with
  padding; tests/test_exactness.py runs every family listed so (``TESTED_ARCHITECTURES``).
- ``refused``: ``detect_arch`` stops it before any weight is loaded, with the reason listed here
  (tests/test_catalog.py checks that the refusal says so).

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
UNPACKING_LOOP = ("its model loop unpacks several values from every block (the hidden state and more, such as a "
                  "recurrent state), and splittune's stand-ins for the blocks a party does not hold return only the "
                  "hidden state")


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
    Family("qwen3_moe", EXACT, "fused experts, query/key norms"),
    Family("gpt_neo", EXACT, "alternating local (windowed) and global attention"),
    Family("bloom", EXACT, "ALiBi positions, embedding norm"),
    Family("gemma2", EXACT, "alternating sliding and full layers, soft-capping"),
    Family("phi", EXACT, "partial rotary, parallel attention and MLP"),
    Family("cohere", EXACT, "parallel blocks, logit scale, tied head"),
    Family("stablelm", EXACT, "partial rotary, layer norms"),
    Family("lfm2", EXACT, "short-convolution layers between attention layers"),
    Family("recurrent_gemma", EXACT, "recurrent (RG-LRU) layers between local attention layers"),
    Family("zamba", REFUSED, SHARED_WEIGHTS),
    Family("zamba2", REFUSED, SHARED_WEIGHTS),
    Family("rwkv", REFUSED, UNPACKING_LOOP),
    Family("xlstm", REFUSED, UNPACKING_LOOP),
    Family("bamba", REFUSED, UNPACKING_LOOP),
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
