"""``splittune privacy``: a grid of defense settings, each trained, attacked and judged, and the privacy–utility
frontier they trace (``privacy.json``, ``privacy.png``, ``privacy.html``).

Each setting is the user's run config with a defense overlay (``defense``, ``dp_sgd``, ``secure_aggregation``).
Every cell is its own run directory under ``out/cells/<setting>``, recorded with the taps its attacks read; a
finished cell (its summary and its attacks' ``attack.json``) is read back, so an interrupted grid continues.
Attacks are the ones that fit the split (``attacks_for``); the inversion is adaptive (trained through the
announced defense with fresh noise), since an attacker who knows the defense trains against it.

The score of a setting is VFLAIR-LLM's defense capability score (DCS) with equal weights:

    DCS = 1 − sqrt(((1 − P)² + (1 − U)²) / 2),   P = 1 − max over attacks of success,   U = min(1, ppl₀ / ppl)

where an attack's success is its ROUGE-L F1 (text from activations), token accuracy (labels from gradients),
2·|AUC − 0.5| (a class), or token-set F1 (the aggregator's bag), ppl the setting's eval perplexity and ppl₀ the
undefended run's. 1 is perfect privacy at no cost; the undefended run scores 1 − (its attack success)/√2. The
recommended setting is the highest DCS among those within the perplexity budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import ConfigError, RunConfig, dump_config, validate
from ..defenses import DEFENSES
from .attacks.catalog import make_attack
from .job import attack_run

OVERLAY_KEYS = ("defense", "dp_sgd", "secure_aggregation", "defense_seed")
Progress = Callable[[int, int, str], None]


@dataclass
class Setting:
    name: str
    overlay: dict[str, Any]  # config keys of OVERLAY_KEYS

    @property
    def label(self) -> str:
        """The overlay in words: ``gaussian(sigma=0.5, clip=3.1) + secure_aggregation``, or ``none``."""
        parts = [_describe(d) for d in self.overlay.get("defense") or []]
        if self.overlay.get("dp_sgd"):
            parts.append(_describe({"name": "dp_sgd", **{k: v for k, v in self.overlay["dp_sgd"].items() if v is not None}}))
        if self.overlay.get("secure_aggregation"):
            parts.append("secure_aggregation")
        return " + ".join(parts) or "none"


def _describe(entry: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items() if k != "name")
    return f"{entry['name']}({params})" if params else str(entry["name"])


def scales(cfg: RunConfig, aux: str) -> dict[str, float]:
    """What ``auto`` values scale with, from public knowledge only: the median L2 norm of a token's activation row at
    the first cut (the pretrained bottom on auxiliary text) and of an embedding row, and the width."""
    import torch

    from .knowledge import PublicKnowledge

    public = PublicKnowledge(cfg.model, aux)
    cut = (cfg.cuts or [0])[0]
    ids, mask = public.aux_rows(min(cfg.train.seq_len, 64), 16)
    with torch.no_grad():
        rows = public.segment(0, cut)(mask, input_ids=ids).float()[mask.bool()] if cut > 0 else public.embeddings()[ids[mask.bool()]]
    table = public.embeddings()
    return {"row_norm": float(rows.norm(dim=-1).median()), "embedding_norm": float(table.norm(dim=-1).median()),
            "width": float(table.shape[1])}


def default_grid(cfg: RunConfig, scale: dict[str, float]) -> list[Setting]:
    """The undefended run, then what each defense's ``sweep`` tries for this run (``defenses/``): Gaussian noise with
    the clip at the median row norm and its std ½, 1 and 2 times the per-value signal (``gaussian-<k>x``); dχ noise
    whose expected norm is ½, 1 and 2 embedding norms (``dx-<k>x``); NoPeek when the bottom trains; label noise in a
    labelled U-shape."""
    order = ["gaussian", "dx", "nopeek", "label-noise"]  # the report's order; a defense not named here comes after
    kinds = sorted(DEFENSES.values(), key=lambda c: order.index(c.name) if c.name in order else len(order))
    return [Setting("none", {})] + [Setting(name, overlay) for cls in kinds for name, overlay in cls.sweep(cfg, scale)]


def load_grid(path: Path, scale: dict[str, float]) -> list[Setting]:
    """A grid file: a YAML list of ``{name: N, defense: [...], dp_sgd: {...}, secure_aggregation: B}``; a defense's
    ``clip: auto`` is the median activation row norm (``scales``)."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--grid {path}: cannot read it as YAML ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--grid {path} must hold a non-empty list of settings, each a map of {', '.join(OVERLAY_KEYS)} (and name)")
    settings = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"name", *OVERLAY_KEYS}:
            extra = sorted(set(entry) - {"name", *OVERLAY_KEYS}) if isinstance(entry, dict) else entry
            raise ConfigError(f"--grid {path}: setting {i} has {extra!r}; a setting holds name, {', '.join(OVERLAY_KEYS)}")
        overlay = {k: v for k, v in entry.items() if k != "name"}
        for d in overlay.get("defense") or []:
            if isinstance(d, dict) and d.get("clip") == "auto":
                d["clip"] = round(scale["row_norm"], 4)
        settings.append(Setting(str(entry.get("name") or Setting("", overlay).label), overlay))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"--grid {path}: setting names must differ, got {names}")
    return settings


