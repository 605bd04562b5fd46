"""The pieces secure aggregation (``secagg.py``) is built from: Shamir secret sharing over GF(2^127 - 1), fixed point
in the ring Z/2^64, the PRG that expands a seed into a mask, key derivation and agreement, the checks on what a party
is given, and the sizes of its messages. Each is small, pure and tested on its own (tests/dpmath/test_secagg.py)."""

from __future__ import annotations

import hashlib
import math
import os
import struct
from typing import Any, Callable, Iterable, Mapping, TypedDict

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Rand = Callable[[int], bytes]  # n -> n random bytes; os.urandom unless a caller (a test) passes a SeededRandom
Layout = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in sorted-name order: the flattening order

PRIME = 2**127 - 1  # Mersenne prime: Shamir's field; a secret is shared in 15-byte chunks, each < PRIME
_CHUNK = 15
_FIELD_BYTES = 16
SECRET_BYTES = 32  # b_i and s_sk_i
SHARE_BYTES = 6 + _FIELD_BYTES * math.ceil(SECRET_BYTES / _CHUNK)  # x (u32) | length (u16) | 3 field elements = 54
ADVERT_BYTES = 64  # c_pk | s_pk
_NONCE_BYTES, _TAG_BYTES = 12, 16
CIPHERTEXT_BYTES = _NONCE_BYTES + 2 * SHARE_BYTES + _TAG_BYTES  # one peer's two shares, encrypted = 136
COMMIT_BYTES = 32
DEFAULT_FRAC_BITS = 32
_MAX_ID = 2**32 - 2  # a client id i is the Shamir point i + 1, a u32
_DOMAIN = b"splittune/secagg/v1/"


class SecAggError(ValueError):
    """A refusal of the secure-aggregation protocol; the message names the client, tensor or bound at fault."""


# -- randomness ---------------------------------------------------------------------------------------------
class SeededRandom:
    """Reproducible randomness for tests and replays: the ChaCha20 keystream under SHA-256 of the seed.

    The masks are exactly as secret as the seed, so production code leaves ``rand`` unset (``os.urandom``)."""

    def __init__(self, seed: bytes | str | int):
        if isinstance(seed, int):
            seed = str(seed).encode()
        elif isinstance(seed, str):
            seed = seed.encode()
        key = hashlib.sha256(_DOMAIN + b"seeded-random/" + bytes(seed)).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


# -- checks -------------------------------------------------------------------------------------------------
def default_threshold(n: int) -> int:
    """``n // 2 + 1``: a majority, so two disjoint groups of survivors can never both unmask (paper, §4)."""
    return n // 2 + 1


