"""Measuring and choosing: ``bench``, ``verify`` and ``plan``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import console, err_console, fail, human_bytes, quiet_libraries, shows_warnings, user_errors


@shows_warnings
def bench(
    suite: str = typer.Option("quick", "--suite", help="quick (a tiny model, then a short builtin run; minutes on a laptop) | full (the builtin "
                              "model) | memory (each party's peak at Llama-3.2-1B and Llama-3.1-8B shapes by precision; "
                              "writes 19 GB of random checkpoints once, needs about 20 GB of memory) | gpu (the same shapes "
                              "in bf16 and nf4, the server on a CUDA GPU, the client on the CPU and on the GPU) | scale (8 "
                              "clients in-process against the server's trunk in a Ray actor; needs ray)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="run every part of the suite on this model instead"),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="directory for bench.json, report.md, report.html and the plots"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key in every entry, e.g. --set train.seq_len=256"),
    reps: Optional[int] = typer.Option(None, "--reps", min=1, help="measured rounds per entry (default: the suite's)"),
    only: list[str] = typer.Option([], "--only", help="time only this entry (repeatable; centralized always runs)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="compute threads for every entry (default: every core)"),
    no_memory: bool = typer.Option(False, "--no-memory", help="skip the per-party memory runs (each party in its own process)"),
) -> None:
    """Measure centralized, split, codecs, pipelining, slow links and several clients side by side, with a report."""
    quiet_libraries()
    from ..bench import run_bench, select, suite as get_suite, total_ticks
    from ..rundir import RunLock

    if suite in ("memory", "gpu"):
        return _footprint(out, threads, gpu=suite == "gpu")
    try:
        parts = select(get_suite(suite), only or None, model)
    except user_errors() as err:
        fail(str(err))
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
        except user_errors() as err:
            if bar is not None:
                bar.stop()
            fail(str(err))
    from ..bench.report import TERSE, terse_row

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


def _footprint(out: Path, threads: int | None, gpu: bool = False) -> None:
    """``bench --suite memory`` (measured and estimated peaks per party at real models' shapes) and ``--suite gpu``
    (the server on the GPU, the client on either; ``bench/footprint.py``)."""
    import json

    from ..bench.footprint import gpu_table, plot, run_footprint, run_gpu, table
    from ..rundir import RunLock
    from ..threads import available_cores

    def tick(what: str, advance: int, _total: int) -> None:
        if not advance:
            console.print(escape(what), highlight=False)

    name = "gpu" if gpu else "footprint"
    try:
        with RunLock(out, "bench"):
            out.mkdir(parents=True, exist_ok=True)
            rows = (run_gpu if gpu else run_footprint)(out / "runs", threads or available_cores(), tick=tick)
    except user_errors() as err:
        fail(str(err))
    text = gpu_table(rows) if gpu else table(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(text + "\n")
    if not gpu:
        plot(rows, out)
    console.print(text, highlight=False, soft_wrap=True)
    for r in rows:
        for why in (r.get("server_skipped"), r.get("error")):
            if why:
                err_console.print(f"[bold yellow]warning:[/] {r['shape']} {r['precision']}: {escape(why)}", highlight=False)
    console.print(f"written: [bold green]{out / (name + '.json')}[/] and [bold green]{out / (name + '.md')}[/]"
                  + ("" if gpu else f" and [bold green]{out / 'footprint.png'}[/]"))


@shows_warnings
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
    quiet_libraries()
    from ..config import load_config
    from ..verify import verify as run_verify

    try:
        cut_list = [int(c) for c in cuts.replace(" ", "").strip("[]").split(",") if c]
    except ValueError:
        fail(f"--cuts must be one or two block indices like 2 or 2,28; got {cuts!r}")
    try:
        cfg = load_config(None, [f"model={model}", f"cuts={cut_list}", *set_])
        report = run_verify(cfg, batch=batch, seq=seq, padding=padding, tolerance=tolerance)
    except user_errors() as err:
        fail(str(err))
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


@shows_warnings
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
    max_leak: Optional[float] = typer.Option(None, "--max-leak", help="privacy target: the most ROUGE-L the strongest adaptive "
                                             "attack may recover (0..1); picks a defense too, from a leak table measured once per model"),
    leak_cuts: str = typer.Option("1,2,4,8,15", "--leak-cuts", help="--max-leak: first cuts the leak table measures (those past the model are dropped)"),
    leak_defenses: Optional[str] = typer.Option(None, "--leak-defenses", help="--max-leak: defenses the table tries, comma-separated "
                                                "(default: every defense's sweep)"),
    leak_data: str = typer.Option("builtin:sentiment", "--leak-data", help="--max-leak: private-like text the table's short runs train on"),
    aux: Optional[str] = typer.Option(None, "--aux", help="--max-leak: the attacker's public text (default: a builtin text other than --leak-data)"),
    attack_set: list[str] = typer.Option([], "--attack-set", help="--max-leak: an option of the table's attack, e.g. inversion.epochs=2"),
) -> None:
    """Profile the model here and pick cuts, codecs, micro-batches and checkpointing that fit the memory given (and, with
    --max-leak, the defense that keeps the strongest adaptive attack within the target)."""
    quiet_libraries()
    import json

    from ..config import ConfigError, load_config
    from ..plan import profile_model, search
    from ..plan.output import config_yaml, link_words, plan_json
    from ..plan.units import parse_rate, parse_size, parse_time

    try:
        client_bytes = parse_size(client_memory, "--client-memory")
        server_bytes = parse_size(server_memory, "--server-memory") if server_memory is not None else None
        mbps, ms = parse_rate(bandwidth, "--bandwidth"), parse_time(latency, "--latency")
        for flag, value, least in (("--batch", batch, 1), ("--seq-len", seq_len, 8), ("--top", top, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if server_speed <= 0:
            raise ConfigError(f"--server-speed must be positive, got {server_speed:g}")
        from ..plan.search import LOSS

        names = tuple(c.strip() for c in codecs.split(",") if c.strip())
        unknown = [c for c in names if c not in LOSS]
        if unknown or not names:
            raise ConfigError(f"--codecs {codecs!r}: {', '.join(unknown) or 'none given'}; codecs: {', '.join(LOSS)}")
        sets = [*set_, *([f"model={model}"] if model else []), *([f"train.batch_size={batch}"] if batch else []),
                *([f"train.seq_len={seq_len}"] if seq_len else [])]
        base = load_config(config, sets)
        t = base.train
        from ..run.loop import computes_concurrently
        from ..threads import resolve_threads

        threads = resolve_threads(t.threads, computes_concurrently(base))  # the count the run itself will compute with
        table_of_leaks = (_leak_table(base.model, max_leak, leak_cuts, leak_defenses, leak_data, aux, attack_set, quiet=as_json)
                          if max_leak is not None else None)
        shown = err_console if as_json else console
        with shown.status(f"profiling {escape(base.model)}…") as status:
            profile = profile_model(base.model, batch=t.batch_size, seq_len=t.seq_len, dtype=t.dtype, device=t.device,
                                    cfg=base if (config is not None or set_) else None, estimate=estimate, threads=threads,
                                    progress=lambda what: status.update(escape(what) + "…"))
            status.update(f"weighing every choice for {escape(base.model)}…")
            result = search(base, profile, client_bytes, server_bytes, mbps, ms, shape, names, server_speed=server_speed,
                            leak=table_of_leaks, max_leak=max_leak)
    except user_errors() as err:
        fail(str(err))
    best = result.ranked[:top]
    if write_config is not None:
        write_config.write_text(config_yaml(best[0], profile, client_bytes, server_bytes, mbps, ms))
    if as_json:
        print(json.dumps(plan_json(best, profile, result.considered, result.notes), indent=2))
        return
    how = "estimated from the config" if profile.estimated else f"profiled on {profile.device} ({profile.threads} threads, as the run will use)"
    console.print(f"[bold]splittune plan[/] · [cyan]{escape(profile.model)}[/] · {how} · batch {profile.batch} × {profile.seq_len} · "
                  f"client {human_bytes(client_bytes)}, server {human_bytes(server_bytes) if server_bytes else 'unbounded'} · "
                  f"{link_words(mbps, ms)}", highlight=False)
    table = Table(title=f"the {len(best)} fastest of {len(result.ranked)} choices that fit ({result.considered} weighed)",
                  box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    guarded = ("defense", "leak", "ppl ×") if max_leak is not None else ()
    for col in ("cuts", "shape", "client\nblocks", "codec\n↑/↓", "micro-\nbatches", "ckpt", "step", "client\npeak",
                "server\npeak", "↑ per\nstep", "↓ per\nstep", *guarded):
        table.add_column(col, justify="left" if col in ("cuts", "shape", "codec\n↑/↓", "defense") else "right", no_wrap=True)
    lossy = {"bf16", "fp16", "int8", "int4", "topk"}
    for r in best:
        c, p = r.choice, r.prediction
        codecs = "/".join(f"{x}*" if x in lossy else x for x in (c.up, c.down))
        table.add_row(",".join(map(str, c.cuts)), "U" if c.shape == "u-shape" else "2-part", str(p.client_blocks), codecs,
                      str(c.micro_batches), "on" if c.checkpointing else "off", f"{p.step_s:.3g} s", _compact(p.client_peak_bytes),
                      _compact(p.server_peak_bytes), _compact(p.bytes_up), _compact(p.bytes_down), *_guard_cells(r))
    console.print(table)
    if best[0].guard is not None:
        g = best[0].guard
        console.print(f"#1 leak: ROUGE-L {g.point.leak:.3f} (upper 95% bound {g.point.leak_hi:.3f}, {g.point.texts} texts) ≤ "
                      f"{max_leak:g}: {'sure' if g.sure else 'likely (the mean is within the target, its upper bound is not)'}"
                      f"{' · ' + g.how if g.how else ''} · leak table: {len(table_of_leaks.points)} points in "
                      f"{escape(str(table_of_leaks.folder))}", highlight=False)
    from ..plan.search import footprint

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


def _guard_cells(r) -> tuple[str, ...]:
    """--max-leak's columns: the defense setting, the measured leak (with its bound's sureness), the perplexity cost."""
    if r.guard is None:
        return ()
    p = r.guard.point
    return (p.setting, f"{p.leak:.2f}{'' if r.guard.sure else '?'}", f"{p.ppl_ratio:.2f}")


def _leak_table(model: str, target: float, cuts: str, defenses: str | None, data: str, aux: str | None, attack_set: list[str],
                quiet: bool = False):
    """The leak table --max-leak plans from (measured now, with a progress bar, unless the run cache holds it)."""
    from ..config import ConfigError
    from ..models.arch import detect_arch
    from ..models.zoo import resolve_model
    from ..defenses import DEFENSES
    from ..privacy.leak_table import measure, table_folder
    from .privacy import _grid_options, _phase_bar

    if not 0 <= target <= 1:
        raise ConfigError(f"--max-leak is a ROUGE-L F1 between 0 and 1, got {target:g}")
    try:
        wanted = [int(c) for c in cuts.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--leak-cuts takes block indices separated by commas, got {cuts!r}") from None
    n_blocks = detect_arch(resolve_model(model).config()).n_blocks
    kept = [c for c in wanted if 1 <= c < n_blocks]
    if not kept:
        raise ConfigError(f"none of --leak-cuts {cuts} fits {model}: a first cut is a block index in 1..{n_blocks - 1}")
    names = [d.strip() for d in defenses.split(",") if d.strip()] if defenses else None
    unknown = [d for d in names or [] if d not in DEFENSES]
    if unknown:
        raise ConfigError(f"--leak-defenses: {', '.join(unknown)} unknown; defenses: {', '.join(DEFENSES)}")
    options = _grid_options(attack_set)
    if not (table_folder(model, kept, ["raw"], data, aux, (), names, options) / "table.json").exists():
        err_console.print(f"measuring the leak table for {escape(model)} once (cuts {kept}; kept in the run cache)…", highlight=False)
    if quiet:  # (--json: stdout holds the plan only)
        return measure(model, kept, ["raw"], data, aux, defenses=names, options=options)
    with _phase_bar() as progress:
        return measure(model, kept, ["raw"], data, aux, defenses=names, options=options, progress=progress)


def _compact(n: float) -> str:
    """Bytes in at most 5 characters and a unit (``396M``, ``35.3K``): the plan's table has many columns."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
