"""Where a party computes: each party picks its own device (it is not a session term, since the server may
have a GPU and the client none). Tensors cross the wire on the CPU; each party moves what it receives to
its device once, at the door."""

from __future__ import annotations

import re

import torch

from .errors import SplittuneError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(SplittuneError, ValueError):
    pass


def _available() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def check_name(name: str) -> str:
    """A well-formed device name (whether this machine has it is checked where the party runs)."""
    if not DEVICE_PATTERN.match(name):
        raise DeviceError(f"unknown device {name!r}; devices: auto, cpu, cuda, cuda:N, mps")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when there is one (CUDA, then Apple MPS), else the CPU; a named device must exist."""
    if check_name(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        present = torch.cuda.is_available() and device.index < torch.cuda.device_count()
    else:
        present = device.type == "cpu" or torch.backends.mps.is_available()
    if not present:
        raise DeviceError(f"device {name!r} is not available to this torch {torch.__version__}; available: {_available()}")
    return device


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64, on its device unless that is MPS (which has no float64), then on the CPU."""
    return x.to(device="cpu" if x.device.type == "mps" else x.device, dtype=torch.float64)  # mps has no float64


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def rng_state() -> dict[str, torch.Tensor]:
    """Every random generator a party draws from (CPU, and each CUDA device once CUDA is in use)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(cuda):
            raise DeviceError(f"this checkpoint was written with {len(cuda)} CUDA device(s); this machine has {_available()}")
        torch.cuda.set_rng_state_all(cuda)


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident set in bytes: Linux's ``VmHWM``, the high-water mark of the process's own
    memory since it started (``ru_maxrss`` would also count the parent's pages copied before ``exec``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid == "self":  # not Linux: the kernel's own figure, the best there is
        import resource
        import sys

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return None


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak resident set and, on a GPU, torch's peak allocation there: what ``summary.json``
    reports and the benchmark reads."""
    out = {"rss_bytes": peak_rss()}
    if device.type == "cuda":
        out["device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
