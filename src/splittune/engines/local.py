"""The server party in this process, and channels to it: what a run, ``serve``, generation and ``verify`` build."""

from __future__ import annotations

from typing import Callable

from ..channels import LocalChannel
from ..cut import ServerLink
from ..models.arch import ArchSpec, detect_arch
from ..models.zoo import ModelSource
from ..parties import Server
from ..schedules.policy import POLICIES


def server_for(source: ModelSource, spec: ArchSpec | None = None, config=None, **options) -> Server:
    """The server party of ``source``, serving every schedule: the one way a run, ``serve``, generation, ``verify`` and
    a Ray actor build one (``options``: ``Server``'s, e.g. ``state_dir``, ``device``, ``wait_s``, ``inference``)."""
    config = config if config is not None else source.config()
    return Server(source, spec or detect_arch(config), config, policies=POLICIES, **options)


def in_process(server: Server, through: Callable | None = None) -> Callable[[], LocalChannel]:
    """A maker of channels to ``server`` in this process, through its end of the cut (``through(server, link)``: the
    serve function to use instead, e.g. a recording's, which taps what crosses)."""
    link = ServerLink(server.handle)
    serve = through(server, link) if through is not None else link.serve
    return lambda: LocalChannel(serve)
