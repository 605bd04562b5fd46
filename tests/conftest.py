"""Test tokenizers built in memory (no hub): byte-level BPE where token id == byte value.

Fixed special ids in every variant: ``<|endoftext|>`` 256 (eos), ``<|pad|>`` 257 (pad unless
``pad=False``), ``<|im_start|>`` 258, ``<|im_end|>`` 259 (``chat=True`` adds a ChatML template),
``<|bos|>`` 260 (prepended to every text when ``bos=True``). Optional ``merges`` (pairs of byte
symbols, e.g. ("Ġ", "x") for " x") get ids from 261 upwards.
"""

from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

def _cores_of_this_worker() -> None:
    """Under pytest-xdist, each worker and the processes it starts compute on cores of their own.

    torch's thread pool is as large as the machine in every process, so two workers (and the servers and clients
    they start) would each take every core and slow one another several-fold; with the worker's CPU affinity set
    here, splittune's ``auto`` thread count (``threads.available_cores``) sees only the worker's own cores.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    share = max(1, len(cores) // count)
    mine = cores[index * share:(index + 1) * share] if index * share < len(cores) else [cores[index % len(cores)]]
    os.sched_setaffinity(0, mine)
    import torch

    torch.set_num_threads(len(mine))


_cores_of_this_worker()

# The slowest tests (20-45 s each: served processes, Ray clusters, the bench) start first, so that the two workers end
# on short tests together rather than one of them finishing a long test alone (`make test` prints the slowest).
FIRST = ("tests/deploy/test_soak.py", "tests/engines/test_ray.py", "tests/bench/test_bench.py::test_quick_suite_smoke",
         "tests/deploy/test_rejoin.py", "tests/run/test_resume.py::test_killed_client_and_server_processes_resume_exactly",
         "tests/plan/test_max_leak.py", "tests/bench/test_footprint.py", "tests/deploy/test_deploy.py")


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=lambda item: next((k for k, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST)))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The ByteLevel alphabet in byte order (GPT-2's bytes_to_unicode), so symbol i stands for byte i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|bos|>"]  # ids 256..260


def build_tokenizer(
    chat: bool = False, merges: tuple[tuple[str, str], ...] = (), bos: bool = False, pad: bool = True
) -> PreTrainedTokenizerFast:
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>" if pad else None,
        bos_token="<|bos|>" if bos else None,
        additional_special_tokens=SPECIALS[1:4],
        model_max_length=1 << 20,
    )
    if chat:
        tok.chat_template = CHATML
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
        )
    return tok


@pytest.fixture(scope="session")
def byte_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(chat=True)


@pytest.fixture(scope="session")
def make_tok():
    return build_tokenizer


def mutate_frame(frame: bytearray, rng, times: int, grow: int) -> bytearray:
    """``frame`` flipped, cut or grown ``times`` times (the frame fuzz tests' mutations)."""
    for _ in range(times):
        what = rng.random()
        if what < 0.6 and frame:
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        elif what < 0.8 and frame:
            del frame[rng.randrange(len(frame)):]
        else:
            frame += bytes(rng.randrange(256) for _ in range(rng.randint(1, grow)))
    return frame


@pytest.fixture(scope="session")
def mutate():
    return mutate_frame


@pytest.fixture
def reads(monkeypatch):
    """Every checkpoint tensor a party reads from now on (contract 3: each party reads only its own)."""
    import safetensors

    import splittune.models.partition as partition

    read, real_open = [], safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(partition, "safe_open", Recording)
    return read