def check_threshold(threshold: int, n: int) -> None:
    """Refuse a threshold outside ``1..n``, saying what is allowed."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= n:
        raise SecAggError(f"threshold t={threshold!r} is not allowed for n={n} clients: t must be an integer in "
                          f"1..{n} (a majority, t={default_threshold(n)}, is the usual choice)")


def _check_id(i: Any, what: str = "client id") -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) <= _MAX_ID:
        raise SecAggError(f"{what} {i!r} must be an integer in 0..{_MAX_ID}")
    return int(i)


def _check_round(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= int(r) < 2**64:
        raise SecAggError(f"round {r!r} must be an integer in 0..2^64-1")
    return int(r)


def _check_frac_bits(f: Any) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= 62:
        raise SecAggError(f"frac_bits={f!r} must be an integer in 0..62")
    return f


def _check_weight(w: Any, who: str) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise SecAggError(f"weight of {who} is not a number: {w!r}") from None
    if not (math.isfinite(w) and w > 0):
        raise SecAggError(f"weight of {who} must be finite and > 0, got {w}")
    return w


def _check_roster(adverts: Mapping[int, bytes]) -> dict[int, bytes]:
    roster = {}
    for i, advert in adverts.items():
        i = _check_id(i)
        if not isinstance(advert, (bytes, bytearray)) or len(advert) != ADVERT_BYTES:
            raise SecAggError(f"advert of client {i} must be {ADVERT_BYTES} bytes (c_pk | s_pk), got "
                              f"{len(advert) if isinstance(advert, (bytes, bytearray)) else type(advert).__name__}")
        roster[i] = bytes(advert)
    return dict(sorted(roster.items()))


# -- Shamir secret sharing over GF(2^127 - 1) ---------------------------------------------------------------
def shamir_split(secret: bytes, threshold: int, points: int | Iterable[int], rand: Rand | None = None) -> dict[int, bytes]:
    """Split ``secret`` so that any ``threshold`` shares rebuild it and fewer reveal nothing about it.

    ``points`` are the evaluation points (distinct, in ``1..2^32-1``), or ``n`` for ``1..n``. Each 15-byte
    chunk is the constant term of its own random polynomial of degree ``threshold - 1``. A share is
    ``x (u32) | secret length (u16) | one 16-byte field element per chunk``, keyed by its point."""
    xs = list(range(1, points + 1)) if isinstance(points, int) else [int(x) for x in points]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 2**32 - 1 for x in xs):
        raise SecAggError(f"Shamir points must be distinct integers in 1..2^32-1, got {xs}")
    check_threshold(threshold, len(xs))
    if not 1 <= len(secret) <= 0xFFFF:
        raise SecAggError(f"a Shamir secret must be 1..65535 bytes, got {len(secret)}")
    rand = rand or os.urandom
    polys = [[int.from_bytes(secret[k:k + _CHUNK], "big")] + [int.from_bytes(rand(16), "big") % PRIME for _ in range(threshold - 1)]
             for k in range(0, len(secret), _CHUNK)]
    shares = {}
    for x in xs:
        ys = []
        for poly in polys:
            acc = 0
            for c in reversed(poly):  # Horner
                acc = (acc * x + c) % PRIME
            ys.append(acc.to_bytes(_FIELD_BYTES, "big"))
        shares[x] = struct.pack(">IH", x, len(secret)) + b"".join(ys)
    return shares


def _parse_share(share: bytes) -> tuple[int, int, list[int]]:
    if not isinstance(share, (bytes, bytearray)) or len(share) < 6:
        raise SecAggError("a Shamir share must be bytes of at least 6")
    x, length = struct.unpack_from(">IH", share)
    chunks = math.ceil(length / _CHUNK)
    if x == 0 or length == 0 or len(share) != 6 + _FIELD_BYTES * chunks:
        raise SecAggError(f"malformed Shamir share (point {x}, secret length {length}, {len(share)} bytes)")
    ys = [int.from_bytes(share[6 + k * _FIELD_BYTES:6 + (k + 1) * _FIELD_BYTES], "big") for k in range(chunks)]
    if any(y >= PRIME for y in ys):
        raise SecAggError(f"Shamir share at point {x} holds a value outside the field")
    return x, length, ys


def shamir_combine(shares: Iterable[bytes]) -> bytes:
    """Rebuild the secret by Lagrange interpolation at 0. With fewer shares than the threshold the result
    is a wrong secret of the right length (nothing can tell): check it against a commitment or public key."""
    parsed = [_parse_share(s) for s in shares]
    if not parsed:
        raise SecAggError("no Shamir shares to combine")
    xs = [x for x, _, _ in parsed]
    lengths = {length for _, length, _ in parsed}
    if len(set(xs)) != len(xs):
        raise SecAggError(f"Shamir shares repeat a point: {sorted(xs)}")
    if len(lengths) != 1:
        raise SecAggError(f"Shamir shares disagree on the secret length: {sorted(lengths)}")
    length = lengths.pop()
    lagrange = []
    for k, xk in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != k:
                num = num * xm % PRIME
                den = den * (xm - xk) % PRIME
        lagrange.append(num * pow(den, -1, PRIME) % PRIME)
    out = bytearray()
    for c in range(math.ceil(length / _CHUNK)):
        value = sum(l * ys[c] for l, (_, _, ys) in zip(lagrange, parsed)) % PRIME
        size = min(_CHUNK, length - c * _CHUNK)
        out += (value % (1 << (8 * size))).to_bytes(size, "big")
    return bytes(out)


# -- fixed point in Z_{2^64} --------------------------------------------------------------------------------
def layout_of(tensors: Mapping[str, Any]) -> Layout:
    """The (name, shape) list in sorted-name order: how every party flattens and splits the vector."""
    if not tensors:
        raise SecAggError("no tensors to aggregate")
    if any(not isinstance(name, str) for name in tensors):
        raise SecAggError(f"tensor names must be strings, got {sorted(map(repr, tensors))}")
    return tuple((name, tuple(int(d) for d in tensors[name].shape)) for name in sorted(tensors))


def _float64(t: Any, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise SecAggError(f"tensor {name!r} has dtype {t.dtype}; secure aggregation takes real (float or int) tensors")
        return t.detach().to("cpu", torch.float64).numpy().ravel()
    a = np.asarray(t)
    if a.dtype.kind not in "fiu":
        raise SecAggError(f"tensor {name!r} has dtype {a.dtype}; secure aggregation takes real (float or int) tensors")
    return a.astype(np.float64).ravel()


def encode(tensors: Mapping[str, Any], *, weight: float = 1.0, frac_bits: int = DEFAULT_FRAC_BITS, n: int = 1) -> np.ndarray:
    """``round(w·x·2^frac_bits)`` as two's-complement uint64, flattened in sorted-name order.

    Refuses any value whose magnitude, summed over ``n`` clients, could leave the signed 64-bit range: a sum
    that wraps would decode to garbage with no way to notice. The bound is ``2^(63 - frac_bits) / n``."""
    f = _check_frac_bits(frac_bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SecAggError(f"n={n!r} (clients summed) must be an integer >= 1")
    w = float(weight)
    if not math.isfinite(w):
        raise SecAggError(f"weight must be finite, got {weight}")
    limit = (2**63 - 1) // n
    scale = 2.0**f
    parts = []
    for name, _ in layout_of(tensors):
        v = _float64(tensors[name], name) * w * scale
        if not np.all(np.isfinite(v)):
            raise SecAggError(f"tensor {name!r} has non-finite values (after the weight {w})")
        r = np.rint(v)
        peak = float(np.max(np.abs(r))) if r.size else 0.0
        if peak >= float(limit):
            raise SecAggError(f"tensor {name!r} overflows the ring: |w·x| reaches {peak / scale:.6g}, but with {f} fractional "
                              f"bits a sum over n={n} clients only fits below {limit / scale:.6g}; lower frac_bits, "
                              f"scale the weights down or clip the update")
        parts.append(r.astype(np.int64).view(np.uint64))
    return np.concatenate(parts)


def decode(words: np.ndarray, layout: Layout, *, frac_bits: int = DEFAULT_FRAC_BITS,
           dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The flat ring vector back to tensors by name: signed, divided by ``2^frac_bits``."""
    f = _check_frac_bits(frac_bits)
    words = np.asarray(words)
    total = sum(math.prod(shape) for _, shape in layout)
    if words.dtype not in (np.uint64, np.int64) or words.shape != (total,):
        raise SecAggError(f"decode takes a flat uint64 vector of {total} words, got {words.dtype} {words.shape}")
    values = words.view(np.int64).astype(np.float64) / 2.0**f
    out, at = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = torch.from_numpy(values[at:at + size].copy()).reshape(shape).to(dtype)
        at += size
    return out


