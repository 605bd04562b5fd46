"""The stand-in for a block a party does not hold (``AbsentBlock``): no weights, its input passed through in the
shape the real block returns. Partitions place it; the architecture check runs a model made of it."""

from __future__ import annotations

from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin


class AbsentBlock(nn.Module):
    """Stands in for a block this party does not hold: no weights, passes its input through.

    Its output is never used: the segment runner replaces the hidden state at the first block the
    segment runs. It returns what the real block returns, so a long run of stubs hands every one the same
    shape and loops that unpack each block's outputs get as many: ``block_tuple`` is 0 for a bare tensor, else
    the length of the tuple the real block returns (``ArchSpec.stub_returns``), whose items after the hidden
    state are None (a stand-in computes no attention weights or recurrent state; arch.py
    refuses a model whose blocks hand such a state to the next block). It copies the original block's plain
    attributes (e.g. ``attention_type``) because some decoder loops read them.
    """

    def __init__(self, original: nn.Module | None = None, block_tuple: int = 0, index: int | None = None):
        super().__init__()
        self.block_tuple = int(block_tuple)
        if original is not None:  # class attributes too: some layer classes declare their kind (Inkling2's attention_type)
            plain = [vars(k) for k in reversed(type(original).__mro__) if k.__module__.startswith("transformers.")]
            for key, value in (kv for d in (*plain, vars(original)) for kv in d.items()):
                if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                    setattr(self, key, value)
        self.layer_idx = index  # its place in the block list (set after the copy: models name it differently)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)  # cache=, layer_past=, positional
        if cache is not None and self.layer_idx is not None and _tracks_length(cache, self.layer_idx):
            # generation with a KV cache: this party's cache keeps the layer's length in step (one value per position),
            # so the model's own get_seq_length() and mask sizes are right whichever layers the party holds
            z = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(z, z, self.layer_idx)
        return (hidden,) + (None,) * (self.block_tuple - 1) if self.block_tuple else hidden


def _tracks_length(cache: Cache, index: int) -> bool:
    """Whether layer ``index`` of ``cache`` counts positions (attention); a linear-attention layer's conv or recurrent
    state is read by its own layer only, so a stub leaves it alone."""
    layers = getattr(cache, "layers", None)
    return layers is None or index >= len(layers) or isinstance(layers[index], CacheLayerMixin)
