"""The ``splittune`` command: train, verify, export, models, fetch."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Split-learning fine-tuning of large language models.")
console = Console()
err_console = Console(stderr=True)


def _quiet_libraries() -> None:
    """Library chatter (hub warnings, peft notices) hides what the user asked for; errors still surface."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core prints connection notices (GOAWAY) at INFO
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


_debug = False  # --debug (or SPLITTUNE_DEBUG=1): an error line is followed by its traceback


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="after an error, print its Python traceback (also SPLITTUNE_DEBUG=1)"),
) -> None:
    global _debug
    _debug = debug


def _fail(message: str) -> None:
    # brackets in messages are text (pip install 'splittune[datasets]'); one line the terminal wraps, so paths copy whole
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    _explain(sys.exc_info()[1], message)
    raise typer.Exit(2)


def _explain(err: BaseException | None, message: str) -> None:
    """Under --debug the traceback of the error being reported (for a failure inside the model, of its cause);
    without, a hint where the failure came from inside the model, whose traceback a developer needs."""
    stages = sys.modules.get("splittune.models.stages")  # not imported: no model ran, no failure inside one
    trace = stages.traceback_for(err, message) if stages is not None else None
    if _debug or os.environ.get("SPLITTUNE_DEBUG", "") not in ("", "0"):
        import traceback

        text = trace or ("".join(traceback.format_exception(err)) if err is not None else "")
        if text:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
    elif trace is not None:
        err_console.print("(run `splittune --debug …` or set SPLITTUNE_DEBUG=1 for the traceback)",
                          highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _warnings_shown():
    """splittune's warnings as one ``warning:`` line each (others as Python prints them), for one command."""
    from .config import SplittuneWarning

    with warnings.catch_warnings():
        warnings.simplefilter("default", SplittuneWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SplittuneWarning):
                err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _shows_warnings(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        with _warnings_shown():
            return command(*args, **kwargs)

    return run


def _user_errors() -> tuple[type[Exception], ...]:
    from .assets import AssetError
    from .checkpoint import CheckpointError
    from .channels import RemoteError
    from .config import ConfigError
    from .data import DataError
    from .channels.transport import DeployError
    from .device import DeviceError
    from .export import ExportError
    from .parties.generator import GenerationError
    from .models.adapters import AdapterError
    from .models.arch import ArchitectureError
    from .models.builtin import BuiltinModelError
    from .models.partition import PlanError
    from .models.stages import StageError
    from .models.tiny import TinyModelError
    from .models.zoo import ModelError
    from .privacy.attacks.base import AttackError
    from .privacy.judge import JudgeError
    from .privacy.knowledge import ThreatModelError
    from .privacy.tap import TapError
    from .parties.defenses import DefenseError
    from .parties.dp_sgd import DPError
    from .rundir import RunDirError

    return (ConfigError, DataError, ModelError, PlanError, ArchitectureError, AdapterError, ExportError,
            AssetError, BuiltinModelError, TinyModelError, RemoteError, DeployError, DeviceError, RunDirError,
            TapError, ThreatModelError, AttackError, JudgeError, DefenseError, DPError, StageError, GenerationError,
            CheckpointError)


def _human_bytes(n: float) -> str:
    from .report.progress import human_bytes

    return human_bytes(n)


@app.command()
@_shows_warnings
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set train.steps=5 --set cuts=[1,3]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/<timestamp>)"),
    server: Optional[str] = typer.Option(None, "--server", help="a splittune server: grpcs://host:port (grpc:// on loopback); in-process when omitted"),
    client_id: str = typer.Option("anonymous", "--client-id", help="who this client is (the server's tokens file names it)"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="file holding this client's token"),
    client_index: int = typer.Option(0, "--client-index", min=0, help="this client's index in a run of several clients"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA certificate to verify the server (system roots when omitted)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="client certificate (mutual TLS)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="client key (mutual TLS)"),
    reply_timeout: float = typer.Option(3600.0, "--reply-timeout", min=1.0,
                                        help="seconds to wait for any one reply of the server (it may wait for other clients' turns)"),
    record_tap: Optional[str] = typer.Option(None, "--record-tap", help="record what an observer sees into RUN_DIR/tap for "
                                             "`splittune attack`: server, aggregator, eavesdropper (several with commas; in-process runs)"),
    tap_max_bytes: Optional[str] = typer.Option("1GiB", "--tap-max-bytes", callback=lambda v: _size_option(v),
                                                help="bound on each recorded tap (bytes, or a size like 512MB)"),
) -> None:
    """Fine-tune a model split between a client and a server: in one process, or against `splittune serve`."""
    _quiet_libraries()
    from .config import ConfigError, load_config
    from .device import resolve_device
    from .runner import train as run_train

    try:
        cfg = load_config(config, set_)
        device = resolve_device(cfg.train.device)
        if server is not None:
            if record_tap is not None:
                raise ConfigError("--record-tap records an in-process run's observers; against a deployed server, its operator "
                                  "records with `splittune serve --record-tap DIR` (this client's sent.jsonl notes what it sent)")
            run_train = _remote_trainer(server, client_id, token_file, client_index, tls_ca, tls_cert, tls_key, reply_timeout)
        elif record_tap is not None:
            from .privacy.recording import parse_observers

            run_train = functools.partial(run_train, record_tap=parse_observers(record_tap), tap_max_bytes=tap_max_bytes)
    except _user_errors() as err:
        _fail(str(err))
    if out is None:
        import time

        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    who = f" · {cfg.clients} clients, {cfg.schedule if cfg.mode == 'split' else cfg.mode}" if cfg.clients > 1 else ""
    cuts = f"cuts {cfg.cuts}" if cfg.cuts is not None else ("cuts auto" if cfg.mode == "split" else "no cuts")
    console.print(f"[bold]splittune train[/] · model [cyan]{escape(cfg.model)}[/] on {device} · mode {cfg.mode} · {cuts} · "
                  f"{cfg.train.steps} steps · data {escape(cfg.data.source)}{who}")
    total = cfg.train.steps * (cfg.clients if cfg.mode != "centralized" else 1)
    from .report.progress import RunProgress

    shown = RunProgress(console, several_clients=cfg.clients > 1)

    def started(name: str, row: dict) -> None:
        if row.get("resume"):
            console.print(f"resuming from step {row['resume']}", highlight=False)

    shown.on_start = started
    with shown.live() as bar:
        bar.add("train", total)

        def progress(done: int, total: int, row: dict) -> None:
            bar.update("train", done, total, row)

        from . import runner

        def stop(signum, frame):  # finish the step, save a checkpoint, exit; the same command resumes
            runner.STOP.set()
            bar.note("train", "stopping after this step…")

        runner.STOP.clear()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            summary = run_train(cfg, out, progress)
        except runner.Interrupted as err:
            bar.stop()
            err_console.print(f"[bold yellow]{err}[/]")
            raise typer.Exit(130) from None
        except _user_errors() as err:
            bar.stop()
            _fail(str(err))
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            bar.stop()  # checkpoints are written whole or not at all: the last complete one is where the run resumes
            _fail(f"the disk is full: cannot write {err.filename or out} ({err.strerror}); free space (or use another --out) "
                  f"and run the same command to resume from the last checkpoint")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    _print_summary(summary, out)


@app.command()
@_shows_warnings
def compare(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set clients=4 --set partition=dirichlet"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the runs, compare.json and compare.png"),
) -> None:
    """Train centralized, federated and split (sequential, sfl-v1, sfl-v2) on the same data and budget."""
    _quiet_libraries()
    from .compare import ENTRIES
    from .compare import compare as run_compare
    from .config import load_config

    try:
        cfg = load_config(config, set_)
        if cfg.clients == 1:
            cfg = load_config(config, [*set_, "clients=3"])
            console.print("[dim]compare needs several clients; using clients=3 (--set clients=N to choose)[/]")
    except _user_errors() as err:
        _fail(str(err))
    console.print(f"[bold]splittune compare[/] · model [cyan]{escape(cfg.model)}[/] · {cfg.clients} clients × {cfg.train.steps} steps · "
                  f"data {escape(cfg.data.source)} ({cfg.partition}) · {', '.join(ENTRIES)}")
    from .report.progress import RunProgress

    with RunProgress(console, several_clients=True, name_width=max(map(len, ENTRIES))).live() as bar:

        def progress(entry: str, done: int, total: int, row: dict) -> None:
            bar.update(entry, done, total, row)

        try:
            results = run_compare(cfg, out, progress)
        except _user_errors() as err:
            bar.stop()
            _fail(str(err))
    table = Table(title="same data, same examples seen", show_header=True)
    for col in ("", "eval loss before", "after", "train loss (last)", "↑ sent", "↓ received", "wall"):
        table.add_column(col, justify="right", no_wrap=not col)  # entry names stay whole on narrow terminals
    skipped = {name: r["skipped"] for name, r in results.items() if "skipped" in r}
    for name, r in results.items():
        if name in skipped:  # the reason goes under the table: in a cell it wraps into a tall column
            table.add_row(name, "[dim]skipped[/]", "", "", "", "", "")
            continue
        table.add_row(name, f"{r['eval_loss_before']:.4f}", f"{r['eval_loss_after']:.4f}", f"{r['train_loss_last']:.4f}",
                      _human_bytes(r["bytes_up"]), _human_bytes(r["bytes_down"]), f"{r['wall_s']:.1f} s")
    console.print(table)
    for name, reason in skipped.items():
        console.print(f"[dim]{name} skipped: {escape(reason)}[/]", highlight=False)
    console.print(f"written: [bold green]{out / 'compare.json'}[/], [bold green]{out / 'compare.png'}[/] and one run directory per entry")



