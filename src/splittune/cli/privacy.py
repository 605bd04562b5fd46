"""What an observer can reconstruct, and what defenses cost: ``attack``, ``leak`` and ``privacy``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import console, fail, quiet_libraries, shows_warnings, stops_cleanly, user_errors


@shows_warnings
@stops_cleanly("the attack was interrupted; nothing was written (run it again to score it)")
def attack(
    run_dir: Path = typer.Argument(..., help="a run directory with a recorded tap (train --record-tap), or a serve --record-tap DIR"),
    attack_name: str = typer.Option(..., "--attack", "-a", help="inversion | optimization | generation-inversion | gradient-labels | label-inference | aggregator"),
    aux: Optional[str] = typer.Option(None, "--aux", help="public auxiliary text (a data source); default: a builtin text the run did not train on"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where attack.json and attack.html go (default: RUN_DIR/attacks/NAME)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="an attack option, e.g. --set epochs=5 (see docs/privacy.md)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the public base model (default: the run's `model:`)"),
    truth: Optional[Path] = typer.Option(None, "--truth", help="generation-inversion: the client's `splittune generate --json` "
                                         "output, to score the recovered prompts and responses against"),
) -> None:
    """How much of the client's text could an observer reconstruct? Run one attack on a run's tap and score it."""
    quiet_libraries()
    from ..privacy.job import attack_run

    try:
        options = _attack_options(set_)
    except ValueError as err:
        fail(str(err))
    console.print(f"[bold]splittune attack[/] · {escape(attack_name)} on {escape(str(run_dir))}", highlight=False)
    shown = _phase_bar()
    with shown as progress:
        try:
            result = attack_run(run_dir, attack_name, aux, out, options, model, progress, truth)
        except user_errors() as err:
            progress.stop()
            fail(str(err))
    figures = " · ".join(f"{k} {result[k]:.3f}" for k in ("rouge_l_f1", "token_accuracy", "leak_auc", "precision", "recall", "f1",
                                                          "prompt_rouge_l_f1", "prompt_token_accuracy", "response_rouge_l_f1",
                                                          "response_token_accuracy")
                         if isinstance(result.get(k), (int, float)))
    console.print(f"{escape(attack_name)}: {figures or escape(result.get('scored', ''))} ({result['seconds']} s)", highlight=False)
    where = Path(out) if out is not None else Path(run_dir) / "attacks" / attack_name
    console.print(f"written: [bold green]{where / 'attack.json'}[/] and [bold green]{where / 'attack.html'}[/]")
    _track_attack(run_dir, attack_name, result)


def _track_attack(run_dir: Path, attack_name: str, result: dict, say: bool = True) -> list[str]:
    """The scores into the tracker runs the run logged to (report_to), if any; the attack's files stand either way."""
    from ..config import warn
    from ..track import log_attack

    try:
        logged = log_attack(Path(run_dir), attack_name, result)
    except user_errors() as err:
        warn(f"the scores of {attack_name} on {run_dir} were not added to its trackers: {err}")
        return []
    if logged and say:
        console.print(f"scores added to the run's tracking: {', '.join(logged)}", highlight=False)
    return logged


def _track_grid(out: Path, result: dict, since: float) -> None:
    """Each setting's attacks scored by this command (not those a resumed grid reused) into that setting's tracker
    runs, where its config had report_to."""
    import json

    tracked = set()
    for row in result["settings"]:
        folder = out / "cells" / row["name"]
        for name in result["attacks"]:
            done = folder / "attacks" / name / "attack.json"
            if done.exists() and done.stat().st_mtime >= since and _track_attack(folder, name, json.loads(done.read_text()), say=False):
                tracked.add(row["name"])
    if tracked:
        console.print(f"attack scores added to the tracking of the settings' runs: {', '.join(sorted(tracked))}", highlight=False)


