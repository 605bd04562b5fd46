"""A client's session proposal as the server reads it: well formed, for the server's own weights, and for the
quantization the server was started with (if any). Every refusal is a ``ProtocolError`` naming the field."""

from __future__ import annotations

import math
from typing import Any, Callable

from ...models.partition import DTYPES
from ...models.quantize import KINDS as QUANTIZE_KINDS
from ..party import SessionSpec
from ..protocol import ProtocolError, bounded


def read_proposal(meta: dict[str, Any], fingerprint: str, describe: Callable[[], str], quantize: str | None) -> SessionSpec:
    """``meta`` of a hello as a ``SessionSpec``; ``describe``: the server's model, for a mismatch; ``quantize``: the
    trunk's quantization fixed by ``serve --quantize`` (None: the client's)."""
    try:
        session = SessionSpec.from_meta(meta)
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"bad session proposal: {err}") from None
    if session.dtype not in DTYPES:
        raise ProtocolError(f"bad session proposal: dtype {bounded(repr(session.dtype), 40)}; dtypes: {', '.join(DTYPES)}")
    if not (isinstance(session.clients, int) and isinstance(session.client, int) and 0 <= session.client < session.clients):
        raise ProtocolError(f"bad session proposal: client {bounded(repr(session.client), 40)} of "
                            f"{bounded(repr(session.clients), 40)} clients; a run has clients >= 1 and a client index below it")
    if session.fingerprint != fingerprint:
        raise ProtocolError(
            f"model mismatch: the client's base model {session.model or '(not named)'} has fingerprint {session.fingerprint}, "
            f"the server's {describe()} has {fingerprint}; both parties must load the same weights",
            "FAILED_PRECONDITION",
        )
    _check_quantize(session, quantize)
    if session.autocast not in ("", "bfloat16", "float16"):
        raise ProtocolError(f"bad session proposal: autocast {bounded(repr(session.autocast), 20)}; allowed: bfloat16, float16 "
                            "or none (\"\")")
    scale = session.loss_scale
    if not (scale in ("", "dynamic") or (type(scale) in (int, float) and 0 < scale < math.inf)):
        raise ProtocolError(f"bad session proposal: loss_scale {bounded(repr(scale), 20)}; allowed: dynamic, a number > 0, or \"\"")
    return session


def _check_quantize(session: SessionSpec, fixed: str | None) -> None:
    q = session.quantize
    if not isinstance(q, dict) or any(q.get(k, "none") not in QUANTIZE_KINDS for k in ("bottom", "trunk", "top", "head")) \
            or session.compute_dtype not in ("", *DTYPES):
        raise ProtocolError(f"bad session proposal: quantize {bounded(repr(q), 80)} / compute_dtype "
                            f"{bounded(repr(session.compute_dtype), 20)}; kinds: {', '.join(QUANTIZE_KINDS)}")
    trunk = q.get("trunk", "none")
    if fixed is not None and trunk != fixed:
        raise ProtocolError(f"this server holds its blocks quantized {fixed} (serve --quantize {fixed}); the client proposed "
                            f"quantize.trunk: {trunk}; set quantize.trunk: {fixed}", "FAILED_PRECONDITION")
