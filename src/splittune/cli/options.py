"""Option groups more than one command takes, defined once: how a client reaches a server (``--server``, its id and
token, TLS, the reply deadline) and how big a recorded tap may grow. ``grpc_client`` turns the connection group into
channels, checking the address and every file before anything slow loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import size_option

Server = Annotated[Optional[str], typer.Option("--server", help="a splittune server: grpcs://host:port (grpc:// on loopback); "
                                                                "in-process when omitted")]
ClientId = Annotated[str, typer.Option("--client-id", help="who this client is (the server's tokens file names it)")]
TokenFile = Annotated[Optional[Path], typer.Option("--token-file", help="file holding this client's token")]
TlsCa = Annotated[Optional[Path], typer.Option("--tls-ca", help="CA certificate to verify the server (system roots when omitted)")]
TlsCert = Annotated[Optional[Path], typer.Option("--tls-cert", help="client certificate (mutual TLS)")]
TlsKey = Annotated[Optional[Path], typer.Option("--tls-key", help="client key (mutual TLS)")]
ReplyTimeout = Annotated[float, typer.Option("--reply-timeout", min=1.0, help="seconds to wait for any one reply of the server "
                                                                               "(it may wait for other clients' turns)")]
TapMaxBytes = Annotated[Optional[str], typer.Option("--tap-max-bytes", callback=lambda v: size_option(v),
                                                    help="bound on each recorded tap (bytes, or a size like 512MB)")]


def grpc_client(url, client_id, token_file, ca, cert, key, reply_timeout_s):
    """A maker of gRPC channels to ``url`` as this client; a bad address or a missing or malformed file fails here,
    before the model loads."""
    from ..channels.grpc import GrpcChannel
    from ..channels.transport import parse_server
    from ..deploy.files import check_client, read_token

    parse_server(url)
    check_client(ca, cert, key)
    token = read_token(token_file) if token_file is not None else None
    return lambda: GrpcChannel(url, client_id=client_id, token=token, ca=ca, cert=cert, key=key, reply_timeout_s=reply_timeout_s)