@shows_warnings
@stops_cleanly("the sweep was interrupted; the runs and attacks that finished are kept in --out and reused by the same command")
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
    quiet_libraries()
    from ..models.arch import detect_arch
    from ..models.zoo import resolve_model
    from ..privacy.leak import sweep
    from ..rundir import RunLock

    try:
        wanted = [int(c) for c in cuts.split(",") if c.strip()]
    except ValueError:
        fail(f"--cuts takes block indices separated by commas, got {cuts!r}")
    names = [a.strip() for a in attack_names.split(",") if a.strip()]
    try:
        n_blocks = detect_arch(resolve_model(model).config()).n_blocks
        from ..privacy.attacks.catalog import make_attack

        for name in names:
            if make_attack(name).observer != "server":
                raise ValueError(f"--attack {name} reads the {make_attack(name).observer}'s tap; leak sweeps the server's view of the first cut")
    except (ValueError, *user_errors()) as err:
        fail(str(err))
    kept = [c for c in wanted if 0 <= c < n_blocks]
    if not kept:
        fail(f"none of --cuts {cuts} fits {model}: a first cut is a block index in 0..{n_blocks - 1}")
    console.print(f"[bold]splittune leak[/] · {escape(model)} · cuts {kept} · {', '.join(names)} · codecs {codecs}", highlight=False)
    with _phase_bar() as progress:
        try:
            with RunLock(out, "leak sweep"):
                result = sweep(model, kept, names, out, aux, data, [c.strip() for c in codecs.split(",") if c.strip()],
                               tuple(set_), progress=progress)
        except user_errors() as err:
            progress.stop()
            fail(str(err))
    table = Table(title="attack success by first cut", show_header=True)
    for col in ("codec", "cut", "attack", "ROUGE-L F1", "token accuracy"):
        table.add_column(col)
    for p in result["points"]:
        table.add_row(p["codec"], str(p["cut"]), p["attack"], *(f"{p[k]:.3f}" if p.get(k) is not None else "-" for k in ("rouge_l_f1", "token_accuracy")))
    console.print(table)
    console.print(f"written: [bold green]{out / 'leak.json'}[/] and [bold green]{out / 'leak.png'}[/]")


@shows_warnings
@stops_cleanly("the grid was interrupted; the runs and attacks that finished are kept in --out and reused by the same command")
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
    quiet_libraries()
    from ..config import load_config
    from ..privacy.grid import default_grid, load_grid, run_grid, scales
    from ..privacy.job import default_aux, private_sources
    from ..rundir import RunLock

    try:
        options = _grid_options(attack_set)
        cfg = load_config(config, set_)
        from ..models.arch import detect_arch
        from ..models.zoo import resolve_model

        cfg = cfg.resolve(detect_arch(resolve_model(cfg.model).config()).n_blocks)
        aux = aux or default_aux(private_sources(cfg.model_dump()))
        scale = scales(cfg, aux)
        settings = load_grid(grid, scale) if grid is not None else default_grid(cfg, scale)
        names = [a.strip() for a in attack_names.split(",") if a.strip()] if attack_names else None
    except (ValueError, *user_errors()) as err:
        fail(str(err))
    console.print(f"[bold]splittune privacy[/] · {escape(cfg.model)} · cuts {cfg.cuts} · {len(settings)} settings", highlight=False)
    with _phase_bar() as progress:
        try:
            with RunLock(out, "privacy grid"):
                started = time.time()
                result = run_grid(cfg, settings, out, names, aux, options, budget, progress)
        except user_errors() as err:
            progress.stop()
            fail(str(err))
    _track_grid(out, result, started)
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


def _grid_options(assignments: list[str]) -> dict[str, dict]:
    """``--attack-set attack.option=value`` pairs as each attack's options."""
    options: dict[str, dict] = {}
    for a in assignments:
        name, dot, rest = a.partition(".")
        if not dot or not rest:
            from ..config import ConfigError

            raise ConfigError(f"--attack-set expects attack.option=value, got {a!r}")
        options.setdefault(name, {}).update(_attack_options([rest]))
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
