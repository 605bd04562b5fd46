"""Bytes and codec time of every crossing of a step, from the real chain and frame encoding.

A dummy message of the right shapes goes through the client's chain into a frame, through the server's
chain, and the server's reply back, exactly as in a run (``cut/chain.py``, ``wire/frames.py``): the bytes
the planner predicts are the bytes the run counts, whatever the codecs and padding removal do. Frames
depend only on shapes, so each distinct crossing is encoded once and remembered.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass

import msgpack
import torch

from ..cut.chain import Chain, terms_from
from ..models.partition import DTYPES
from ..wire import Message
from .batches import Micro

SESSION = "0" * 12  # a session id is 12 hex characters
LINK = {"server_s": 0.0}  # what the server's link adds to every reply's meta


@dataclass(frozen=True)
class Trip:
    """One round trip: the request's and the reply's frame bytes, and each end's codec seconds."""

    up: int
    down: int
    encode_s: float  # the client encodes the request
    decode_s: float  # the client decodes the reply
    server_s: float  # the server decodes the request and encodes the reply


def _int_class(n: int) -> int:
    """A number of the same msgpack width as ``n`` (a frame's size depends on the width, not the value)."""
    return {1: 1, 2: 200, 3: 60000, 5: 70000}.get(len(msgpack.packb(n)), 2**33)


def codec_key(codec: dict) -> str:
    """A run's ``codec:`` section as a key (``cfg.codec.model_dump()``)."""
    return json.dumps(codec, sort_keys=True)


def trips(codec: str, padding_removal: bool, shape: str, micro: Micro, width: int, dtype: str, want_grad: bool,
          num_items: int) -> list[Trip]:
    """The round trips of one training micro-batch (``codec``: a ``codec_key``): U-shape: activations then
    gradients; two-part: activations (with the labels) answered by the gradient."""
    return _trips(codec, padding_removal, shape, micro.rows, micro.width,
                  micro.kept if padding_removal else micro.rows * micro.width, width, dtype, want_grad, _int_class(num_items))


def step_trip(codec: str, padding_removal: bool) -> Trip:
    """The ``step`` message (the global gradient norm) and its reply."""
    return _step_trip(codec, padding_removal)


def _chains(codec_json: str, padding_removal: bool) -> tuple[Chain, Chain]:
    terms = terms_from(json.loads(codec_json), padding_removal)
    return Chain(terms, "client"), Chain(terms, "server")


def _trip(client: Chain, server: Chain, request: Message, reply) -> Trip:
    t0 = time.perf_counter()
    frame = client.encode(request)
    t1 = time.perf_counter()
    received = server.decode(frame)
    answer = reply(received)
    answer.meta["link"] = dict(LINK)
    back = server.encode(answer)
    t3 = time.perf_counter()
    client.decode(back)
    t4 = time.perf_counter()
    return Trip(len(frame), len(back), t1 - t0, t4 - t3, t3 - t1)


@functools.lru_cache(maxsize=4096)
def _trips(codec_json: str, padding_removal: bool, shape: str, rows: int, positions: int, kept: int, width: int,
           dtype: str, want_grad: bool, num_items: int) -> list[Trip]:
    client, server = _chains(codec_json, padding_removal)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn((rows, positions, width), generator=gen).to(DTYPES[dtype])
    mask = torch.zeros((rows, positions), dtype=torch.long)
    mask.view(-1)[:kept] = 1  # which positions are kept does not change a frame's size, only how many
    keep = mask.bool()
    step = 1

    def tensors(**named):
        return {k: v for k, v in named.items() if v is not None}

    if shape == "two-part":
        labels = torch.where(keep, torch.ones_like(mask), torch.full_like(mask, -100))
        request = Message("activations", SESSION, step, 0, {"hidden": hidden, "attention_mask": mask, "labels": labels,
                                                             "cut.keep": keep}, {"train": True, "num_items": num_items,
                                                                                 "want_grad": want_grad})
        return [_trip(client, server, request, lambda m: Message(
            "gradients", SESSION, step, 0, tensors(grad=hidden if want_grad else None), {"loss": 0.0}))]
    forward = Message("activations", SESSION, step, 0, {"hidden": hidden, "attention_mask": mask, "cut.keep": keep}, {"train": True})
    first = _trip(client, server, forward, lambda m: Message("activations", SESSION, step, 0, {"hidden": hidden}))
    backward = Message("gradients", SESSION, step, 0, {"grad": hidden}, {"want_grad": want_grad})
    second = _trip(client, server, backward, lambda m: Message(
        "gradients", SESSION, step, 0, tensors(grad=hidden if want_grad else None)))
    return [first, second]


@functools.lru_cache(maxsize=256)
def _step_trip(codec_json: str, padding_removal: bool) -> Trip:
    client, server = _chains(codec_json, padding_removal)
    lossy_down = server.lossy  # the server's link reports the step's downlink codec error in this reply

    trip = _trip(client, server, Message("step", SESSION, 1, 0, {}, {"sq_norm": 0.0}),
                 lambda m: Message("step", SESSION, 1, 0, {}, {"sq_norm": 0.0, "lr": 0.0}))
    if lossy_down:  # ``down_err``: two floats in the reply's link meta
        extra = len(msgpack.packb({"server_s": 0.0, "down_err": [0.0, 0.0]})) - len(msgpack.packb(LINK))
        trip = Trip(trip.up, trip.down + extra, trip.encode_s, trip.decode_s, trip.server_s)
    return trip
