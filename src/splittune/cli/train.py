"""``train`` (in one process, or as one client of ``splittune serve``) and ``compare``."""

from __future__ import annotations

import errno
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import Output, console, err_console, fail, human_bytes, quiet_libraries, shows_warnings, user_errors
from .options import ClientId, ReplyTimeout, Server, TapMaxBytes, TlsCa, TlsCert, TlsKey, TokenFile, grpc_client


@shows_warnings
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set train.steps=5 --set cuts=[1,3]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/<timestamp>)"),
    server: Server = None,
    client_id: ClientId = "anonymous",
    token_file: TokenFile = None,
    client_index: int = typer.Option(0, "--client-index", min=0, help="this client's index in a run of several clients"),
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    reply_timeout: ReplyTimeout = 3600.0,
    record_tap: Optional[str] = typer.Option(None, "--record-tap", help="record what an observer sees into RUN_DIR/tap for "
                                             "`splittune attack`: server, aggregator, eavesdropper (several with commas; in-process runs)"),
    tap_max_bytes: TapMaxBytes = "1GiB",
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="run on the Ray cluster at this address "
                                              "(engine: ray; `ray start --head` prints it); engine: ray without it starts a local one"),
) -> None:
    """Fine-tune a model split between a client and a server: in one process, or against `splittune serve`."""
    quiet_libraries()
    from ..config import ConfigError, load_config
    from ..device import resolve_device
    from ..run import train as run_train

    try:
        cfg = load_config(config, [*set_, *(["engine=ray", f"ray.address={json.dumps(ray_address)}"] if ray_address else [])])
        device = resolve_device(cfg.train.device)
        if server is not None and cfg.engine == "ray":
            raise ConfigError("--server joins a server started with `splittune serve`, and engine: ray starts the server in a "
                              "Ray actor; use one of them")
        if server is not None:
            if record_tap is not None:
                raise ConfigError("--record-tap records an in-process run's observers; against a deployed server, its operator "
                                  "records with `splittune serve --record-tap DIR` (this client's sent.jsonl notes what it sent)")
            run_train = remote_trainer(server, client_id, token_file, client_index, tls_ca, tls_cert, tls_key, reply_timeout)
        elif record_tap is not None:
            from ..taps.recording import parse_observers

            run_train = functools.partial(run_train, record_tap=parse_observers(record_tap), tap_max_bytes=tap_max_bytes)
    except user_errors() as err:
        fail(str(err))
    if out is None:
        import time

        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    who = f" · {cfg.clients} clients, {cfg.schedule if cfg.mode == 'split' else cfg.mode}" if cfg.clients > 1 else ""
    cuts = f"cuts {cfg.cuts}" if cfg.cuts is not None else ("cuts auto" if cfg.mode == "split" else "no cuts")
    console.print(f"[bold]splittune train[/] · model [cyan]{escape(cfg.model)}[/] on {device} · mode {cfg.mode} · {cuts} · "
                  f"{cfg.train.steps} steps · data {escape(cfg.data.source)}{who}")
    total = cfg.train.steps * (cfg.clients if cfg.mode != "centralized" else 1)
    from ..report.progress import RunProgress

    shown = RunProgress(console, several_clients=cfg.clients > 1)

    def started(name: str, row: dict) -> None:
        if row.get("resume"):
            console.print(f"resuming from step {row['resume']}", highlight=False)

    shown.on_start = started
    with shown.live() as bar:
        bar.add("train", total)

        def progress(done: int, total: int, row: dict) -> None:
            bar.update("train", done, total, row)
            if Output.json:
                Output.emit(sys.stdout, event=row.get("phase") or "step", done=done, total=total, **row)

        from ..run import STOP, Interrupted

        def stop(signum, frame):  # finish the step (or leave an evaluation), save a checkpoint, exit; the same command resumes
            if STOP.is_set():  # asked twice: stop now, from the last checkpoint
                raise KeyboardInterrupt
            STOP.set()
            bar.note("train", "stopping after this step… (again to stop at once, losing the steps since the last checkpoint)")

        STOP.clear()
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            summary = run_train(cfg, out, progress)
        except Interrupted as err:
            bar.stop()
            err_console.print(f"[bold yellow]{err}[/]")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            bar.stop()
            err_console.print("[bold yellow]stopped at once; run the same command to resume from the last checkpoint[/]")
            raise typer.Exit(130) from None
        except user_errors() as err:
            bar.stop()
            fail(str(err))
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            bar.stop()  # checkpoints are written whole or not at all: the last complete one is where the run resumes
            fail(f"the disk is full: cannot write {err.filename or out} ({err.strerror}); free space (or use another --out) "
                  f"and run the same command to resume from the last checkpoint")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    _print_summary(summary, out)
    if Output.json:
        Output.emit(sys.stdout, event="summary", run=str(out), **summary)


