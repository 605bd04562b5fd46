"""``splittune dashboard RUN_DIR``: a web page that follows a run while it trains, and after."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .app import console, fail, user_errors


def dashboard(
    run_dir: Path = typer.Argument(..., help="the run directory (train --out) to follow"),
    listen: str = typer.Option("127.0.0.1:8050", "--listen", help="HOST:PORT to serve the page on (port 0: any free port); "
                               "off loopback it needs a token"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="a file holding the page's token (else "
                                              "$SPLITTUNE_DASHBOARD_TOKEN); required off loopback"),
) -> None:
    """Serve a live page of a run: loss and eval curves, bytes each way, where step time goes, codec error, privacy
    budget, clients. It updates itself as the run writes its files."""
    import signal
    import threading

    from ..track.dashboard import RunView, read_token, serve

    try:
        view = RunView(run_dir)
        token = read_token(token_file, dict(os.environ), "--token-file")
        running = serve(listen, "run.html", view.endpoints(), token)
    except user_errors() as err:
        fail(str(err))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # (before the banner: whoever read it may stop us at once)
    console.print(f"[bold]splittune dashboard[/] · {run_dir} · listening on {running.url}"
                  f"{' (open it once with ?token=…)' if token else ''}", highlight=False, soft_wrap=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
