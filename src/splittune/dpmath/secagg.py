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

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .masking import (  # noqa: F401  (re-exported: the protocol's names are found here)
    ADVERT_BYTES, CIPHERTEXT_BYTES, COMMIT_BYTES, DEFAULT_FRAC_BITS, Layout, MaskedInput, PRIME, Rand, SECRET_BYTES,
    SHARE_BYTES, SecAggError, SeededRandom, UnmaskShares, check_threshold, decode, default_threshold, encode,
    layout_of, payload_bytes, prg, shamir_combine, shamir_split, upload_bytes,
)
from .masking import (_NONCE_BYTES, _check_frac_bits, _check_id, _check_roster, _check_round, _check_weight, _commit, _dh, _kdf,
                      _pair_mask, _parse_share, _self_mask, _share_aad, _words_of)

__all__ = [
    "SecAggError", "SecAggClient", "SecAggAggregator", "Aggregate", "MaskedInput", "UnmaskShares",
    "SeededRandom", "shamir_split", "shamir_combine", "encode", "decode", "layout_of", "prg",
    "default_threshold", "check_threshold", "payload_bytes", "upload_bytes",
    "PRIME", "ADVERT_BYTES", "SHARE_BYTES", "CIPHERTEXT_BYTES", "COMMIT_BYTES", "DEFAULT_FRAC_BITS",
]


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