@shows_warnings
def compare(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set clients=4 --set partition=dirichlet"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the runs, compare.json and compare.png"),
) -> None:
    """Train centralized, federated and split (sequential, sfl-v1, sfl-v2) on the same data and budget."""
    quiet_libraries()
    from ..compare import ENTRIES
    from ..compare import compare as run_compare
    from ..config import load_config

    try:
        cfg = load_config(config, set_)
        if cfg.clients == 1:
            cfg = load_config(config, [*set_, "clients=3"])
            console.print("[dim]compare needs several clients; using clients=3 (--set clients=N to choose)[/]")
    except user_errors() as err:
        fail(str(err))
    console.print(f"[bold]splittune compare[/] · model [cyan]{escape(cfg.model)}[/] · {cfg.clients} clients × {cfg.train.steps} steps · "
                  f"data {escape(cfg.data.source)} ({cfg.partition}) · {', '.join(ENTRIES)}")
    from ..report.progress import RunProgress

    with RunProgress(console, several_clients=True, name_width=max(map(len, ENTRIES))).live() as bar:

        def progress(entry: str, done: int, total: int, row: dict) -> None:
            bar.update(entry, done, total, row)

        try:
            results = run_compare(cfg, out, progress)
        except user_errors() as err:
            bar.stop()
            fail(str(err))
    table = Table(title="same data, same examples seen", show_header=True)
    for col in ("", "eval loss before", "after", "train loss (last)", "↑ sent", "↓ received", "wall"):
        table.add_column(col, justify="right", no_wrap=not col)  # entry names stay whole on narrow terminals
    skipped = {name: r["skipped"] for name, r in results.items() if "skipped" in r}
    for name, r in results.items():
        if name in skipped:  # the reason goes under the table: in a cell it wraps into a tall column
            table.add_row(name, "[dim]skipped[/]", "", "", "", "", "")
            continue
        table.add_row(name, f"{r['eval_loss_before']:.4f}", f"{r['eval_loss_after']:.4f}", f"{r['train_loss_last']:.4f}",
                      human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), f"{r['wall_s']:.1f} s")
    console.print(table)
    for name, reason in skipped.items():
        console.print(f"[dim]{name} skipped: {escape(reason)}[/]", highlight=False)
    console.print(f"written: [bold green]{out / 'compare.json'}[/], [bold green]{out / 'compare.png'}[/] and one run directory per entry")


def remote_trainer(url, client_id, token_file, client_index, ca, cert, key, reply_timeout_s):
    """``train`` for one client process talking gRPC to ``url``."""
    from ..run import train_remote

    channel = grpc_client(url, client_id, token_file, ca, cert, key, reply_timeout_s)
    return lambda cfg, out, progress: train_remote(cfg, out, client_index, lambda index: channel(), progress)


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
        f"bytes sent: client → server [bold]{human_bytes(s['bytes_up'])}[/] · server → client [bold]{human_bytes(s['bytes_down'])}[/] "
        f"({s['steps']} steps; evaluation adds ↑{human_bytes(s['eval_bytes_up'])} ↓{human_bytes(s['eval_bytes_down'])})"
    )
    console.print(
        f"client holds {s['client_params'] / 1e6:.2f} M parameters ({human_bytes(s['client_bytes'])}), "
        f"server {s['server_params'] / 1e6:.2f} M ({human_bytes(s['server_bytes'])}) · {s['step_s_mean']:.3f} s/step · {s['wall_s']:.1f} s in all"
    )
    if "time_median_s" in s:  # where a median step's time went (docs/efficiency.md)
        t = s["time_median_s"]
        errors = " · ".join(f"codec error {d} {s[f'codec_error_{d}']:.2e}" for d in ("up", "down") if f"codec_error_{d}" in s)
        console.print(f"median step {t['step_s']:.3f} s = client compute {t['compute_s']:.3f} + codecs {t['codec_s']:.3f} + waiting "
                      f"{t['wait_s']:.3f} (its round trips: server {t['server_s']:.3f} s, wire {t['wire_s']:.3f} s)"
                      + (f" · {errors}" if errors else ""), highlight=False)
    cache = s.get("cache")
    if cache and cache["on"]:  # docs/efficiency.md: Activation cache
        console.print(f"activation cache: {cache['hits']} rows reused, {cache['misses']} sent, {cache['evictions']} evicted · "
                      f"{cache['bottom_forwards_skipped']} bottom forwards skipped · {human_bytes(cache['bytes_saved_up'])} not sent up",
                      highlight=False)
    if s.get("clients", 1) > 1:
        clients = Table(title=f"{s['clients']} clients · {s['schedule']}", show_header=True)
        for col in ("client", "cuts", "rank", "train examples", "eval loss before", "after (own model, own data)", "↑ sent", "↓ received"):
            clients.add_column(col, justify="right")
        for c in s["per_client"]:
            clients.add_row(str(c["client"]), str(c["cuts"]), str(c["lora_rank"]), str(c["train_examples"]),
                            f"{c['eval_loss_before']:.4f}", f"{c['eval_loss_after']:.4f}",
                            human_bytes(c["bytes_up"]), human_bytes(c["bytes_down"]))
        console.print(clients)
    console.print(f"run directory: [bold green]{out}[/] (summary.json, metrics.jsonl, loss.png, adapters/)")
