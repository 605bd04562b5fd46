"""A byte-level tokenizer for ``tiny:`` models: no training, no download, works on any text."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|im_start|>", "<|endoftext|>"]  # ids 0, 1, 2 (pad, bos, eos)

# ChatML, the template SmolLM2 uses, so that instruction data behaves the same on tiny and builtin models.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte is one token (ids 3..258) after three special tokens; 259 tokens in all."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda s: ord(s))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIALS[0],
        bos_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        model_max_length=1 << 20,
    )
    tok.add_special_tokens({"additional_special_tokens": []})
    tok.chat_template = CHAT_TEMPLATE
    return tok
