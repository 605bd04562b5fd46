"""One base for user-facing errors: every exception splittune defines is a ``SplittuneError`` (the CLI prints it as one
``error:`` line), or one of the few that never reach a user as such, each listed with where it goes instead."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import splittune
from splittune.errors import SplittuneError

# exceptions that are not user-facing, and what becomes of them
INTERNAL = {
    "splittune.wire.errors.FrameError": "a refused frame: the server answers with a status, the client's link raises RemoteError",
    "splittune.channels.transport.ChunkError": "a stream's broken framing: the server ends the stream with a status",
    "splittune.cut.transforms.ChainError": "a chain the server cannot run: an error reply (RemoteError on the client)",
    "splittune.parties.protocol.ProtocolError": "a refused message: an error reply with a status (RemoteError on the client)",
    "splittune.parties.protocol.WaitTimeout": "a round that waited too long: an error reply (DEADLINE_EXCEEDED)",
    "splittune.dpmath.masking.SecAggError": "secure aggregation's protocol refusals: error replies to the clients",
    "splittune.run.resume.Interrupted": "a stop on request: the CLI prints it and exits 130, the run resumes",
    "splittune.run.resume.EvalStopped": "a stop request during an evaluation: the loop turns it into Interrupted",
    "splittune.models.arch._Stop": "control flow of the architecture probe",
    "splittune.models.segment._SegmentExit": "control flow of a segment's forward",
}


def exceptions(package=splittune) -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, Exception) and not issubclass(cls, Warning) and cls.__module__ == info.name:
                found[f"{info.name}.{cls.__qualname__}"] = cls
    return found


def outside_the_base(found: dict[str, type]) -> list[str]:
    return sorted(name for name, cls in found.items() if not issubclass(cls, SplittuneError) and name not in INTERNAL)


def test_every_user_facing_error_is_a_splittune_error():
    found = exceptions()
    assert outside_the_base(found) == []
    assert set(INTERNAL) <= set(found), "an internal exception listed here no longer exists: drop it from INTERNAL"


def test_a_new_error_outside_the_base_is_caught():
    """The twin: an error class written as ``class NewError(ValueError)`` is named, so the CLI would not miss it."""
    NewError = type("NewError", (ValueError,), {"__module__": "splittune.somewhere"})
    assert outside_the_base({**exceptions(), "splittune.somewhere.NewError": NewError}) == ["splittune.somewhere.NewError"]