@app.command()
@_shows_warnings
def bench(
    suite: str = typer.Option("quick", "--suite", help="quick (a tiny model, then a short builtin run; minutes on a laptop) | full (the builtin model)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="run every part of the suite on this model instead"),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="directory for bench.json, report.md, report.html and the plots"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key in every entry, e.g. --set train.seq_len=256"),
    reps: Optional[int] = typer.Option(None, "--reps", min=1, help="measured rounds per entry (default: the suite's)"),
    only: list[str] = typer.Option([], "--only", help="time only this entry (repeatable; centralized always runs)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="compute threads for every entry (default: every core)"),
    no_memory: bool = typer.Option(False, "--no-memory", help="skip the per-party memory runs (each party in its own process)"),
) -> None:
    """Measure centralized, split, codecs, pipelining, slow links and several clients side by side, with a report."""
    _quiet_libraries()
    from .bench import run_bench, select, suite as get_suite, total_ticks
    from .rundir import RunLock

    try:
        parts = select(get_suite(suite), only or None, model)
    except _user_errors() as err:
        _fail(str(err))
    console.print(f"[bold]splittune bench[/] · suite {suite} · " + " · ".join(f"{p.name}: [cyan]{escape(p.model)}[/] ({len(p.entries)} entries)"
                                                                         for p in parts))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = total_ticks(parts, reps)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                           console=console)) if console.is_terminal else None
        task = bar.add_task("starting", total=total) if bar is not None else None
        done = [0, -1]

        def progress(what: str, advance: int, _total: int) -> None:
            done[0] += advance
            if bar is not None:
                bar.update(task, advance=advance, description=escape(what))
            elif advance == 0 or done[0] * 10 // max(total, 1) != done[1]:  # plain lines: each phase, and every tenth of the way
                done[1] = done[0] * 10 // max(total, 1)
                console.print(f"[{done[0]}/{total}] {escape(what)}", highlight=False)

        try:
            stack.enter_context(RunLock(out, "bench"))
            results = run_bench(suite, out, model=model, sets=tuple(set_), reps=reps, only=only or None, threads=threads,
                                memory=not no_memory, progress=progress)
        except _user_errors() as err:
            if bar is not None:
                bar.stop()
            _fail(str(err))
    from .bench.report import TERSE, terse_row

    for part in results["parts"]:
        table = Table(title=f"{part['name']}: {part['model']} · medians; peak memory per party process", show_header=True)
        for col in TERSE:
            table.add_column(col, justify="left" if col == "entry" else "right")
        for name, figures in part["entries"].items():
            table.add_row(*[escape(c) for c in terse_row(name, figures)])
        console.print(table)
        for name, figures in part["entries"].items():
            if "error" in figures:
                err_console.print(f"[bold yellow]warning:[/] {escape(name)} failed: {escape(figures['error'])}", highlight=False)
    for warning in results.get("warnings", []):
        err_console.print(f"[bold yellow]warning:[/] {escape(warning.splitlines()[0])}", highlight=False)
    console.print(f"written: [bold green]{out / 'bench.json'}[/], [bold green]{out / 'report.md'}[/], [bold green]{out / 'report.html'}[/] and the plots")

