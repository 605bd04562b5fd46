"""A channel to a server in a Ray actor: the same frames as the local and gRPC channels, handed over as bytes.

Ray moves a frame as the bytes object it is (nothing of ours is pickled), so byte counts, codecs and
validation are those of a deployment. Like the local channel, one thread per channel hands the session's
frames over in the order they were sent and waits for each reply (the server serves a session's messages
in order), while the client computes on. A dead actor or a lost node reaches the client as a
``RemoteError`` with status UNAVAILABLE, as a vanished gRPC server does.
"""

from __future__ import annotations

from typing import Any

from .base import RemoteError
from .local import LocalChannel


class RayChannel(LocalChannel):
    """``actor``: a Ray actor handle with a ``serve(frame: bytes) -> bytes`` method."""

    def __init__(self, actor: Any):
        super().__init__(lambda frame: _serve(actor, frame))


def _serve(actor: Any, frame: bytes) -> bytes:
    import ray

    try:
        return ray.get(actor.serve.remote(frame))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.NodeDiedError) as err:
        raise RemoteError(f"the server's Ray actor is gone ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                          "UNAVAILABLE") from None
