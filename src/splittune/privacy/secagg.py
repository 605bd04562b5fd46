"""Secure aggregation of client updates (Bonawitz et al., CCS 2017), as pure protocol math.

The aggregator learns ``Σ_{i∈U} w_i x_i`` over the clients ``U`` whose masked inputs arrived, and nothing
else about any single ``x_i``. It is honest but curious: it follows the protocol, relays every message, and
tries to learn from what it sees. Every message is plain data - raw bytes, ints, floats, dicts of them and
tensors - so any wire carries it without pickle.

A round ``r`` (all randomness fresh per round, and ``r`` is mixed into every key derivation):

1. ``advertise``: client ``i`` draws two X25519 key pairs, ``c`` to encrypt shares to its peers and ``s`` to
   agree pairwise masks, and sends ``c_pk || s_pk`` (64 bytes). The aggregator returns the roster of all.
2. ``share_keys``: client ``i`` draws a self-mask seed ``b_i`` (32 bytes), Shamir-shares ``b_i`` and
   ``s_sk_i`` with threshold ``t`` among the roster, and encrypts peer ``j``'s two shares with
   ChaCha20-Poly1305 under ``HKDF(X25519(c_sk_i, c_pk_j), round, i, j)``. The aggregator only routes the
   ciphertexts; the clients that sent them form ``U1``.
3. ``mask``: ``y_i = enc(w_i x_i) + PRG(b_i) + Σ_{j∈U1, j≠i} ±PRG(s_ij)`` in ``Z_{2^64}`` (``+`` for
   ``j > i``, ``−`` for ``j < i``), ``s_ij = HKDF(X25519(s_sk_i, s_pk_j), round, min, max)``, so the pairwise
   masks cancel in any sum over all of ``U1``. ``enc`` is fixed point (``frac_bits`` fractional bits) in
   two's complement; PRG is the ChaCha20 keystream read as little-endian uint64; tensors are flattened in
   sorted-name order.
4. ``unmask``: the aggregator names the survivors ``U`` (masked input arrived) and the dropped
   ``D = U1 \\ U``. Each survivor returns its shares of ``b_j`` for ``j ∈ U`` and of ``s_sk_d`` for
   ``d ∈ D``; from ``t`` of them the aggregator rebuilds those secrets, subtracts ``PRG(b_j)`` and the
   pairwise masks between each ``d`` and each ``j ∈ U`` (which ``y_d`` would have cancelled), and decodes.

What it hides: one ``y_i`` is uniformly distributed in the ring whatever ``x_i`` is (the one-time pad
``PRG(b_i)``), and the pairwise masks keep any partial sum short of all of ``U`` uniform too. Double masking
protects a client the aggregator *falsely* reports as dropped: it then gets ``s_sk_i`` but never ``b_i``,
because a survivor never reveals both shares for one peer in a round. Fewer than ``t`` colluding clients
learn nothing from their shares (Shamir).

What it does not hide or prevent: the sum itself (with two survivors, each learns the other's input from
it and its own); who took part, message sizes and timing; a *malicious* aggregator beyond the double-mask
rule (it may e.g. claim different survivor sets to different clients; the paper's consistency round and
``t > n/2`` are needed then); there are no signatures, so an active attacker that replaces public keys in
the roster is out of scope (authenticate the roster out of band, e.g. over the channel's mutual TLS).
Nothing checks that ``x_i`` is honest (no robustness against poisoned updates).

Why fresh keys every round: a dropped client's ``s_sk`` is revealed to the aggregator; were it reused, the
aggregator would learn the client's pairwise masks in a later round, in which the client may survive and its
``b`` is revealed too.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypedDict

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "SecAggError", "SecAggClient", "SecAggAggregator", "Aggregate", "MaskedInput", "UnmaskShares",
    "SeededRandom", "shamir_split", "shamir_combine", "encode", "decode", "layout_of", "prg",
    "default_threshold", "check_threshold", "payload_bytes", "upload_bytes",
    "PRIME", "ADVERT_BYTES", "SHARE_BYTES", "CIPHERTEXT_BYTES", "COMMIT_BYTES", "DEFAULT_FRAC_BITS",
]

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


# -- the parties --------------------------------------------------------------------------------------------
class SecAggClient:
    """One client's side of every round. It keeps its secrets (keys, b_i, the peers' shares) and enforces
    the rules that protect it from an aggregator asking too much: never both shares of one peer in a round,
    never to fewer than ``t`` survivors, never for a client it did not mask with."""

    def __init__(self, index: int, threshold: int, *, frac_bits: int = DEFAULT_FRAC_BITS, rand: Rand | None = None):
        self.index = _check_id(index)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise SecAggError(f"threshold t={threshold!r} must be an integer >= 1 (and <= the number of clients)")
        self.threshold = threshold
        self.frac_bits = _check_frac_bits(frac_bits)
        self._rand = rand or os.urandom
        self.sent: dict[str, int] = {}  # payload bytes sent per phase in the current round
        self._phase = "idle"

    def _need(self, phase: str, what: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"client {self.index}: {what} needs the round to be at {phase!r}, it is at {self._phase!r}")

    def advertise(self, round: int) -> bytes:
        """Start ``round`` with two fresh key pairs; return ``c_pk | s_pk`` (64 raw bytes)."""
        self.round = _check_round(round)
        self._c_sk = X25519PrivateKey.from_private_bytes(self._rand(32))
        self._s_sk = X25519PrivateKey.from_private_bytes(self._rand(32))
        self._advert = self._c_sk.public_key().public_bytes_raw() + self._s_sk.public_key().public_bytes_raw()
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (share of b_peer, share of s_sk_peer)
        self._revealed_b: set[int] = set()
        self._revealed_s: set[int] = set()
        self.sent = {"advertise": ADVERT_BYTES}
        self._phase = "advertised"
        return self._advert

    def share_keys(self, roster: Mapping[int, bytes]) -> dict[int, bytes]:
        """Shamir-share b_i and s_sk_i among the roster and encrypt each peer's two shares to it
        (recipient -> ciphertext); the aggregator relays what it cannot read."""
        self._need("advertised", "share_keys")
        roster = _check_roster(roster)
        if roster.get(self.index) != self._advert:
            raise SecAggError(f"client {self.index}: the roster's advert for it is not the one it sent")
        check_threshold(self.threshold, len(roster))
        self._roster = roster
        self._b = self._rand(SECRET_BYTES)
        points = [j + 1 for j in roster]
        b_shares = shamir_split(self._b, self.threshold, points, self._rand)
        s_shares = shamir_split(self._s_sk.private_bytes_raw(), self.threshold, points, self._rand)
        out = {}
        for j, advert in roster.items():
            if j == self.index:
                self._held[j] = (b_shares[j + 1], s_shares[j + 1])
                continue
            key = _kdf(_dh(self._c_sk, advert[:32], f"client {j}"), b"share", self.round, self.index, j)
            nonce = self._rand(_NONCE_BYTES)
            out[j] = nonce + ChaCha20Poly1305(key).encrypt(nonce, b_shares[j + 1] + s_shares[j + 1],
                                                           _share_aad(self.round, self.index, j))
        self.sent["share_keys"] = payload_bytes(out)
        self._phase = "shared"
        return out

    def _open(self, sender: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        sender = _check_id(sender, "sender")
        if sender == self.index or sender not in self._roster:
            raise SecAggError(f"client {self.index}: inbox holds a share from {sender}, not a peer in the roster")
        where = f"share from client {sender} to client {self.index} in round {self.round}"
        if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) != CIPHERTEXT_BYTES:
            raise SecAggError(f"{where} must be {CIPHERTEXT_BYTES} bytes")
        key = _kdf(_dh(self._c_sk, self._roster[sender][:32], f"client {sender}"), b"share", self.round, sender, self.index)
        try:
            plain = ChaCha20Poly1305(key).decrypt(bytes(ciphertext[:_NONCE_BYTES]), bytes(ciphertext[_NONCE_BYTES:]),
                                                  _share_aad(self.round, sender, self.index))
        except InvalidTag:
            raise SecAggError(f"{where} failed to decrypt: tampered with, misrouted or from another round") from None
        b_share, s_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        for share in (b_share, s_share):
            if _parse_share(share)[0] != self.index + 1:
                raise SecAggError(f"{where} is a share for another client")
        return b_share, s_share

    def mask(self, tensors: Mapping[str, Any], weight: float, inbox: Mapping[int, bytes]) -> MaskedInput:
        """Decrypt the peers' shares (``inbox``: sender -> ciphertext) and return y_i = enc(w_i x_i) + PRG(b_i)
        + Σ ±PRG(s_ij) over the senders: a client that dropped before sharing is in no one's masks."""
        self._need("shared", "mask")
        weight = _check_weight(weight, f"client {self.index}")
        opened = {int(j): self._open(j, ct) for j, ct in sorted(inbox.items())}
        if len(opened) + 1 < self.threshold:
            raise SecAggError(f"client {self.index}: only {len(opened)} peers shared keys, fewer than threshold "
                              f"t={self.threshold} minus itself; the round cannot be unmasked")
        y = encode(tensors, weight=weight, frac_bits=self.frac_bits, n=len(self._roster))
        layout = layout_of(tensors)
        y += _self_mask(self._b, self.round, self.index, len(y))
        for j in opened:
            p = _pair_mask(self._s_sk, self._roster[j][32:], self.round, self.index, j, len(y))
            if j > self.index:
                y += p
            else:
                y -= p
        words, at = {}, 0
        for name, shape in layout:
            size = math.prod(shape)
            words[name] = torch.from_numpy(y[at:at + size].view(np.int64).reshape(shape))
            at += size
        self._held.update(opened)
        self._u1 = set(opened) | {self.index}
        message: MaskedInput = {"weight": weight, "commit": _commit(self.round, self.index, self._b), "words": words}
        self.sent["mask"] = payload_bytes(message)
        self._phase = "masked"
        return message

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> UnmaskShares:
        """Reveal the shares of b_j for each survivor j and of s_sk_d for each dropped d - refusing any peer
        in both kinds (in this request or with an earlier one of the round: that would unmask its input), a
        survivor set below ``t``, or lists that do not cover exactly the clients it masked with."""
        self._need("masked", "unmask")
        U, D = {_check_id(j, "survivor") for j in survivors}, {_check_id(d, "dropped client") for d in dropped}
        me = f"client {self.index}"
        if U & D:
            raise SecAggError(f"{me} refuses: clients {sorted(U & D)} are listed both as survivors and as dropped; "
                              f"revealing both of their shares would unmask their inputs")
        again = (U & self._revealed_s) | (D & self._revealed_b)
        if again:
            raise SecAggError(f"{me} refuses: for clients {sorted(again)} it already revealed the other kind of share "
                              f"this round; revealing both would unmask their inputs")
        if self.index not in U:
            raise SecAggError(f"{me} refuses: it is not listed among the survivors, yet it is asked to unmask")
        if len(U) < self.threshold:
            raise SecAggError(f"{me} refuses: {len(U)} survivors are fewer than the threshold t={self.threshold}")
        if U | D != self._u1:
            raise SecAggError(f"{me} refuses: survivors and dropped must be exactly the {len(self._u1)} clients it masked "
                              f"with {sorted(self._u1)}; missing {sorted(self._u1 - U - D)}, unknown {sorted((U | D) - self._u1)}")
        self._revealed_b |= U
        self._revealed_s |= D
        reply: UnmaskShares = {"b": {j: self._held[j][0] for j in sorted(U)}, "s": {d: self._held[d][1] for d in sorted(D)}}
        self.sent["unmask"] = payload_bytes(reply)
        return reply


