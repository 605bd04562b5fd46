"""The leak table ``splittune plan --max-leak`` meets a privacy target from: for one model, how much of the client's
text the strongest adaptive attack recovers (ROUGE-L) at each first cut, uplink codec and defense setting, and what
that setting costs in perplexity. Measured once (short runs recorded and attacked, as ``splittune leak`` does, each
defense at the strengths its ``sweep`` tries) and kept in the run cache; a table with the same inputs is read back,
and an interrupted measurement continues where it stopped.

How sure a point is: its ROUGE-L is a mean over the recovered texts, and ``leak_hi`` is its upper 95% bound (mean +
1.96 standard errors). What the planner assumes and says: without a defense, a first cut between two measured ones
leaks at most what the shallower measured cut leaks (deeper cuts leak less: docs/privacy.md's curve); a defense's
strength is calibrated at the cut it was measured at, so it is offered there only; and a codec not measured leaks at
most what raw does (the server sees a function of the raw activations, so an attack on them cannot do better).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..assets import cache_dir
from .grid import Setting, cell_config, default_grid, scales
from .job import attack_run
from .leak import cell_config as leak_cell

VERSION = 1
ATTACKS = ("inversion",)  # the learned inverter, trained through the announced defense: the strongest forward attack
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LeakPoint:
    cut: int
    codec: str
    setting: str  # ``none`` or a defense's sweep label (``gaussian-1x``)
    overlay: dict[str, Any] = field(hash=False, compare=False)
    leak: float = 0.0  # the best attack's mean ROUGE-L F1 over the recovered texts
    leak_hi: float = 0.0  # its upper 95% bound
    texts: int = 0
    ppl: float = 0.0
    ppl_ratio: float = 1.0  # the setting's eval perplexity over the undefended run's at the same cut and codec
    epsilon: dict[str, float] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LeakTable:
    model: str
    points: list[LeakPoint]
    folder: Path | None = None

    @property
    def cuts(self) -> list[int]:
        return sorted({p.cut for p in self.points})

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(p.setting for p in self.points))

    def at(self, cut: int, codec: str, setting: str) -> tuple[LeakPoint | None, str]:
        """The point that bounds a choice's leak, and how it was read (the measured cut and codec it stands for)."""
        below = [c for c in self.cuts if c <= cut]
        if not below:
            return None, f"no cut at or above {min(self.cuts)} measured below cut {cut}"
        measured = max(below)
        if setting != "none" and measured != cut:  # a defense's strength is calibrated at its cut (the clip: its row norm)
            return None, f"{setting} measured at cut {measured}, not {cut}"
        codecs = {p.codec for p in self.points if p.cut == measured and p.setting == setting}
        use = codec if codec in codecs else "raw"
        point = next((p for p in self.points if (p.cut, p.codec, p.setting) == (measured, use, setting)), None)
        how = [] if measured == cut else [f"measured at cut {measured}: at most that"]
        if use != codec:
            how.append(f"{codec} not measured: at most raw's")
        return point, "; ".join(how)


def upper(values: list[float]) -> float:
    """The upper 95% bound of a mean (normal approximation; the mean itself for one value)."""
    if len(values) < 2:
        return values[0] if values else 0.0
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return min(1.0, mean + 1.96 * sd / math.sqrt(len(values)))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def table_folder(model: str, cuts: list[int], codecs: list[str], data: str, aux: str | None, sets: tuple[str, ...],
                 defenses: list[str] | None, options: dict[str, dict] | None = None) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in model)[:60]
    return cache_dir() / "leak-tables" / f"{slug}-{_key(model, cuts, codecs, data, aux, sets, defenses, options or {})}"


def measure(model: str, cuts: list[int], codecs: list[str] = ("raw",), data: str = "builtin:sentiment", aux: str | None = None,
            sets: tuple[str, ...] = (), defenses: list[str] | None = None, options: dict[str, dict] | None = None,
            progress: Progress | None = None) -> LeakTable:
    """The table for ``model`` (read from the run cache when measured before): ``none`` and every defense's sweep (or
    those named in ``defenses``) at each cut and codec; ``options``: each attack's (``--attack-set``)."""
    from ..run import train

    folder = table_folder(model, cuts, codecs, data, aux, tuple(sets), defenses, options)
    done = folder / "table.json"
    if done.exists():
        return read(done)
    cells = []
    for cut in cuts:
        base = leak_cell(model, cut, "raw", data, tuple(sets))
        grid = default_grid(base, scales(base, aux or "builtin:shakespeare"))
        chosen = [s for s in grid if s.name == "none" or defenses is None or _defense_of(s) in defenses]
        cells += [(cut, codec, s) for codec in codecs for s in chosen]
    points = []
    for n, (cut, codec, setting) in enumerate(cells):
        if progress:
            progress(n, len(cells), f"leak table: cut {cut}, {codec}, {setting.name}")
        cell = folder / "cells" / f"{codec}-cut{cut}-{setting.name}"
        if not (cell / "summary.json").exists():
            train(cell_config(leak_cell(model, cut, codec, data, tuple(sets)), setting), cell, record_tap=("server",))
        summary = json.loads((cell / "summary.json").read_text())
        results = []
        for name in ATTACKS:
            saved = cell / "attacks" / name / "attack.json"
            results.append(json.loads(saved.read_text()) if saved.exists()
                           else attack_run(cell, name, aux, options=(options or {}).get(name), progress=progress))
        best = max(results, key=lambda r: r.get("rouge_l_f1") or 0.0)
        per_text = best.get("rouge_l_f1_per_text") or [best.get("rouge_l_f1") or 0.0]
        points.append(LeakPoint(cut, codec, setting.name, setting.overlay, float(best.get("rouge_l_f1") or 0.0), upper(per_text),
                                len(per_text), summary["eval_ppl_after"],
                                epsilon={k: v for k, v in summary.items() if "epsilon" in k and isinstance(v, (int, float))}))
    if progress:
        progress(len(cells), len(cells), "leak table")
    table = LeakTable(model, _with_costs(points), folder)
    done.write_text(json.dumps({"version": VERSION, "model": model, "data": data, "aux": aux, "cuts": cuts, "codecs": list(codecs),
                                "attacks": list(ATTACKS), "points": [asdict(p) for p in table.points]}, indent=2))
    return table


def _defense_of(setting: Setting) -> str:
    entries = setting.overlay.get("defense") or []
    return entries[0]["name"] if entries else ("dp_sgd" if setting.overlay.get("dp_sgd") else setting.name)


def _with_costs(points: list[LeakPoint]) -> list[LeakPoint]:
    """Each point's perplexity over the undefended run's at its cut and codec."""
    plain = {(p.cut, p.codec): p.ppl for p in points if p.setting == "none"}
    out = []
    for p in points:
        ratio = p.ppl / plain[(p.cut, p.codec)] if (p.cut, p.codec) in plain and plain[(p.cut, p.codec)] > 0 else math.inf
        out.append(LeakPoint(**{**asdict(p), "ppl_ratio": round(ratio, 4)}))
    return out


def read(path: Path) -> LeakTable:
    tree = json.loads(Path(path).read_text())
    return LeakTable(tree["model"], [LeakPoint(**p) for p in tree["points"]], Path(path).parent)
