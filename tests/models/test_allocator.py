"""A party that quantizes gives large freed blocks back to the system at once (glibc's mmap threshold fixed); one
that does not keeps glibc's default (faster steps), and a threshold the user set is left alone."""

import pytest

from configs import tiny
from splittune import allocator
from splittune.config import load_config
from splittune.run import build


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_libc", fake)
    monkeypatch.setattr(allocator, "_fixed", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return fake


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_only_a_quantizing_party_fixes_the_mmap_threshold(libc, quantize):
    client, server, link, _ = build(load_config(None, tiny("cuts=[1,3]", f"quantize.trunk={quantize}")))
    link.close()
    server.close()
    assert libc.calls == ([(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD)] if quantize == "nf4" else [])


def test_a_threshold_the_user_set_wins(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert allocator.return_large_blocks() is False and libc.calls == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert allocator.return_large_blocks() is True and allocator.return_large_blocks() is False  # once per process
    assert libc.calls == [(-3, 1 << 20)]