@dataclass
class Aggregate:
    """What the aggregator learns: ``Σ_{i∈U} w_i x_i`` by name (decoded), the integer ring sum by name (int64:
    exactly the sum of the fixed-point encodings), ``Σ_{i∈U} w_i`` to divide by, and who was in it."""
    tensors: dict[str, torch.Tensor]
    weight: float
    words: dict[str, np.ndarray]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    round: int = 0
    frac_bits: int = DEFAULT_FRAC_BITS
    layout: Layout = field(default=())

    def average(self) -> dict[str, torch.Tensor]:
        """The weighted mean ``Σ w_i x_i / Σ w_i``."""
        return {name: t / self.weight for name, t in self.tensors.items()}


class SecAggAggregator:
    """The honest-but-curious server of every round: relays share ciphertexts it cannot read, sums the masked
    inputs, and strips the masks with the survivors' shares - learning only the weighted sum over them."""

    def __init__(self, threshold: int, *, frac_bits: int = DEFAULT_FRAC_BITS):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise SecAggError(f"threshold t={threshold!r} must be an integer >= 1 (and <= the number of clients)")
        self.threshold = threshold
        self.frac_bits = _check_frac_bits(frac_bits)
        self._phase = "idle"

    def _need(self, phase: str, what: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"aggregator: {what} needs the round to be at {phase!r}, it is at {self._phase!r}")

    def start_round(self, round: int, adverts: Mapping[int, bytes]) -> dict[int, bytes]:
        """Collect the clients' adverts into the roster every client receives (id -> 64 bytes)."""
        self.round = _check_round(round)
        roster = _check_roster(adverts)
        check_threshold(self.threshold, len(roster))
        self._roster = roster
        self._phase = "roster"
        return dict(roster)

    def route_shares(self, outgoing: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Turn sender -> {recipient -> ciphertext} into each recipient's inbox {sender -> ciphertext}. The
        senders are U1, the clients the round continues with; at least ``t`` must have sent."""
        self._need("roster", "route_shares")
        u1 = sorted(_check_id(i, "sender") for i in outgoing)
        unknown = [i for i in u1 if i not in self._roster]
        if unknown:
            raise SecAggError(f"aggregator: clients {unknown} sent shares but are not in the roster")
        if len(u1) < self.threshold:
            raise SecAggError(f"aggregator: only {len(u1)} clients shared keys, fewer than the threshold t={self.threshold}; "
                              f"the round is abandoned")
        for i in u1:
            sent = outgoing[i]
            missing = [j for j in u1 if j != i and j not in sent]
            if missing:
                raise SecAggError(f"aggregator: client {i} sent no share to clients {missing}")
            bad = [j for j in u1 if j != i and (not isinstance(sent[j], (bytes, bytearray)) or len(sent[j]) != CIPHERTEXT_BYTES)]
            if bad:
                raise SecAggError(f"aggregator: client {i}'s shares to {bad} are not {CIPHERTEXT_BYTES}-byte ciphertexts")
        self._u1 = u1
        self._phase = "routed"
        return {j: {i: bytes(outgoing[i][j]) for i in u1 if i != j} for j in u1}

    def collect_masked(self, masked: Mapping[int, MaskedInput]) -> tuple[list[int], list[int]]:
        """Take the masked inputs that arrived and return (survivors, dropped), the request every survivor
        answers with ``unmask``. Refuses fewer than ``t`` survivors and inputs whose tensors do not line up."""
        self._need("routed", "collect_masked")
        arrived = sorted(_check_id(i, "client") for i in masked)
        strangers = [i for i in arrived if i not in self._u1]
        if strangers:
            raise SecAggError(f"aggregator: masked inputs from {strangers}, which did not share keys this round")
        if len(arrived) < self.threshold:
            raise SecAggError(f"aggregator: only {len(arrived)} masked inputs arrived, fewer than the threshold "
                              f"t={self.threshold}; the round cannot be unmasked and is abandoned")
        first = masked[arrived[0]]["words"]
        if not first:
            raise SecAggError(f"aggregator: client {arrived[0]} sent no tensors")
        layout = tuple((name, tuple(first[name].shape)) for name in sorted(first))
        inputs = {}
        for i in arrived:
            m = masked[i]
            commit = m.get("commit")
            if not isinstance(commit, (bytes, bytearray)) or len(commit) != COMMIT_BYTES:
                raise SecAggError(f"aggregator: client {i}'s commitment must be {COMMIT_BYTES} bytes")
            inputs[i] = (_check_weight(m.get("weight"), f"client {i}"), bytes(commit),
                         _words_of(m["words"], layout, f"client {i}"))
        self._layout, self._inputs = layout, inputs
        self._survivors, self._dropped = arrived, [i for i in self._u1 if i not in inputs]
        self._phase = "collected"
        return list(self._survivors), list(self._dropped)

    def finish(self, responses: Mapping[int, UnmaskShares], dtype: torch.dtype = torch.float64) -> Aggregate:
        """Rebuild b_j (j survived) and s_sk_d (d dropped) from ``t`` survivors' shares, strip the masks and
        decode the sum. Any ``t`` of the survivors suffice; the rest may have dropped meanwhile."""
        self._need("collected", "finish")
        U, D = self._survivors, self._dropped
        responders = sorted(_check_id(i, "responder") for i in responses)
        strangers = [i for i in responders if i not in self._inputs]
        if strangers:
            raise SecAggError(f"aggregator: shares from {strangers}, which are not survivors of this round")
        if len(responders) < self.threshold:
            raise SecAggError(f"aggregator: only {len(responders)} survivors answered, fewer than the threshold "
                              f"t={self.threshold}; the masks cannot be removed")
        for i in responders:
            r = responses[i]
            if sorted(r.get("b", {})) != U or sorted(r.get("s", {})) != D:
                raise SecAggError(f"aggregator: client {i} answered with b-shares for {sorted(r.get('b', {}))} and "
                                  f"s-shares for {sorted(r.get('s', {}))}; asked for {U} and {D}")
        chosen = responders[:self.threshold]
        total = np.zeros_like(next(iter(self._inputs.values()))[2])
        for j in U:
            total += self._inputs[j][2]
        for j in U:
            b = shamir_combine(responses[i]["b"][j] for i in chosen)
            if _commit(self.round, j, b) != self._inputs[j][1]:
                raise SecAggError(f"aggregator: the self-mask seed rebuilt for client {j} does not match its commitment "
                                  f"(shares corrupt, or clients disagree on the threshold)")
            total -= _self_mask(b, self.round, j, len(total))
        self._remove_dropped(total, {d: shamir_combine(responses[i]["s"][d] for i in chosen) for d in D})
        words, at = {}, 0
        for name, shape in self._layout:
            size = math.prod(shape)
            words[name] = total[at:at + size].view(np.int64).reshape(shape)
            at += size
        self._phase = "done"
        return Aggregate(tensors=decode(total, self._layout, frac_bits=self.frac_bits, dtype=dtype),
                         weight=math.fsum(self._inputs[j][0] for j in U), words=words, survivors=tuple(U),
                         dropped=tuple(D), round=self.round, frac_bits=self.frac_bits, layout=self._layout)

    def _remove_dropped(self, total: np.ndarray, s_keys: Mapping[int, bytes]) -> None:
        """Subtract, for each dropped d and survivor j, the pairwise mask j added for d (y_d would have
        cancelled it). Each rebuilt s_sk_d is checked against the s_pk_d of the roster."""
        for d, raw in s_keys.items():
            sk = X25519PrivateKey.from_private_bytes(raw)
            if sk.public_key().public_bytes_raw() != self._roster[d][32:]:
                raise SecAggError(f"aggregator: the mask key rebuilt for dropped client {d} does not match its public key "
                                  f"(shares corrupt, or clients disagree on the threshold)")
            for j in self._survivors:
                p = _pair_mask(sk, self._roster[j][32:], self.round, d, j, len(total))
                if d > j:  # j added +PRG(s_jd) for a peer above it
                    total -= p
                else:
                    total += p
