"""What ``train`` and ``compare`` show while they run: steps, evaluations, and what the run resolved.

On a terminal a rich bar per run, whose phase says what is happening (loading, evaluating ``k/n``
batches, training); elsewhere (CI logs, ``| tee``) plain lines, which a cut-off bar would garble: about
twenty step lines per run (every step of a short one) and one line per evaluation.

The training loop calls ``progress(done, total, row)``: ``row`` is a step's metrics row, or an event with
``row["phase"]`` (``start``, ``eval``, ``evaluated``; see ``run.Loop.event``).
"""

from __future__ import annotations

import contextlib
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_STEP_LINES = 20  # about this many step lines per run in plain output


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def step_info(row: dict, several: bool) -> str:
    who = f"client {row['client']} step {row['step']} · " if several else ""
    return (f"{who}loss {row['loss']:.4f} · ↑{human_bytes(row['bytes_up'])} ↓{human_bytes(row['bytes_down'])} · "
            f"{row['step_s']:.2f}s/step")


def start_line(row: dict) -> str:
    cuts = f"cuts {row['cuts']}" if row.get("cuts") is not None else "no cuts"
    threads = row.get("threads")
    return f"{row.get('shape', '')} · {cuts} · {threads} thread{'s' if threads != 1 else ''}"


def opening_lines(o: dict) -> list[str]:
    """A run's opening (``run/opening.py``) in a few plain lines: data, what trains, the wire, the defenses."""
    cut = o.get("truncated_examples", 0)
    data = f"{o['task']} · {o['train_examples']} training / {o['eval_examples']} held-out examples"
    if cut or o.get("dropped_examples"):
        data += f" · {cut} cut to train.seq_len" + (f", {o['dropped_examples']} dropped" if o.get("dropped_examples") else "")
    trains = f"{o['dtype']} · trains {o['client_trainable']:,} parameters on the client"
    if o.get("server_trainable"):
        trains += f", {o['server_trainable']:,} on the server"
    lines = [data, trains]
    if o.get("codec"):
        lines.append("wire: up " + _codec(o["codec"]["up"]) + " · down " + _codec(o["codec"]["down"]))
    if o.get("defenses"):
        lines.append("defenses: " + ", ".join(f"{n} (ε ≤ {e:.3g} by the last step)" if e is not None else f"{n} (no ε)"
                                              for n, e in o["defenses"].items()))
    return lines


def _codec(spec) -> str:
    if isinstance(spec, dict):
        if "name" in spec:
            params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
            return f"{spec['name']}({params})" if params else spec["name"]
        return ", ".join(f"{role} {_codec(s)}" for role, s in spec.items())
    return str(spec)


class RunProgress:
    """Progress of one or several named runs (``compare``'s entries) on one console."""

    def __init__(self, console: Console, several_clients: bool = False, name_width: int = 0):
        self.console = console
        self.terminal = console.is_terminal
        self.several = several_clients
        self.width = name_width
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.last_line: dict[str, int] = {}
        self.on_start: Callable[[str, dict], None] | None = None

    @contextlib.contextmanager
    def live(self):
        if self.terminal:
            self.bar = Progress(TextColumn(f"[bold blue]{{task.fields[name]:<{self.width}}}" if self.width else "[bold blue]{task.fields[phase]:<10}"),
                                BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=self.console, transient=False)
            with self.bar:
                yield self
            self.bar = None
        else:
            yield self

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def add(self, name: str, total: int, info: str = "loading model and data…") -> None:
        if name in self.tasks or name in self.last_line:
            return
        if self.bar is not None:
            self.tasks[name] = self.bar.add_task(name, total=total, name=name, phase="loading", info=info)
        else:
            self.last_line[name] = 0
            self._line(name, info)

    def note(self, name: str, info: str) -> None:
        """A state that is not a step (stopping, say)."""
        if self.bar is not None and name in self.tasks:
            self.bar.update(self.tasks[name], info=info)
        else:
            self._line(name, info)

    def _line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self.width}} " if self.width else ""
        self.console.print(escape(prefix + text), highlight=False, soft_wrap=True)

    def update(self, name: str, done: int, total: int, row: dict) -> None:
        self.add(name, total)
        phase = row.get("phase")
        task = self.tasks.get(name)
        if phase == "start":
            if self.on_start is not None:
                self.on_start(name, row)
            if task is not None:
                self.bar.update(task, completed=done, total=total, phase="starting", info="")
            self._line(name, start_line(row))
            for line in opening_lines(row["opening"]) if row.get("opening") else []:
                self._line(name, line)
        elif phase == "eval":
            text = f"evaluating {row['label']}: {done}/{total} batches"
            if task is not None:
                self.bar.update(task, phase="evaluating", info=text)
            elif done < total and (done == 1 or done % max(1, total // 4) == 0):  # the end is the 'evaluated' line
                self._line(name, text)
        elif phase == "evaluated":
            text = f"eval {row['label']}: loss {row['loss']:.4f} · ppl {row['ppl']:.2f}"
            if task is not None:
                self.bar.update(task, phase="training", info=text)
            else:
                self._line(name, text)
        elif phase is None:  # a step
            info = step_info(row, self.several)
            if task is not None:
                self.bar.update(task, completed=done, total=total, phase="training", info=info)
            else:
                every = max(1, total // PLAIN_STEP_LINES)
                if done % every == 0 or done == total:
                    self._line(name, f"step {done}/{total} · {info}")
