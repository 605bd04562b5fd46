"""What an eavesdropper's recorded frames become on the server's side: the rows the server's tap should hold (tests of
taps and of defenses compare the two)."""

from __future__ import annotations

from splittune.cut.chain import Chain
from splittune.taps.tap import Tap
from splittune.wire import decode_frame


def frames_as_server_sees(out):
    """The eavesdropper's up frames through the server's receiving chain, by (step, micro, kind)."""
    ears = Tap.open(out / "tap" / "eavesdropper")
    server = Tap.open(out / "tap" / "server")
    chain = Chain(server.chain(), "server")
    seen = {}
    for record in ears.records("frame", "up"):
        msg = decode_frame(bytes(record.tensor("frame").numpy().tobytes()))
        if msg.kind == "activations" and msg.meta.get("train") is True:
            seen[(msg.step, msg.micro)] = chain.receive(msg)
    return seen
