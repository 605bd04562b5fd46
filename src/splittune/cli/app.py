"""The ``splittune`` command's app: the typer application, library quieting, and the one way every command
reports a user-facing error (one ``error:`` line) or a warning (one ``warning:`` line)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping

import typer
from rich.console import Console
from typer import rich_utils
from rich.markup import escape


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Split-learning fine-tuning of large language models.")

class _Environ(Mapping):
    """The environment as rich reads it for each line: ``COLUMNS``, or 200 when the output is not a terminal (a pipe,
    a log), so a table is not cut to rich's 80-column fallback ("centra…")."""

    def __init__(self, stream: str):
        self.stream = stream

    def __getitem__(self, key: str) -> str:
        if key == "COLUMNS" and key not in os.environ and not getattr(sys, self.stream).isatty():
            return "200"
        return os.environ[key]

    def __iter__(self):
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


console = Console(_environ=_Environ("stdout"))

err_console = Console(stderr=True, _environ=_Environ("stderr"))


def _usage_error(err) -> None:
    """A usage error (a missing option, a value of the wrong type, an unknown command) as the one ``error:`` line
    every other error is, naming the command whose ``--help`` lists what it takes. typer draws these as a box
    (``rich_utils.rich_format_error``); splittune replaces that one function and keeps the rest of typer's output."""
    ctx = getattr(err, "ctx", None)
    path = " ".join(["splittune", *ctx.command_path.split()[1:]]) if ctx is not None and ctx.command_path else ""
    see = f" (see `{path} --help`)" if path else ""  # the program's name, however it was started
    err_console.print(f"[bold red]error:[/] {escape(err.format_message())}{escape(see)}", soft_wrap=True)


rich_utils.rich_format_error = _usage_error


class Output:
    """How this invocation speaks, from the app's options: ``--quiet`` (errors and warnings only), ``--verbose``
    (the libraries' own logs too), ``--log-format json`` (errors and warnings as JSON lines on stderr, progress and
    the result as JSON lines on stdout, for a machine to read)."""

    quiet = False
    verbose = False
    json = False

    @classmethod
    def emit(cls, stream, **fields) -> None:
        stream.write(json.dumps(fields, default=str) + "\n")
        stream.flush()


def quiet_libraries() -> None:
    """Library chatter (hub warnings, peft notices) hides what the user asked for; errors still surface
    (``--verbose`` keeps it)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    if Output.verbose:
        transformers.utils.logging.set_verbosity_info()
        return
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core prints connection notices (GOAWAY) at INFO
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it tries a hub kernel first on every import
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

_debug = False  # --debug (or SPLITTUNE_DEBUG=1): an error line is followed by its traceback


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="after an error, print its Python traceback (also SPLITTUNE_DEBUG=1)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors and warnings"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also the libraries' own logs (transformers, gRPC)"),
    log_format: str = typer.Option("text", "--log-format", help="text | json: errors and warnings as JSON lines on stderr, "
                                   "progress and results as JSON lines on stdout"),
) -> None:
    global _debug
    _debug = debug
    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format!r}: the formats are text and json")
    Output.quiet, Output.verbose, Output.json = quiet, verbose, log_format == "json"
    console.quiet = quiet or Output.json  # set on every invocation: the console outlives one command in tests


def fail(message: str) -> None:
    if Output.json:
        Output.emit(sys.stderr, level="error", message=message)
        raise typer.Exit(2)
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
    from ..config import SplittuneWarning

    with warnings.catch_warnings():
        warnings.simplefilter("default", SplittuneWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SplittuneWarning) and Output.json:
                Output.emit(sys.stderr, level="warning", message=str(message))
            elif issubclass(category, SplittuneWarning):
                err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def shows_warnings(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        with _warnings_shown():
            return command(*args, **kwargs)

    return run


def stops_cleanly(what: str):
    """Ctrl-C or SIGTERM stops a job that keeps no checkpoint (an attack, a sweep) at once, with one line saying what
    was kept, never a traceback (``train`` has its own: it finishes the step and checkpoints)."""
    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            import signal

            def interrupt(signum, frame):
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, interrupt)
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                err_console.print(f"[bold yellow]stopped: {what}[/]", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
            finally:
                signal.signal(signal.SIGTERM, previous)

        return run

    return wrap


def user_errors() -> tuple[type[Exception], ...]:
    """What the CLI reports as one ``error:`` line: every user-facing error derives from one base."""
    from ..errors import SplittuneError

    return (SplittuneError,)


def human_bytes(n: float) -> str:
    from ..report.progress import human_bytes

    return human_bytes(n)


def size_option(value: str | None) -> int | None:
    """``--max-cache-bytes``: a byte count or a size like 512MB (config.parse_size)."""
    from ..config import parse_size

    if value is None:
        return None
    try:
        return parse_size(value if not value.isdigit() else int(value))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def threads_option(value: str) -> str | int:
    """``--threads``: auto or a count >= 1 (a lone party's auto: every core)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be auto or an integer >= 1, got {value!r}")
    return int(value)


def main() -> None:  # pragma: no cover
    app()

