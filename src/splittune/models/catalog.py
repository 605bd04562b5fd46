"""Architectures the test suite proves exact (tests/test_exactness.py iterates over this list)."""

TESTED_ARCHITECTURES = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt_neox",
    "falcon", "gemma3_text", "granite", "starcoder2", "olmo2",
)