def prg(seed: bytes, n_words: int) -> np.ndarray:
    """``n_words`` uniform ring elements: the ChaCha20 keystream under the 32-byte ``seed`` (zero nonce: every
    seed is derived for one use), read as little-endian uint64. Read-only."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * n_words))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


# -- key derivation -----------------------------------------------------------------------------------------
def _kdf(material: bytes, label: bytes, *fields: int) -> bytes:
    info = _DOMAIN + label + b"".join(struct.pack(">Q", v) for v in fields)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def _dh(sk: X25519PrivateKey, pk: bytes, who: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as e:
        raise SecAggError(f"public key of {who} is unusable for X25519 ({e})") from None


def _self_mask(b: bytes, rnd: int, i: int, n_words: int) -> np.ndarray:
    return prg(_kdf(b, b"self", rnd, i), n_words)


def _pair_mask(s_sk: X25519PrivateKey, peer_s_pk: bytes, rnd: int, me: int, peer: int, n_words: int) -> np.ndarray:
    """PRG(s_ij): the same words for i and j (X25519 and the (min, max) pair are symmetric)."""
    return prg(_kdf(_dh(s_sk, peer_s_pk, f"client {peer}"), b"pair", rnd, min(me, peer), max(me, peer)), n_words)


def _commit(rnd: int, i: int, b: bytes) -> bytes:
    """Binds b_i so the aggregator can tell a wrong reconstruction (inconsistent t, corrupt shares) from a
    sum; b_i is 32 uniform bytes, so its hash reveals nothing useful."""
    return hashlib.sha256(_DOMAIN + b"commit" + struct.pack(">QI", rnd, i) + b).digest()


def _share_aad(rnd: int, sender: int, recipient: int) -> bytes:
    return _DOMAIN + b"share" + struct.pack(">QII", rnd, sender, recipient)


# -- messages -----------------------------------------------------------------------------------------------
class MaskedInput(TypedDict):
    """Client -> aggregator, phase 3. ``words``: y_i by tensor name, same shapes as the inputs, as int64 bit
    patterns of the uint64 ring elements (a raw int64 wire codec carries them); ``weight``: w_i (public);
    ``commit``: SHA-256 binding of b_i."""
    weight: float
    commit: bytes
    words: dict[str, torch.Tensor]


class UnmaskShares(TypedDict):
    """Survivor -> aggregator, phase 4: its share of b_j per survivor j, of s_sk_d per dropped d."""
    b: dict[int, bytes]
    s: dict[int, bytes]


def payload_bytes(message: Any) -> int:
    """Payload bytes of a message: bytes, tensors and arrays by size, numbers as 8; dict keys and framing are
    the wire's business and not counted."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return len(message)
    if isinstance(message, torch.Tensor):
        return message.numel() * message.element_size()
    if isinstance(message, np.ndarray):
        return int(message.nbytes)
    if isinstance(message, (int, float, np.integer, np.floating)):
        return 8
    if isinstance(message, Mapping):
        return sum(payload_bytes(v) for v in message.values())
    if isinstance(message, (list, tuple)):
        return sum(payload_bytes(v) for v in message)
    raise TypeError(f"cannot size a {type(message).__name__}")


