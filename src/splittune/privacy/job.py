"""``splittune attack RUN_DIR``: one attack on a finished run's tap, judged, written as attack.json and a page.

The attack gets the tap and public knowledge only (``run_attack``); the run's config tells the *judge* which
base model is public and which sources are private (so the auxiliary text can be refused when it is the
private data), and the run's ``tap/truth`` is what the recovery is scored against.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from .attacks.base import Progress, run_attack
from .attacks.catalog import make_attack
from .judge import score, unscored
from .knowledge import PublicKnowledge
from ..taps.recording import TAP_DIR
from .report import write_page
from ..taps.tap import TRUTH, Tap, TapError, Truth

BUILTIN_TEXT = ("builtin:shakespeare", "builtin:sentiment")


def private_sources(run_config: dict[str, Any]) -> list[str]:
    """Every data source of a run (its clients' own included)."""
    sources = [run_config.get("data", {}).get("source", "builtin:shakespeare")]
    overrides = run_config.get("client_overrides") or {}
    for o in (overrides.values() if isinstance(overrides, dict) else overrides):
        source = (o.get("data") or {}).get("source") if isinstance(o, dict) else None
        if source:
            sources.append(source)
    return sources


def default_aux(private: list[str]) -> str:
    """A builtin text source the run did not train on."""
    return next((s for s in BUILTIN_TEXT if s not in private), BUILTIN_TEXT[0])


def tap_folder(run_dir: Path, observer: str) -> Path:
    """Where a run (``train --record-tap``) or a served tap (``serve --record-tap DIR``) keeps an observer's tap."""
    for folder in (run_dir / TAP_DIR / observer, run_dir / observer):
        if (folder / "tap.json").exists():
            return folder
    recorded = sorted(p.name for base in (run_dir / TAP_DIR, run_dir) if base.is_dir() for p in base.iterdir()
                      if (p / "tap.json").exists() and p.name != TRUTH)
    has = f"it has the {', '.join(recorded)} tap{'s' if len(recorded) > 1 else ''}" if recorded else "it has no tap"
    config = run_dir / "config.yaml"
    again = (f"`splittune train --config {config} --record-tap {observer} --out {run_dir}-{observer}-tap` (the same run again, "
             "recorded)" if config.exists() else f"`splittune train --record-tap {observer} --out DIR`")
    raise TapError(f"{run_dir} holds no {observer} tap ({has}); record one with {again} (or `splittune serve --record-tap DIR`)")


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def attack_run(run_dir: Path, name: str, aux: str | None = None, out: Path | None = None, options: dict | None = None,
               model: str | None = None, progress: Progress | None = None, truth: Path | None = None) -> dict[str, Any]:
    """Run attack ``name`` on ``run_dir``'s tap; write ``out/attack.json`` and ``out/attack.html``; return the result.
    ``truth``: for a generation attack, the client's ``generate --json`` output it is scored against."""
    attack = make_attack(name, options)
    if truth is not None and attack.target != "generation":
        raise TapError(f"--truth scores a generation attack (generation-inversion); {name} is scored against the run's "
                       "own tap/truth")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TapError(f"{run_dir} is not a run directory")
    tap = Tap.open(tap_folder(run_dir, attack.observer))
    attack.check(tap)
    cfg = run_config(run_dir)
    private = private_sources(cfg)
    # the judge names the public base model: the run's `model:`, or the reference in the proposal (a served tap)
    model = model or cfg.get("model") or re.sub(r" \(.*\)$", "", str(tap.proposal().get("model", "")))
    if not model:
        raise TapError(f"{run_dir} has no config.yaml naming its base model; give it with --model")
    public = PublicKnowledge(model, aux or default_aux(private))
    public.check_disjoint(private)
    started = time.perf_counter()
    recovery = run_attack(attack, tap, public, progress)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "attack": name, "summary": attack.summary, "target": recovery.target, "observer": attack.observer,
        "run": str(run_dir), "model": model, "aux": public.aux, "cuts": tap.proposal().get("cuts"),
        "chain": tap.chain(), "options": attack.options.model_dump(mode="json"), "seconds": round(seconds, 2),
        "info": recovery.info,
    }
    truth_dir = tap.folder.parent / TRUTH
    if recovery.target == "generation" and truth is not None:
        from .judge_generation import read_generations, score_generation

        result.update(score_generation(recovery, read_generations(truth, public.tokenizer), public.tokenizer))
    elif recovery.target == "generation":
        result["scored"] = "no truth: give the client's `splittune generate --json` output with --truth to score it"
        result["examples"] = unscored(recovery, public.tokenizer)
    elif (truth_dir / "tap.json").exists():
        result.update(score(recovery, Truth.open(truth_dir), public.tokenizer))
    else:
        result["scored"] = "no truth: the client's record of what it sent is not beside this tap (a served tap), so " \
                           "the recovery is written unscored"
        result["examples"] = unscored(recovery, public.tokenizer)
    out = Path(out) if out is not None else run_dir / "attacks" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    write_page(result, out / "attack.html")
    return result
