"""The served process: ``serve``, ``certs`` and ``health``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import console, fail, quiet_libraries, shows_warnings, size_option, threads_option, user_errors
from .options import TapMaxBytes, TlsCa, TlsCert, TlsKey


@shows_warnings
def serve(
    model: str = typer.Option(..., "--model", "-m", help="the base model (the same as the clients')"),
    listen: str = typer.Option("127.0.0.1:50051", "--listen", help="HOST:PORT to listen on (port 0: any free port, named in the first line)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="server certificate (PEM)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="server key (PEM)"),
    tls_client_ca: Optional[Path] = typer.Option(None, "--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)"),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help="YAML map of client id to token (or to {token, index}: that id may only be that client index); without it any client may connect"),
    insecure: bool = typer.Option(False, "--insecure", help="allow plaintext on a non-loopback address"),
    max_sessions: int = typer.Option(64, "--max-sessions", min=1, help="sessions the server accepts"),
    max_clients: int = typer.Option(16, "--max-clients", min=1, help="the most clients a run may have"),
    max_runs: int = typer.Option(1, "--max-runs", min=1, help="independent runs served at once, on one frozen base"),
    max_pending: int = typer.Option(32, "--max-pending", min=1, help="connections waiting for their hello at once"),
    hello_timeout: float = typer.Option(120.0, "--hello-timeout", min=1.0, help="seconds a connection may wait before its hello"),
    idle_timeout: float = typer.Option(900.0, "--idle-timeout", min=1.0,
                                       help="seconds a connection with sessions may send nothing before it is closed"),
    max_frame_mb: int = typer.Option(1024, "--max-frame-mb", min=1, help="largest frame accepted, MiB"),
    wait_s: float = typer.Option(600.0, "--wait", min=1.0, help="seconds a round waits for a client before giving up"),
    state: Optional[Path] = typer.Option(None, "--state", help="directory for the server's checkpoints (restart with the same command to resume)"),
    device: str = typer.Option("auto", "--device", help="where the server computes: auto (a GPU when there is one) | cpu | cuda | cuda:N | mps"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="store the server's frozen block weights quantized: none | nf4 | fp4 | "
                                           "int8 (bitsandbytes); every client must propose the same quantize.trunk. Default: each run's own"),
    threads: str = typer.Option("auto", "--threads", callback=lambda v: threads_option(v),
                                help="CPU compute threads: auto (every core: the server has the process to itself) or N"),
    max_cache_bytes: Optional[str] = typer.Option(None, "--max-cache-bytes", callback=lambda v: size_option(v),
                                                  help="cap on the activation cache each client may ask for (bytes, or a size like 512MB; "
                                                  "0 keeps no activations); default: what the client asks (cache.max_bytes)"),
    record_tap: Optional[Path] = typer.Option(None, "--record-tap", help="audit what this server sees: record its server and "
                                              "aggregator taps into DIR (for `splittune attack DIR`)"),
    tap_max_bytes: TapMaxBytes = "1GiB",
    max_inference_sessions: int = typer.Option(16, "--max-inference-sessions", min=1,
                                               help="split-generation sessions served at once (beside any training run)"),
    max_inference_bytes: Optional[str] = typer.Option("4GiB", "--max-inference-bytes", callback=lambda v: size_option(v),
                                                      help="cap on the KV caches of all generation sessions together (bytes, or a size like 2GiB)"),
    inference_timeout: float = typer.Option(600.0, "--inference-timeout", min=1.0,
                                            help="seconds a generation session may stay idle before its cache is freed"),
    dashboard: Optional[str] = typer.Option(None, "--dashboard", help="HOST:PORT of a live operator page (sessions, traffic, "
                                            "refusals, memory); off loopback it needs --dashboard-token-file or $SPLITTUNE_DASHBOARD_TOKEN"),
    dashboard_token_file: Optional[Path] = typer.Option(None, "--dashboard-token-file", help="a file holding the operator page's token"),
) -> None:
    """Serve the server's segments to clients over gRPC (TLS by default off loopback)."""
    import logging
    import signal

    quiet_libraries()
    from ..deploy.files import check_server, read
    from ..deploy.service import Limits, SplitService, Tls, bind, load_tokens, release, start
    from ..channels.transport import parse_listen
    from ..device import resolve_device
    from ..models.zoo import resolve_model
    from ..parties.server.host import Host
    from ..parties.server.inference import InferenceLimits
    from ..wire import FrameLimits

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # before the run package loads opacus, which configures it
    from ..engines.local import server_for
    bound = locked = recording = page = None
    try:  # every flag, file and the port first: nothing slow (the model) loads before they are known to work
        address = parse_listen(listen)
        check_server(tls_cert, tls_key, tls_client_ca)
        if tokens is not None:
            read(tokens, "--tokens")
        token_map, bindings = load_tokens(tokens) if tokens is not None else (None, None)
        compute = resolve_device(device)
        if quantize is not None:
            from ..models.quantize import check as check_quantize

            check_quantize(quantize, compute)
        tls = Tls(tls_cert, tls_key, tls_client_ca) if tls_cert is not None else None
        locked = _serve_process(state, threads)  # one server per state directory; its compute threads
        limits = Limits(FrameLimits(max_frame_bytes=max_frame_mb << 20), max_sessions, max_clients, max_pending, hello_timeout,
                        idle_timeout)
        bound, address = bind(address, tls, insecure, limits.streams)  # port 0: the port the kernel gave
        if dashboard is not None:  # its port and token checked before the model loads, too
            page = _operator_page(dashboard, dashboard_token_file)
        if record_tap is not None:
            from ..taps.recording import Recording

            recording = Recording(record_tap, ("server", "aggregator"), tap_max_bytes, truth=False)
        source = resolve_model(model)
        party_server = Host(lambda bank: server_for(source, wait_s=wait_s, state_dir=state, device=compute, max_cache_bytes=max_cache_bytes,
                                                    quantize=quantize, bank=bank,
                                                    inference=InferenceLimits(max_inference_sessions, max_inference_bytes, inference_timeout)),
                            max_runs)
        service = SplitService(party_server, token_map, limits, bindings=bindings)
        if recording is not None:
            recording.attach(party_server, service.link)
        grpc_server = start(service, address, tls, insecure, bound=bound)
        if page is not None:
            page.attach(service, recording)
    except user_errors() as err:
        if page is not None:
            page.stop()
        if bound is not None:
            release(bound)  # the port is free again when the command returns
        if locked is not None:
            locked.release()
        fail(str(err))
    scheme = "grpcs" if tls else "grpc"
    console.print(f"[bold]splittune serve[/] · model [cyan]{model}[/]{' ' + quantize if quantize not in (None, 'none') else ''} on {party_server.device} · listening on {scheme}://{address.target}"
                  f"{' · mutual TLS' if tls_client_ca else ''}{' · tokens for ' + str(len(token_map)) + ' clients' if token_map else ''}",
                  highlight=False)
    if page is not None:
        console.print(f"operator page on {page.running.url}", highlight=False)
    signal.signal(signal.SIGTERM, lambda *_: grpc_server.stop(grace=5))
    try:
        grpc_server.wait_for_termination()
    except KeyboardInterrupt:
        grpc_server.stop(grace=5)
    finally:
        if recording is not None:
            recording.close()
        if locked is not None:
            locked.release()


