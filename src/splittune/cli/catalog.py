"""What there is to use: ``models``, ``config`` and ``fetch``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import console, fail, quiet_libraries, shows_warnings, user_errors


def models() -> None:
    """Builtin models, the tiny test models and each architecture family's status (exact, refused, detected)."""
    quiet_libraries()
    from ..models.builtin import BUILTIN_MODELS
    from ..models.catalog import DETECTED, FAMILIES, TESTED_ARCHITECTURES
    from ..models.tiny import tiny_reference

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


@shows_warnings
def config_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; the builtin default when omitted"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a key, e.g. --set data=my.jsonl"),
    reference: bool = typer.Option(False, "--reference", help="print every key, its default, allowed values and meaning (markdown)"),
    update: Optional[Path] = typer.Option(None, "--update", help="with --reference: rewrite the generated block of this file (docs/config.md)"),
) -> None:
    """Print the validated config (YAML) a run would use, or the reference of every key."""
    from ..config import dump_config, load_config
    from ..config_reference import reference as make_reference
    from ..config_reference import update as update_doc

    if update is not None and not reference:
        fail("--update rewrites the generated reference block of a file; use it with --reference")
    if reference:
        if update is None:
            print(make_reference(), end="")
            return
        try:
            changed = update_doc(update)
        except (OSError, ValueError) as err:
            fail(str(err))
        console.print(f"{update}: {'updated' if changed else 'already current'}", highlight=False)
        return
    try:
        cfg = load_config(config, set_)
    except user_errors() as err:
        fail(str(err))
    print(dump_config(cfg), end="")


def fetch(
    names: list[str] = typer.Argument(None, help="builtin:smollm2-135m, builtin:shakespeare, builtin:sentiment (all when omitted)"),
    print_path: bool = typer.Option(False, "--print-path", help="print only the local directory of each"),
) -> None:
    """Fetch builtin models and data into the cache for offline use."""
    quiet_libraries()
    from ..data import BUILTIN_SOURCES
    from ..data.builtin import builtin_path
    from ..models.builtin import BUILTIN_MODELS, builtin_model_dir

    names = names or [f"builtin:{n}" for n in BUILTIN_MODELS] + list(BUILTIN_SOURCES)
    for name in names:
        try:
            if name.removeprefix("builtin:") in BUILTIN_MODELS:
                path = builtin_model_dir(name.removeprefix("builtin:"))
            elif name in BUILTIN_SOURCES:
                path = builtin_path(name)
            else:
                known = [f"builtin:{n}" for n in BUILTIN_MODELS] + list(BUILTIN_SOURCES)
                fail(f"unknown builtin {name!r}; builtins: {', '.join(known)}")
        except user_errors() as err:
            fail(str(err))
        if print_path:
            print(path)
        else:
            console.print(f"{name}: [green]{path}[/]")