def upload_bytes(n: int, n_values: int, survivors: int | None = None, dropped: int = 0) -> dict[str, int]:
    """Payload bytes one client sends per phase of a round with ``n`` clients and ``n_values`` tensor values
    (``survivors`` defaults to ``n - dropped``). What it receives: the roster (64·n), its inbox
    ((n-1)·136) and the survivor/dropped lists."""
    survivors = n - dropped if survivors is None else survivors
    return {"advertise": ADVERT_BYTES, "share_keys": (n - 1) * CIPHERTEXT_BYTES,
            "mask": 8 + COMMIT_BYTES + 8 * n_values, "unmask": (survivors + dropped) * SHARE_BYTES}


def _words_of(words: Mapping[str, Any], layout: Layout, who: str) -> np.ndarray:
    """A masked input's words, checked against the round's layout, as one flat uint64 vector."""
    names, want = sorted(words), [name for name, _ in layout]
    if names != want:
        missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
        raise SecAggError(f"tensor names of {who} differ from the other clients': missing {missing}, unexpected {extra}")
    parts = []
    for name, shape in layout:
        t = words[name]
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        if tuple(a.shape) != shape:
            raise SecAggError(f"tensor {name!r} of {who} has shape {tuple(a.shape)}, the other clients' {shape}")
        if a.dtype not in (np.int64, np.uint64):
            raise SecAggError(f"masked words {name!r} of {who} must be int64 or uint64, got {a.dtype}")
        parts.append(np.ascontiguousarray(a).view(np.uint64).ravel())
    return np.concatenate(parts)