def _operator_page(listen: str, token_file: Optional[Path]):
    """``serve --dashboard``: the operator's page (deploy/dashboard.py), its token from the file or the environment."""
    import os

    from ..deploy.dashboard import OperatorPage
    from ..track.dashboard import read_token

    return OperatorPage(listen, read_token(token_file, dict(os.environ), "--dashboard-token-file"))


def _serve_process(state: Optional[Path], threads: str | int):
    """``serve``: compute with ``--threads`` (the server is a lone party), and hold ``--state DIR``'s lock
    (rundir.py) for the server's life, so that two servers cannot share one state directory."""
    import torch

    from ..rundir import RunLock
    from ..threads import resolve_threads

    torch.set_num_threads(resolve_threads(threads, shared=False))
    return RunLock(state, "server").acquire() if state is not None else None


def certs(
    out: Path = typer.Option(..., "--out", "-o", help="directory for the CA, server and client files"),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="names and addresses the server certificate covers"),
    client: list[str] = typer.Option([], "--client", help="a client id: its certificate, key and token (repeatable)"),
    days: int = typer.Option(30, "--days", min=1),
) -> None:
    """Make a test CA, a server certificate, client certificates and tokens (for experiments, not production)."""
    from ..deploy.certs import make_certs

    written = make_certs(out, host, client, days)
    console.print(f"wrote {', '.join(p.name for p in written.values())} (and keys, tokens) to [bold green]{out}[/]")


def health(
    server: str = typer.Option(..., "--server", help="grpcs://host:port (grpc:// on loopback)"),
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Ask a running server whether it serves, and what (exit 2 when it does not answer)."""
    import json

    import grpc

    from ..deploy.files import check_client
    from ..channels.probe import diagnose
    from ..deploy.service import health as ask
    from ..channels.transport import DeployError, parse_server

    try:
        parse_server(server)
        check_client(tls_ca, tls_cert, tls_key)
        console.print_json(json.dumps(ask(server, ca=tls_ca, cert=tls_cert, key=tls_key)))
    except DeployError as err:
        fail(str(err))
    except grpc.RpcError as err:  # the same diagnosis as a client's: the cause, not the last transport error
        cause = diagnose(server, tls_ca, tls_cert, tls_key) if err.code() == grpc.StatusCode.UNAVAILABLE else None
        fail(f"{server} does not answer: {cause or err.details()}")
