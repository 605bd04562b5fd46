"""The server's three rounds of secure aggregation (``secure_aggregation: true``; the protocol: ``parties/secure.py``):
public keys in and the roster out, encrypted shares passed on, and the masked sum unmasked into the average. A
mixin of the handler (``handler.py``): each waits for the round's active clients, as every other average does."""

from __future__ import annotations

import torch

from ...wire import Message
from ..protocol import ProtocolError
from ..secure import SecureRounds
from .group import Member


class SecureAggregation:
    """The ``secagg_*`` message handlers of ``Server``."""

    def _secure(self) -> "SecureRounds":
        if self.group.secure is None:
            raise ProtocolError("this run does not aggregate securely (secure_aggregation: false)")
        return self.group.secure

    def _secagg_keys(self, member: Member, msg: Message, meta) -> Message:
        rounds, group = self._secure(), self.group
        advert = msg.tensors.get("advert")
        if advert is None or advert.dtype != torch.uint8 or tuple(advert.shape) != (64,):
            raise ProtocolError("secagg_keys: tensor 'advert' must be 64 bytes (uint8), the client's two public keys")
        roster = group.meet.meet(("secagg_keys", msg.step), member.index, advert, group.active,
                                 lambda items: rounds.keys(msg.step, items), group.drop)
        return self._reply(msg, "state", roster)

    def _secagg_shares(self, member: Member, msg: Message, meta) -> Message:
        rounds, group = self._secure(), self.group
        inbox = group.meet.meet(("secagg_shares", msg.step), member.index, dict(msg.tensors), group.active,
                                lambda items: rounds.shares(msg.step, items), group.drop)
        return self._reply(msg, "state", inbox)

    def _secagg_unmask(self, member: Member, msg: Message, meta) -> Message:
        rounds, group = self._secure(), self.group
        share = group.meet.meet(("secagg_unmask", msg.step), member.index, dict(msg.tensors), group.active,
                                lambda items: self.engine.run(group.aggregate_sum, *rounds.finish(msg.step, items)), group.drop)
        return self._reply(msg, "state", share)