def _grpc_client(url, client_id, token_file, ca, cert, key, reply_timeout_s):
    """A maker of gRPC channels to ``url`` as this client; a bad address or a missing or malformed file fails here,
    before the model loads."""
    from .channels.grpc import GrpcChannel
    from .channels.transport import parse_server
    from .deploy.files import check_client, read_token

    parse_server(url)
    check_client(ca, cert, key)
    token = read_token(token_file) if token_file is not None else None
    return lambda: GrpcChannel(url, client_id=client_id, token=token, ca=ca, cert=cert, key=key, reply_timeout_s=reply_timeout_s)


def _remote_trainer(url, client_id, token_file, client_index, ca, cert, key, reply_timeout_s):
    """``train`` for one client process talking gRPC to ``url``."""
    from .runner import train_remote

    channel = _grpc_client(url, client_id, token_file, ca, cert, key, reply_timeout_s)
    return lambda cfg, out, progress: train_remote(cfg, out, client_index, lambda index: channel(), progress)


@app.command()
@_shows_warnings
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
    max_pending: int = typer.Option(32, "--max-pending", min=1, help="connections waiting for their hello at once"),
    hello_timeout: float = typer.Option(120.0, "--hello-timeout", min=1.0, help="seconds a connection may wait before its hello"),
    idle_timeout: float = typer.Option(900.0, "--idle-timeout", min=1.0,
                                       help="seconds a connection with sessions may send nothing before it is closed"),
    max_frame_mb: int = typer.Option(1024, "--max-frame-mb", min=1, help="largest frame accepted, MiB"),
    wait_s: float = typer.Option(600.0, "--wait", min=1.0, help="seconds a round waits for a client before giving up"),
    state: Optional[Path] = typer.Option(None, "--state", help="directory for the server's checkpoints (restart with the same command to resume)"),
    device: str = typer.Option("auto", "--device", help="where the server computes: auto (a GPU when there is one) | cpu | cuda | cuda:N | mps"),
    threads: str = typer.Option("auto", "--threads", callback=lambda v: _threads_option(v),
                                help="CPU compute threads: auto (every core: the server has the process to itself) or N"),
    max_cache_bytes: Optional[str] = typer.Option(None, "--max-cache-bytes", callback=lambda v: _size_option(v),
                                                  help="cap on the activation cache each client may ask for (bytes, or a size like 512MB; "
                                                  "0 keeps no activations); default: what the client asks (cache.max_bytes)"),
    record_tap: Optional[Path] = typer.Option(None, "--record-tap", help="audit what this server sees: record its server and "
                                              "aggregator taps into DIR (for `splittune attack DIR`)"),
    tap_max_bytes: Optional[str] = typer.Option("1GiB", "--tap-max-bytes", callback=lambda v: _size_option(v),
                                                help="bound on each recorded tap (bytes, or a size like 512MB)"),
    max_inference_sessions: int = typer.Option(16, "--max-inference-sessions", min=1,
                                               help="split-generation sessions served at once (beside any training run)"),
    max_inference_bytes: Optional[str] = typer.Option("4GiB", "--max-inference-bytes", callback=lambda v: _size_option(v),
                                                      help="cap on the KV caches of all generation sessions together (bytes, or a size like 2GiB)"),
    inference_timeout: float = typer.Option(600.0, "--inference-timeout", min=1.0,
                                            help="seconds a generation session may stay idle before its cache is freed"),
) -> None:
    """Serve the server's segments to clients over gRPC (TLS by default off loopback)."""
    import logging
    import signal

    _quiet_libraries()
    from .deploy.files import check_server, read
    from .deploy.service import Limits, SplitService, Tls, bind, load_tokens, release, start
    from .channels.transport import parse_listen
    from .device import resolve_device
    from .models.arch import detect_arch
    from .models.zoo import resolve_model
    from .parties.inference import InferenceLimits
    from .parties.server import Server
    from .schedules.policy import POLICIES
    from .wire import FrameLimits

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bound = locked = recording = None
    try:  # every flag, file and the port first: nothing slow (the model) loads before they are known to work
        address = parse_listen(listen)
        check_server(tls_cert, tls_key, tls_client_ca)
        if tokens is not None:
            read(tokens, "--tokens")
        token_map, bindings = load_tokens(tokens) if tokens is not None else (None, None)
        compute = resolve_device(device)
        tls = Tls(tls_cert, tls_key, tls_client_ca) if tls_cert is not None else None
        locked = _serve_process(state, threads)  # one server per state directory; its compute threads
        limits = Limits(FrameLimits(max_frame_bytes=max_frame_mb << 20), max_sessions, max_clients, max_pending, hello_timeout,
                        idle_timeout)
        bound, address = bind(address, tls, insecure, limits.streams)  # port 0: the port the kernel gave
        if record_tap is not None:
            from .privacy.recording import Recording

            recording = Recording(record_tap, ("server", "aggregator"), tap_max_bytes, truth=False)
        source = resolve_model(model)
        config = source.config()
        party_server = Server(source, detect_arch(config), config, wait_s=wait_s, state_dir=state, device=compute,
                              policies=POLICIES, max_cache_bytes=max_cache_bytes,
                              inference=InferenceLimits(max_inference_sessions, max_inference_bytes, inference_timeout))
        service = SplitService(party_server, token_map, limits, bindings=bindings)
        if recording is not None:
            recording.attach(party_server, service.link)
        grpc_server = start(service, address, tls, insecure, bound=bound)
    except _user_errors() as err:
        if bound is not None:
            release(bound)  # the port is free again when the command returns
        if locked is not None:
            locked.release()
        _fail(str(err))
    scheme = "grpcs" if tls else "grpc"
    console.print(f"[bold]splittune serve[/] · model [cyan]{model}[/] on {party_server.device} · listening on {scheme}://{address.target}"
                  f"{' · mutual TLS' if tls_client_ca else ''}{' · tokens for ' + str(len(token_map)) + ' clients' if token_map else ''}",
                  highlight=False)
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


def _size_option(value: str | None) -> int | None:
    """``--max-cache-bytes``: a byte count or a size like 512MB (config.parse_size)."""
    from .config import parse_size

    if value is None:
        return None
    try:
        return parse_size(value if not value.isdigit() else int(value))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _threads_option(value: str) -> str | int:
    """``--threads``: auto or a count >= 1 (a lone party's auto: every core)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be auto or an integer >= 1, got {value!r}")
    return int(value)


def _serve_process(state: Optional[Path], threads: str | int):
    """``serve``: compute with ``--threads`` (the server is a lone party), and hold ``--state DIR``'s lock
    (rundir.py) for the server's life, so that two servers cannot share one state directory."""
    import torch

    from .rundir import RunLock
    from .threads import resolve_threads

    torch.set_num_threads(resolve_threads(threads, shared=False))
    return RunLock(state, "server").acquire() if state is not None else None


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", "-o", help="directory for the CA, server and client files"),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host", help="names and addresses the server certificate covers"),
    client: list[str] = typer.Option([], "--client", help="a client id: its certificate, key and token (repeatable)"),
    days: int = typer.Option(30, "--days", min=1),
) -> None:
    """Make a test CA, a server certificate, client certificates and tokens (for experiments, not production)."""
    from .deploy.certs import make_certs

    written = make_certs(out, host, client, days)
    console.print(f"wrote {', '.join(p.name for p in written.values())} (and keys, tokens) to [bold green]{out}[/]")


