"""The Ray engine (``engine: ray``): the server's trunk in a Ray actor, on the resources the run asks for.

Flower simulates its clients on Ray and SecretFlow puts one actor per party on it; an operator with a cluster
already runs one. The actor builds the same ``Server`` a local run or ``splittune serve`` builds (from the model
reference, in its own process, wherever Ray places it: ``ray.server_resources`` says with how many CPUs and GPUs)
and serves frames: clients reach it by ``RayChannel``s carrying the very bytes the local and gRPC channels carry,
so a run on Ray equals the in-process run bit for bit. ``ray.address`` (``--ray-address``) joins a running cluster
(``ray start --head``); without it a local cluster of this machine's CPUs is started and stopped with the run.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..channels.ray import RayChannel
from ..errors import SplittuneError


class RayEngineError(SplittuneError, RuntimeError):
    """Ray is missing, or its cluster cannot be reached or cannot host what the run asks for."""


def ray_module():
    """``ray``, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise RayEngineError("engine: ray needs the ray package: pip install 'splittune[ray]'") from None
    return ray


def start(address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local one (once per process); whether this call started it."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                                   configure_logging=True)
    if address and address != "auto":
        _reachable(address)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=os.cpu_count(), **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RayEngineError(f"cannot start or join {where}: {str(err).splitlines()[0]}") from None
    return True


def _reachable(address: str) -> None:
    """Refuse at once an address nothing listens on (Ray itself retries for minutes, logging as it goes)."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayEngineError(f"ray.address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto); `ray start --head` "
                             "prints the address to use")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise RayEngineError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start one with "
                             "`ray start --head`, or leave ray.address out to start a local one") from None


class _TrunkActor:
    """The server party inside a Ray actor (a threaded actor: a handler waits for other clients' messages)."""

    def __init__(self, model: str, state_dir: str | None, device: str, threads: int, spans: int = 1,
                 resources: dict[str, float] | None = None):
        import torch

        from ..device import resolve_device
        from ..cut import ServerLink
        from ..models.zoo import resolve_model
        from .local import server_for

        torch.set_num_threads(max(1, threads))
        later = None
        if spans > 1:  # the trunk's later spans: actors of their own (``ray_spans.py``)
            from .ray_spans import RaySpans

            later = RaySpans(spans, model, device, resources or {})
        self.server = server_for(resolve_model(model), state_dir=Path(state_dir) if state_dir else None,
                                 device=resolve_device(device), spans=later)
        self.link = ServerLink(self.server.handle)

    def serve(self, frame: bytes) -> bytes:
        return self.link.serve(frame)

    def cancel(self, reason: str) -> None:
        self.server.cancel(reason)

    def ready(self) -> bool:
        return True


class RayServer:
    """The driver's handle on the trunk actor: what a ``Fleet`` asks of its server (channels, cancel, close)."""

    def __init__(self, model: str, state_dir: Path | None, device: str, resources: dict[str, float], spans: int = 1):
        ray = ray_module()
        cpus, gpus = float(resources.get("num_cpus", 1)), float(resources.get("num_gpus", 0))
        total = ray.cluster_resources()
        if spans * cpus > total.get("CPU", 0) or spans * gpus > total.get("GPU", 0):
            each = f" for each of its {spans} trunk spans" if spans > 1 else ""
            raise RayEngineError(f"ray.server_resources asks for {cpus:g} CPUs and {gpus:g} GPUs{each}, and the Ray cluster has "
                                 f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all; lower them or add nodes")
        actor = ray.remote(_TrunkActor).options(num_cpus=cpus, num_gpus=gpus, max_concurrency=1024, name=None)
        self.actor = actor.remote(model, str(state_dir) if state_dir else None, device, max(1, int(cpus)), spans, dict(resources))
        try:
            ray.get(self.actor.ready.remote(), timeout=_PLACEMENT_S)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.actor)
            free = ray.available_resources()
            raise RayEngineError(f"the Ray cluster could not place the server's actor ({cpus:g} CPUs, {gpus:g} GPUs) within "
                                 f"{_PLACEMENT_S} s; {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} GPUs are free: "
                                 "lower ray.server_resources, or wait for other jobs") from None
        except ray.exceptions.RayActorError as err:
            raise RayEngineError(f"the server's Ray actor failed to start: {first_line(err)}") from None

    def channel(self) -> RayChannel:
        return RayChannel(self.actor)

    def cancel(self, reason: str) -> None:
        self.actor.cancel.remote(reason)

    def close(self) -> None:
        ray_module().kill(self.actor)


_PLACEMENT_S = 300


def first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__
