"""The C allocator (glibc's) made to give freed memory back, so a party's peak is what it holds, not what it once held.

glibc serves a block above its mmap threshold with mmap and unmaps it on free, but each time such a block is
freed it raises the threshold to that block's size (up to 32 MiB on 64-bit). After a few steps the large,
short-lived tensors of a step (a weight dequantized for one product, an attention matrix, a chunk of
logits) come from the heap, whose freed space stays with the process and fragments between tensors that
live on. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, what the ``MALLOC_MMAP_THRESHOLD_`` variable
does, which a user may set instead and we then leave alone) keeps large blocks mapped and returned. Measured
on the Llama-3.2-1B-shaped memory bench (docs/benchmarks.md): the int8 server's peak 1.82 → 1.53 GiB, nf4's
1.16 → 1.07 (the planner's estimates 1.47 and 1.06). Other platforms' allocators are their own business.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20  # bytes: smaller blocks stay on the heap (mapping every small tensor costs page faults)

_libc: ctypes.CDLL | bool | None = None
_fixed = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _libc.mallopt, _libc.malloc_trim  # musl has neither
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold for this process (once; not when the user set ``MALLOC_MMAP_THRESHOLD_``);
    whether it was set now."""
    global _fixed
    if _fixed or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _fixed = True
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def return_freed() -> None:
    """Hand the heap's free pages back to the system now (``malloc_trim``): after quantizing a segment, the
    full-precision working copies freed between many small packed tensors that stay leave holes glibc keeps
    (measured on a Llama-3.2-1B-shaped trunk: 1.7 GiB resident where the packed weights take 0.4)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