@app.command()
def health(
    server: str = typer.Option(..., "--server", help="grpcs://host:port (grpc:// on loopback)"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key"),
) -> None:
    """Ask a running server whether it serves, and what (exit 2 when it does not answer)."""
    import json

    import grpc

    from .deploy.files import check_client
    from .channels.probe import diagnose
    from .deploy.service import health as ask
    from .channels.transport import DeployError, parse_server

    try:
        parse_server(server)
        check_client(tls_ca, tls_cert, tls_key)
        console.print_json(json.dumps(ask(server, ca=tls_ca, cert=tls_cert, key=tls_key)))
    except DeployError as err:
        _fail(str(err))
    except grpc.RpcError as err:  # the same diagnosis as a client's: the cause, not the last transport error
        cause = diagnose(server, tls_ca, tls_cert, tls_key) if err.code() == grpc.StatusCode.UNAVAILABLE else None
        _fail(f"{server} does not answer: {cause or err.details()}")


def _print_summary(s: dict, out: Path) -> None:
    table = Table(title="result", show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", f"{s['eval_loss_before']:.4f}", f"{s['eval_loss_after']:.4f}")
    table.add_row("eval perplexity", f"{s['eval_ppl_before']:.2f}", f"{s['eval_ppl_after']:.2f}")
    if "eval_accuracy_before" in s:
        table.add_row("eval accuracy", f"{s['eval_accuracy_before']:.3f}", f"{s['eval_accuracy_after']:.3f}")
    table.add_row("train loss (first → last step)", f"{s['train_loss_first']:.4f}", f"{s['train_loss_last']:.4f}")
    console.print(table)
    console.print(
        f"bytes sent: client → server [bold]{_human_bytes(s['bytes_up'])}[/] · server → client [bold]{_human_bytes(s['bytes_down'])}[/] "
        f"({s['steps']} steps; evaluation adds ↑{_human_bytes(s['eval_bytes_up'])} ↓{_human_bytes(s['eval_bytes_down'])})"
    )
    console.print(
        f"client holds {s['client_params'] / 1e6:.2f} M parameters ({_human_bytes(s['client_bytes'])}), "
        f"server {s['server_params'] / 1e6:.2f} M ({_human_bytes(s['server_bytes'])}) · {s['step_s_mean']:.3f} s/step · {s['wall_s']:.1f} s in all"
    )
    if "time_median_s" in s:  # where a median step's time went (docs/efficiency.md)
        t = s["time_median_s"]
        errors = " · ".join(f"codec error {d} {s[f'codec_error_{d}']:.2e}" for d in ("up", "down") if f"codec_error_{d}" in s)
        console.print(f"median step: client compute {t['compute_s']:.3f} s · codecs {t['codec_s']:.3f} s · waiting {t['wait_s']:.3f} s "
                      f"(server {t['server_s']:.3f} s, wire {t['wire_s']:.3f} s)" + (f" · {errors}" if errors else ""), highlight=False)
    cache = s.get("cache")
    if cache and cache["on"]:  # docs/efficiency.md: Activation cache
        console.print(f"activation cache: {cache['hits']} rows reused, {cache['misses']} sent, {cache['evictions']} evicted · "
                      f"{cache['bottom_forwards_skipped']} bottom forwards skipped · {_human_bytes(cache['bytes_saved_up'])} not sent up",
                      highlight=False)
    if s.get("clients", 1) > 1:
        clients = Table(title=f"{s['clients']} clients · {s['schedule']}", show_header=True)
        for col in ("client", "cuts", "rank", "train examples", "eval loss before", "after (own model, own data)", "↑ sent", "↓ received"):
            clients.add_column(col, justify="right")
        for c in s["per_client"]:
            clients.add_row(str(c["client"]), str(c["cuts"]), str(c["lora_rank"]), str(c["train_examples"]),
                            f"{c['eval_loss_before']:.4f}", f"{c['eval_loss_after']:.4f}",
                            _human_bytes(c["bytes_up"]), _human_bytes(c["bytes_down"]))
        console.print(clients)
    console.print(f"run directory: [bold green]{out}[/] (summary.json, metrics.jsonl, loss.png, adapters/)")


@app.command()
@_shows_warnings
def verify(
    model: str = typer.Option(..., "--model", "-m", help="model reference (builtin:…, tiny:…, directory, hub id)"),
    cuts: str = typer.Option(..., "--cuts", help="A (two-part) or A,B (U-shaped)"),
    batch: int = typer.Option(2, "--batch", min=1, help="examples in the test batch"),
    seq: int = typer.Option(16, "--seq", min=2, help="tokens per example"),
    padding: bool = typer.Option(False, "--padding/--no-padding", help="pad one row on the left and one on the right"),
    tolerance: float = typer.Option(1e-5, "--tolerance"),
    set_: list[str] = typer.Option([], "--set", "-s", help="other config overrides, e.g. --set lora.rank=4"),
) -> None:
    """Check that the split model equals the unsplit one: loss, every gradient, one optimizer step."""
    _quiet_libraries()
    from .config import load_config
    from .verify import verify as run_verify

    try:
        cut_list = [int(c) for c in cuts.replace(" ", "").strip("[]").split(",") if c]
    except ValueError:
        _fail(f"--cuts must be one or two block indices like 2 or 2,28; got {cuts!r}")
    try:
        cfg = load_config(None, [f"model={model}", f"cuts={cut_list}", *set_])
        report = run_verify(cfg, batch=batch, seq=seq, padding=padding, tolerance=tolerance)
    except _user_errors() as err:
        _fail(str(err))
    table = Table(title=f"verify {model} · {report.shape} · cuts {report.cuts}" + (" · padded" if padding else ""))
    table.add_column("check")
    table.add_column("max |split − unsplit|", justify="right")
    table.add_row("loss", f"{report.loss_diff:.3e}  ({report.loss_split:.6f} vs {report.loss_unsplit:.6f})")
    table.add_row(f"gradients ({report.tensors} tensors)", f"{report.max_grad_diff:.3e}  (largest at {report.worst_grad})")
    table.add_row("adapters after one step", f"{report.max_update_diff:.3e}")
    console.print(table)
    for problem in report.problems:
        err_console.print(f"[red]problem:[/] {problem}")
    if report.ok:
        console.print(f"[bold green]OK[/]: within tolerance {tolerance:g}")
    else:
        console.print(f"[bold red]FAIL[/]: differences exceed tolerance {tolerance:g}")
        raise typer.Exit(1)


@app.command()
@_shows_warnings
def plan(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model reference (the base config's when omitted)"),
    client_memory: str = typer.Option(..., "--client-memory", help="what the client process may hold, e.g. 8GB, 512MiB"),
    server_memory: Optional[str] = typer.Option(None, "--server-memory", help="what the server process may hold (unbounded when omitted)"),
    bandwidth: str = typer.Option(..., "--bandwidth", help="the link each way, e.g. 100Mbps, 1Gbps"),
    latency: str = typer.Option("0ms", "--latency", help="one-way latency, e.g. 20ms"),
    batch: Optional[int] = typer.Option(None, "--batch", help="rows per batch (train.batch_size)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per row (train.seq_len)"),
    estimate: bool = typer.Option(False, "--estimate", help="predict from the config alone (no weights load): FLOPs at this machine's measured throughput"),
    top: int = typer.Option(5, "--top", help="how many choices to show"),
    shape: str = typer.Option("any", "--shape", help="two-part | u-shape | any"),
    server_speed: float = typer.Option(1.0, "--server-speed", help="how many times faster than this machine the server computes (a GPU server: 10 or more)"),
    codecs: str = typer.Option("raw,bf16,int8,int4", "--codecs", help="codecs to weigh each way, e.g. raw,bf16 to keep quality (topk may be named)"),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="write the top choice as a YAML config for `splittune train --config`"),
    as_json: bool = typer.Option(False, "--json", help="print the choices and their predictions as JSON"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="a base config whose data, LoRA and segments the plan keeps"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key of the base config, e.g. --set lora.rank=16"),
) -> None:
    """Profile the model here and pick cuts, codecs, micro-batches and checkpointing that fit the memory given."""
    _quiet_libraries()
    import json

    from .config import ConfigError, load_config
    from .plan import profile_model, search
    from .plan.output import config_yaml, link_words, plan_json
    from .plan.units import parse_rate, parse_size, parse_time

    try:
        client_bytes = parse_size(client_memory, "--client-memory")
        server_bytes = parse_size(server_memory, "--server-memory") if server_memory is not None else None
        mbps, ms = parse_rate(bandwidth, "--bandwidth"), parse_time(latency, "--latency")
        for flag, value, least in (("--batch", batch, 1), ("--seq-len", seq_len, 8), ("--top", top, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if server_speed <= 0:
            raise ConfigError(f"--server-speed must be positive, got {server_speed:g}")
        from .plan.search import LOSS

        names = tuple(c.strip() for c in codecs.split(",") if c.strip())
        unknown = [c for c in names if c not in LOSS]
        if unknown or not names:
            raise ConfigError(f"--codecs {codecs!r}: {', '.join(unknown) or 'none given'}; codecs: {', '.join(LOSS)}")
        sets = [*set_, *([f"model={model}"] if model else []), *([f"train.batch_size={batch}"] if batch else []),
                *([f"train.seq_len={seq_len}"] if seq_len else [])]
        base = load_config(config, sets)
        t = base.train
        shown = err_console if as_json else console
        with shown.status(f"profiling {escape(base.model)}…") as status:
            profile = profile_model(base.model, batch=t.batch_size, seq_len=t.seq_len, dtype=t.dtype, device=t.device,
                                    cfg=base if (config is not None or set_) else None, estimate=estimate,
                                    progress=lambda what: status.update(escape(what) + "…"))
            status.update(f"weighing every choice for {escape(base.model)}…")
            result = search(base, profile, client_bytes, server_bytes, mbps, ms, shape, names, server_speed=server_speed)
    except _user_errors() as err:
        _fail(str(err))
    best = result.ranked[:top]
    if write_config is not None:
        write_config.write_text(config_yaml(best[0], profile, client_bytes, server_bytes, mbps, ms))
    if as_json:
        print(json.dumps(plan_json(best, profile, result.considered, result.notes), indent=2))
        return
    how = "estimated from the config" if profile.estimated else f"profiled on {profile.device} ({profile.threads} threads)"
    console.print(f"[bold]splittune plan[/] · [cyan]{escape(profile.model)}[/] · {how} · batch {profile.batch} × {profile.seq_len} · "
                  f"client {_human_bytes(client_bytes)}, server {_human_bytes(server_bytes) if server_bytes else 'unbounded'} · "
                  f"{link_words(mbps, ms)}", highlight=False)
    table = Table(title=f"the {len(best)} fastest of {len(result.ranked)} choices that fit ({result.considered} weighed)",
                  box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for col in ("cuts", "shape", "client\nblocks", "codec\n↑/↓", "micro-\nbatches", "ckpt", "step", "client\npeak",
                "server\npeak", "↑ per\nstep", "↓ per\nstep"):
        table.add_column(col, justify="left" if col in ("cuts", "shape", "codec\n↑/↓") else "right", no_wrap=True)
    lossy = {"bf16", "fp16", "int8", "int4", "topk"}
    for r in best:
        c, p = r.choice, r.prediction
        codecs = "/".join(f"{x}*" if x in lossy else x for x in (c.up, c.down))
        table.add_row(",".join(map(str, c.cuts)), "U" if c.shape == "u-shape" else "2-part", str(p.client_blocks), codecs,
                      str(c.micro_batches), "on" if c.checkpointing else "off", f"{p.step_s:.3g} s", _compact(p.client_peak_bytes),
                      _compact(p.server_peak_bytes), _compact(p.bytes_up), _compact(p.bytes_down))
    console.print(table)
    from .plan.search import footprint

    p = best[0].prediction
    console.print(f"#1 per step: client {p.client_s:.3f} s, server {p.server_s:.3f} s, on the link {p.transfer_s:.3f} s · client "
                  f"holds {footprint(p.client_memory)}", highlight=False)
    console.print("[dim]* lossy codec (relative error: bf16 ~2e-3, int8 ~4e-2, int4 ~0.1; docs/efficiency.md). client blocks: "
                  "how many blocks the client's text goes through before anything leaves it; shallow cuts leak more "
                  "(activations after a block or two are close to the embeddings and can be inverted).[/]", highlight=False)
    for note in [*result.notes, *p.notes]:
        console.print(f"[dim]{escape(note)}[/]", highlight=False)
    if write_config is not None:
        console.print(f"written: [bold green]{escape(str(write_config))}[/] (splittune train --config {escape(str(write_config))})")


def _compact(n: float) -> str:
    """Bytes in at most 5 characters and a unit (``396M``, ``35.3K``): the plan's table has many columns."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the PEFT adapter"),
    merge: bool = typer.Option(False, "--merge", help="also write full weights with the adapters merged (out/merged)"),
    client: Optional[int] = typer.Option(None, "--client", min=0, help="export this client's personalised model instead of the global one"),
) -> None:
    """Write one standard PEFT adapter for the whole model (loadable with PeftModel.from_pretrained)."""
    _quiet_libraries()
    from .export import export_run

    try:
        info = export_run(run_dir, out, merge=merge, client=client)
    except _user_errors() as err:
        _fail(str(err))
    console.print(f"wrote a PEFT adapter to [bold green]{out}[/]: {info['lora_tensors']} LoRA tensors"
                  + (f" on {info['target_modules']} in blocks {info['layers']}" if info.get("lora_tensors") else ""))
    if merge:
        console.print(f"merged full weights in [bold green]{out / 'merged'}[/]")


@app.command()
@_shows_warnings
def generate(
    run_dir: Path = typer.Argument(..., help="a finished run directory (splittune train --out DIR)"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="a prompt (repeat for several)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="prompts, one per line ('-': standard input)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate at most per prompt"),
    greedy: bool = typer.Option(False, "--greedy", help="always the most likely token (the default unless --temperature, "
                                "--top-p or --top-k is given)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="sample with this temperature (> 0)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample from the smallest set of tokens holding this probability"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample from the k most likely tokens (0: all)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="make sampling reproducible"),
    stop: list[str] = typer.Option([], "--stop", help="stop when the completion ends with this text (repeat for several)"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they come (one prompt at a time)"),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as it is (no chat template for an instruction run)"),
    batch: bool = typer.Option(False, "--batch", help="generate for every prompt in one left-padded batch"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per prompt: prompt, completion, token ids, bytes each "
                                 "way, time to first token"),
    client: Optional[int] = typer.Option(None, "--client", min=0, help="generate with this client's personalised model"),
    server: Optional[str] = typer.Option(None, "--server", help="a splittune server: grpcs://host:port (grpc:// on loopback); "
                                         "in-process when omitted"),
    client_id: str = typer.Option("anonymous", "--client-id", help="who this client is (the server's tokens file names it)"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="file holding this client's token"),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA certificate to verify the server (system roots when omitted)"),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="client certificate (mutual TLS)"),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="client key (mutual TLS)"),
    reply_timeout: float = typer.Option(600.0, "--reply-timeout", min=1.0, help="seconds to wait for any one reply of the server"),
    record_tap: Optional[Path] = typer.Option(None, "--record-tap", help="record what the in-process server sees (the prompt's "
                                              "and every token's activations) into DIR, as `serve --record-tap` does"),
    tap_max_bytes: Optional[str] = typer.Option("1GiB", "--tap-max-bytes", callback=lambda v: _size_option(v),
                                                help="bound on the recorded tap (bytes, or a size like 512MB)"),
) -> None:
    """Generate text with a run's fine-tuned model through the same split: the text stays here, the server runs its part."""
    _quiet_libraries()
    import json as _json

    from .generation import load_split

    sampling = temperature is not None or top_p is not None or top_k is not None
    try:
        if greedy and sampling:
            raise _usage_error("--greedy decodes without sampling; drop it to sample with --temperature/--top-p/--top-k")
        prompts = list(prompt) + _read_prompts(prompt_file)
        if not prompts:
            raise _usage_error("give a prompt: --prompt TEXT or --prompt-file FILE")
        if max_new_tokens < 1:
            raise _usage_error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if stream and (batch or as_json):
            raise _usage_error("--stream prints one prompt's tokens as they come; it does not combine with --batch or --json")
        if record_tap is not None and server is not None:
            raise _usage_error("--record-tap records the in-process server; a deployed server's operator records with "
                               "`splittune serve --record-tap DIR`")
        channel = _grpc_client(server, client_id, token_file, tls_ca, tls_cert, tls_key, reply_timeout)() if server else None
        recording = None
        if record_tap is not None:
            from .privacy.recording import Recording

            recording = Recording(record_tap, ("server",), tap_max_bytes, truth=False)
        try:
            split = load_split(run_dir, channel=channel, client=client, serve_through=recording.attach if recording else None)
        except BaseException:
            if channel is not None:  # the split did not take it over: close it here, not at exit
                channel.close()
            raise
    except _user_errors() as err:
        _fail(str(err))
    options = dict(raw=raw, max_new_tokens=max_new_tokens, greedy=not sampling, temperature=1.0 if temperature is None else temperature,
                   top_p=top_p if top_p is not None else 1.0, top_k=top_k or 0, seed=seed, stop=stop or None, batch=batch)
    try:
        with split:
            if stream:
                from transformers import TextStreamer

                for text in prompts:
                    console.print(f"[bold]{escape(text)}[/]", highlight=False)
                    split.complete([text], streamer=TextStreamer(split.tokenizer, skip_prompt=True, skip_special_tokens=True),
                                   **options)
                return
            results = split.complete(prompts, **options)
    except _user_errors() as err:
        _fail(str(err))
    finally:
        if recording is not None:
            recording.close()
    for r in results:
        if as_json:
            print(_json.dumps(r.to_json()), flush=True)
        else:
            console.print(f"[bold]{escape(r.prompt)}[/]", highlight=False)
            console.print(escape(r.completion), highlight=False)
            ttft = f", first token after {r.time_to_first_token_s * 1000:.0f} ms" if r.time_to_first_token_s is not None else ""
            console.print(f"[dim]{len(r.token_ids)} tokens in {r.seconds:.2f} s{ttft}; {_human_bytes(r.bytes_up)} up, "
                          f"{_human_bytes(r.bytes_down)} down in {r.messages} crossings[/]", highlight=False)


def _usage_error(message: str) -> Exception:
    from .config import ConfigError

    return ConfigError(message)


def _read_prompts(path: Path | None) -> list[str]:
    """One prompt per non-empty line of ``path`` ('-': standard input)."""
    if path is None:
        return []
    from .config import ConfigError

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({err})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {path} holds no prompt (one per line)")
    return prompts


@app.command()
def models() -> None:
    """Builtin models, the tiny test models and each architecture family's status (exact, refused, detected)."""
    _quiet_libraries()
    from .models.builtin import BUILTIN_MODELS
    from .models.catalog import DETECTED, FAMILIES, TESTED_ARCHITECTURES
    from .models.tiny import tiny_reference

    table = Table(title="builtin models")
    table.add_column("reference")
    table.add_column("description")
    for name, spec in BUILTIN_MODELS.items():
        table.add_row(f"builtin:{name}", spec.description)
    console.print(table)
    families = Table(title="architecture families")
    families.add_column("model_type", no_wrap=True)
    families.add_column("status", no_wrap=True)
    families.add_column("why")
    for f in FAMILIES:
        families.add_row(f.model_type, f.status, escape(f.why))
    families.add_row("any other", "detected", DETECTED)
    console.print(families)
    console.print("exact: split training equals unsplit training in the test suite (two-part and U-shaped, with padding); "
                  "refused: stopped before any weight loads, with the reason. Any other decoder-only causal LM with "
                  "embeddings, one list of blocks, a final norm and a head is detected automatically; run "
                  "`splittune verify --model M --cuts A,B --padding` to check it.", soft_wrap=True)
    console.print(escape(f"tiny test models (random weights, built on first use): {tiny_reference()}; the tested ones: "
                         + ", ".join(f"tiny:{a}" for a in TESTED_ARCHITECTURES)), highlight=False, soft_wrap=True)


@app.command()
@_shows_warnings
def attack(
    run_dir: Path = typer.Argument(..., help="a run directory with a recorded tap (train --record-tap), or a serve --record-tap DIR"),
    attack_name: str = typer.Option(..., "--attack", "-a", help="inversion | optimization | gradient-labels | label-inference | aggregator"),
    aux: Optional[str] = typer.Option(None, "--aux", help="public auxiliary text (a data source); default: a builtin text the run did not train on"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where attack.json and attack.html go (default: RUN_DIR/attacks/NAME)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="an attack option, e.g. --set epochs=5 (see docs/privacy.md)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the public base model (default: the run's `model:`)"),
) -> None:
    """How much of the client's text could an observer reconstruct? Run one attack on a run's tap and score it."""
    _quiet_libraries()
    from .privacy.job import attack_run

    try:
        options = _attack_options(set_)
    except ValueError as err:
        _fail(str(err))
    console.print(f"[bold]splittune attack[/] · {escape(attack_name)} on {escape(str(run_dir))}", highlight=False)
    shown = _phase_bar()
    with shown as progress:
        try:
            result = attack_run(run_dir, attack_name, aux, out, options, model, progress)
        except _user_errors() as err:
            progress.stop()
            _fail(str(err))
    figures = " · ".join(f"{k} {result[k]:.3f}" for k in ("rouge_l_f1", "token_accuracy", "leak_auc", "precision", "recall", "f1")
                         if isinstance(result.get(k), (int, float)))
    console.print(f"{escape(attack_name)}: {figures or escape(result.get('scored', ''))} ({result['seconds']} s)", highlight=False)
    where = Path(out) if out is not None else Path(run_dir) / "attacks" / attack_name
    console.print(f"written: [bold green]{where / 'attack.json'}[/] and [bold green]{where / 'attack.html'}[/]")


@app.command()
@_shows_warnings
def leak(
    model: str = typer.Option("builtin:smollm2-135m", "--model", "-m", help="the base model"),
    cuts: str = typer.Option("1,2,4,6,8,10,12,15", "--cuts", help="first cuts to try, comma-separated (those past the model are dropped)"),
    attack_names: str = typer.Option("inversion", "--attack", "-a", help="attacks on each cut's tap, comma-separated (forward attacks: inversion, optimization)"),
    aux: Optional[str] = typer.Option(None, "--aux", help="public auxiliary text; default: a builtin text other than --data"),
    data: str = typer.Option("builtin:sentiment", "--data", help="the private text the short runs train on"),
    codecs: str = typer.Option("raw", "--codec", help="uplink codecs to compare, comma-separated (e.g. raw,int8)"),
    out: Path = typer.Option(Path("runs/leak"), "--out", "-o", help="directory for leak.json, leak.png and each cut's run"),
    set_: list[str] = typer.Option([], "--set", "-s", help="a run config key for every cut's run, e.g. --set train.steps=4"),
) -> None:
    """Attack success against the client's first cut: the picture for choosing a cut."""
    _quiet_libraries()
    from .models.arch import detect_arch
    from .models.zoo import resolve_model
    from .privacy.leak import sweep
    from .rundir import RunLock

    try:
        wanted = [int(c) for c in cuts.split(",") if c.strip()]
    except ValueError:
        _fail(f"--cuts takes block indices separated by commas, got {cuts!r}")
    names = [a.strip() for a in attack_names.split(",") if a.strip()]
    try:
        n_blocks = detect_arch(resolve_model(model).config()).n_blocks
        from .privacy.attacks.base import make_attack

        for name in names:
            if make_attack(name).observer != "server":
                raise ValueError(f"--attack {name} reads the {make_attack(name).observer}'s tap; leak sweeps the server's view of the first cut")
    except (ValueError, *_user_errors()) as err:
        _fail(str(err))
    kept = [c for c in wanted if 0 <= c < n_blocks]
    if not kept:
        _fail(f"none of --cuts {cuts} fits {model}: a first cut is a block index in 0..{n_blocks - 1}")
    console.print(f"[bold]splittune leak[/] · {escape(model)} · cuts {kept} · {', '.join(names)} · codecs {codecs}", highlight=False)
    with _phase_bar() as progress:
        try:
            with RunLock(out, "leak sweep"):
                result = sweep(model, kept, names, out, aux, data, [c.strip() for c in codecs.split(",") if c.strip()],
                               tuple(set_), progress=progress)
        except _user_errors() as err:
            progress.stop()
            _fail(str(err))
    table = Table(title="attack success by first cut", show_header=True)
    for col in ("codec", "cut", "attack", "ROUGE-L F1", "token accuracy"):
        table.add_column(col)
    for p in result["points"]:
        table.add_row(p["codec"], str(p["cut"]), p["attack"], *(f"{p[k]:.3f}" if p.get(k) is not None else "-" for k in ("rouge_l_f1", "token_accuracy")))
    console.print(table)
    console.print(f"written: [bold green]{out / 'leak.json'}[/] and [bold green]{out / 'leak.png'}[/]")


@app.command()
@_shows_warnings
def privacy(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="the run to defend (YAML); the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key of that run, e.g. --set train.steps=20"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="YAML list of settings {name, defense, dp_sgd, secure_aggregation}; "
                                        "default: none, gaussian, dx, nopeek and label-noise at three strengths"),
    attack_names: Optional[str] = typer.Option(None, "--attack", "-a", help="attacks on every setting, comma-separated; default: those that fit the split"),
    attack_set: list[str] = typer.Option([], "--attack-set", help="an attack option for the grid, e.g. --attack-set inversion.epochs=1"),
    aux: Optional[str] = typer.Option(None, "--aux", help="public auxiliary text; default: a builtin text the run does not train on"),
    budget: float = typer.Option(0.10, "--max-ppl-increase", min=0.0, help="the perplexity increase the recommendation may cost (0.10: 10%)"),
    out: Path = typer.Option(Path("runs/privacy"), "--out", "-o", help="directory for privacy.json, privacy.png, privacy.html and each setting's run"),
) -> None:
    """The privacy–utility frontier: train each defense setting, attack its tap, score it, recommend one."""
    _quiet_libraries()
    from .config import load_config
    from .privacy.grid import default_grid, load_grid, run_grid, scales
    from .privacy.job import default_aux, private_sources
    from .rundir import RunLock

    try:
        options: dict[str, dict] = {}
        for a in attack_set:
            name, dot, rest = a.partition(".")
            if not dot or not rest:
                raise ValueError(f"--attack-set expects attack.option=value, got {a!r}")
            options.setdefault(name, {}).update(_attack_options([rest]))
        cfg = load_config(config, set_)
        from .models.arch import detect_arch
        from .models.zoo import resolve_model

        cfg = cfg.resolve(detect_arch(resolve_model(cfg.model).config()).n_blocks)
        aux = aux or default_aux(private_sources(cfg.model_dump()))
        scale = scales(cfg, aux)
        settings = load_grid(grid, scale) if grid is not None else default_grid(cfg, scale)
        names = [a.strip() for a in attack_names.split(",") if a.strip()] if attack_names else None
    except (ValueError, *_user_errors()) as err:
        _fail(str(err))
    console.print(f"[bold]splittune privacy[/] · {escape(cfg.model)} · cuts {cfg.cuts} · {len(settings)} settings", highlight=False)
    with _phase_bar() as progress:
        try:
            with RunLock(out, "privacy grid"):
                result = run_grid(cfg, settings, out, names, aux, options, budget, progress)
        except _user_errors() as err:
            progress.stop()
            _fail(str(err))
    table = Table(title="privacy–utility", show_header=True)
    for col in ("setting", "eval ppl", *result["attacks"], "DCS"):
        table.add_column(col)
    for r in result["settings"]:
        table.add_row(r["name"], f"{r['eval_ppl']:.3f}", *(f"{r['attacks'][a]['success']:.3f}" if r["attacks"].get(a, {}).get("success") is not None
                                                          else "-" for a in result["attacks"]), f"{r['dcs']:.3f}")
    console.print(table)
    console.print(f"recommended within +{budget:.0%} perplexity: [bold]{escape(result['recommended'])}[/]")
    console.print(f"written: [bold green]{out / 'privacy.json'}[/], [bold green]{out / 'privacy.png'}[/] and [bold green]{out / 'privacy.html'}[/]")


def _attack_options(assignments: list[str]) -> dict:
    """``--set key=value`` pairs as an attack's options (values parsed as YAML: numbers, lists, booleans)."""
    import yaml

    options = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects option=value, got {a!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


class _phase_bar:
    """A progress bar for a job of phases (training an inverter, optimising): ``progress(done, total, what)``;
    plain lines, each phase and every tenth of it, when not on a terminal."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console) if console.is_terminal else None
        if self.bar is not None:
            self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        self.last: dict[str, int] = {}
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.bar is not None:
            if what not in self.tasks:
                self.tasks[what] = self.bar.add_task(escape(what), total=total)
            self.bar.update(self.tasks[what], completed=done, total=total)
            return
        tenth = done * 10 // max(total, 1)
        if self.last.get(what) != tenth:
            self.last[what] = tenth
            console.print(f"{escape(what)}: {done}/{total}", highlight=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@app.command("config")
@_shows_warnings
def config_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set data=my.jsonl"),
    reference: bool = typer.Option(False, "--reference", help="print every key, its default, allowed values and meaning (markdown)"),
    update: Optional[Path] = typer.Option(None, "--update", help="with --reference: rewrite the generated block of this file (docs/config.md)"),
) -> None:
    """Print the validated config (YAML) a run would use, or the reference of every key."""
    from .config import dump_config, load_config
    from .config_reference import reference as make_reference
    from .config_reference import update as update_doc

    if update is not None and not reference:
        _fail("--update rewrites the generated reference block of a file; use it with --reference")
    if reference:
        if update is None:
            print(make_reference(), end="")
            return
        try:
            changed = update_doc(update)
        except (OSError, ValueError) as err:
            _fail(str(err))
        console.print(f"{update}: {'updated' if changed else 'already current'}", highlight=False)
        return
    try:
        cfg = load_config(config, set_)
    except _user_errors() as err:
        _fail(str(err))
    print(dump_config(cfg), end="")


@app.command()
def fetch(
    names: list[str] = typer.Argument(None, help="builtin:smollm2-135m, builtin:shakespeare, builtin:sentiment (all when omitted)"),
    print_path: bool = typer.Option(False, "--print-path", help="print only the local directory of each"),
) -> None:
    """Fetch builtin models and data into the cache for offline use."""
    _quiet_libraries()
    from .data import BUILTIN_SOURCES
    from .data.builtin import builtin_path
    from .models.builtin import BUILTIN_MODELS, builtin_model_dir

    names = names or [f"builtin:{n}" for n in BUILTIN_MODELS] + list(BUILTIN_SOURCES)
    for name in names:
        try:
            if name.removeprefix("builtin:") in BUILTIN_MODELS:
                path = builtin_model_dir(name.removeprefix("builtin:"))
            elif name in BUILTIN_SOURCES:
                path = builtin_path(name)
            else:
                known = [f"builtin:{n}" for n in BUILTIN_MODELS] + list(BUILTIN_SOURCES)
                _fail(f"unknown builtin {name!r}; builtins: {', '.join(known)}")
        except _user_errors() as err:
            _fail(str(err))
        if print_path:
            print(path)
        else:
            console.print(f"{name}: [green]{path}[/]")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