def attacks_for(cfg: RunConfig) -> list[str]:
    """The attacks that fit this run: the inversion always; in a U-shape the label attacks (label-inference on
    labelled data, gradient-labels when the top holds at most one block); the aggregator when clients average."""
    names = ["inversion"]
    if cfg.cuts is not None and len(cfg.cuts) == 2:
        if "sentiment" in str(cfg.data.source) or cfg.data.task == "instruction":
            names.append("label-inference")
        from ..models.arch import detect_arch
        from ..models.zoo import resolve_model

        if detect_arch(resolve_model(cfg.model).config()).n_blocks - cfg.cuts[1] <= 1:
            names.append("gradient-labels")
    if cfg.clients > 1 and (cfg.mode == "federated" or cfg.schedule != "sequential"):
        names.append("aggregator")
    return names


def cell_config(base: RunConfig, setting: Setting) -> RunConfig:
    tree = yaml.safe_load(dump_config(base))
    tree.update(setting.overlay)
    try:
        return validate(tree)
    except ConfigError as err:
        raise ConfigError(f"setting {setting.name!r}: {err}") from None


def success(result: dict[str, Any]) -> float | None:
    """How well one attack did, on one scale for the score (module docstring)."""
    target = result.get("target")
    if target == "class":
        auc = result.get("leak_auc")
        return None if auc is None else 2 * abs(auc - 0.5)
    if target == "bag":
        return result.get("f1")
    if target == "labels":
        return result.get("token_accuracy")
    return result.get("rouge_l_f1")


def dcs(privacy: float, utility: float) -> float:
    return 1 - math.sqrt(((1 - privacy) ** 2 + (1 - utility) ** 2) / 2)


def run_grid(base: RunConfig, settings: list[Setting], out: Path, attacks: list[str] | None = None, aux: str | None = None,
             options: dict[str, dict] | None = None, budget: float = 0.10, progress: Progress | None = None) -> dict[str, Any]:
    """Train, attack and judge every setting (resumable); write privacy.json and its report; return the result."""
    from ..run import train

    if not any(s.name == "none" for s in settings):
        settings = [Setting("none", {}), *settings]  # the baseline every score is measured against
    attacks = attacks or attacks_for(base)
    observers = tuple(sorted({make_attack(a, (options or {}).get(a)).observer for a in attacks}))  # unknown names refused
    configs = {s.name: cell_config(base, s) for s in settings}  # every setting is checked before any trains
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, setting in enumerate(settings):
        folder = out / "cells" / setting.name
        if progress:
            progress(k, len(settings), f"setting {setting.name}")
        if not (folder / "summary.json").exists():
            train(configs[setting.name], folder, record_tap=observers)
        summary = json.loads((folder / "summary.json").read_text())
        row: dict[str, Any] = {"name": setting.name, "defense": setting.label, "overlay": setting.overlay,
                               "eval_ppl": summary["eval_ppl_after"], "eval_loss": summary["eval_loss_after"],
                               "epsilon": {key: v for key, v in summary.items() if "epsilon" in key}, "attacks": {}}
        if "eval_accuracy_after" in summary:
            row["eval_accuracy"] = summary["eval_accuracy_after"]
        for name in attacks:
            done = folder / "attacks" / name / "attack.json"
            result = json.loads(done.read_text()) if done.exists() else attack_run(folder, name, aux, options=(options or {}).get(name),
                                                                                     progress=progress)
            row["attacks"][name] = {key: result.get(key) for key in ("rouge_l_f1", "token_accuracy", "leak_auc", "f1")
                                    if result.get(key) is not None}
            row["attacks"][name]["success"] = success(result)
        rows.append(row)
    if progress:
        progress(len(settings), len(settings), "privacy grid")
    baseline = next(r for r in rows if r["name"] == "none")
    for r in rows:
        worst = max((a["success"] for a in r["attacks"].values() if a["success"] is not None), default=0.0)
        r["privacy"] = 1 - worst
        r["utility"] = min(1.0, baseline["eval_ppl"] / r["eval_ppl"])
        r["dcs"] = dcs(r["privacy"], r["utility"])
    within = [r for r in rows if r["eval_ppl"] <= (1 + budget) * baseline["eval_ppl"]]
    best = max(within, key=lambda r: r["dcs"])
    result = {"model": base.model, "cuts": base.cuts, "attacks": attacks, "budget": budget, "settings": rows,
              "baseline": "none", "recommended": best["name"],
              "score": "DCS = 1 - sqrt(((1 - P)^2 + (1 - U)^2) / 2), P = 1 - max attack success, U = min(1, ppl_none / ppl)"}
    (out / "privacy.json").write_text(json.dumps(result, indent=2))
    from .grid_report import write_report

    write_report(result, out)
    return result
