"""The bench's outputs: ``bench.json`` (every figure), ``report.md`` and one self-contained ``report.html``
(the plots inlined), and the PNG plots beside them."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ..report.progress import human_bytes
from .plots import plot_part
from .predict import TARGETS

COLUMNS = ("entry", "step s (p10–p90)", "× centralized (p10–p90)", "× peft (p10–p90)", "tokens/s", "↑ bytes/step", "↓ bytes/step",
           "eval loss", "client peak", "server peak", "planner error (time, ↑, ↓, client mem)")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:+.0f}%"


def row(name: str, f: dict[str, Any]) -> list[str]:
    """One entry's cells, as the tables show them."""
    if "error" in f:
        return [name, f"failed: {f['error']}", *[""] * (len(COLUMNS) - 2)]
    s = f["step_s"]
    ratio = f.get("ratio_vs_centralized")
    mem = f.get("memory", {})
    err = f.get("prediction_error")
    cells = [
        name,
        f"{s['median']:.3f} ({s['p10']:.3f}–{s['p90']:.3f})",
        "1 (baseline)" if ratio is None else f"{ratio['median']:.2f} ({ratio['p10']:.2f}–{ratio['p90']:.2f})",
        _ratio(f.get("ratio_vs_peft"), name == "peft"),
        f"{f['tokens_per_s']:,.0f}",
        human_bytes(f["bytes_up"]),
        human_bytes(f["bytes_down"]),
        f"{f['eval']['loss']:.4f}" if "eval" in f else "–",
        human_bytes(mem["client_peak_rss"]) if "client_peak_rss" in mem else "–",
        human_bytes(mem["server_peak_rss"]) if "server_peak_rss" in mem else "–",
        ", ".join(_pct(err[k]) for k in ("step_s", "bytes_up", "bytes_down", "client_peak")) if err else "–",
    ]
    return cells


def _ratio(r: dict | None, baseline: bool) -> str:
    if baseline:
        return "1 (baseline)"
    return "–" if r is None else f"{r['median']:.2f} ({r['p10']:.2f}–{r['p90']:.2f})"


TERSE = ("entry", "step s", "× central", "× peft", "↑/step", "↓/step", "eval loss", "client", "server")


def terse_row(name: str, f: dict[str, Any]) -> list[str]:
    """The terminal's narrower row: medians only (the spreads are in the report)."""
    if "error" in f:
        return [name, "failed", *[""] * (len(TERSE) - 2)]
    ratio = f.get("ratio_vs_centralized")
    mem = f.get("memory", {})
    peak = lambda k: human_bytes(mem[k]) if mem.get(k) else "–"  # noqa: E731
    peft = f.get("ratio_vs_peft")
    return [name, f"{f['step_s']['median']:.3f}", "1" if ratio is None else f"{ratio['median']:.2f}",
            "1" if name == "peft" else "–" if peft is None else f"{peft['median']:.2f}", human_bytes(f["bytes_up"]),
            human_bytes(f["bytes_down"]), f"{f['eval']['loss']:.3f}" if "eval" in f else "–", peak("client_peak_rss"),
            peak("server_peak_rss")]


def _intro(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    where = f"{m['processor']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else ", no GPU")
    v = results["versions"]
    return [
        f"Suite `{results['suite']}`, {results['created']}, {results.get('wall_s', '?')} s in all, on {where} "
        f"({m['platform']}); splittune {v['splittune']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}.",
        "",
        f"Threads: {results['threads_how']}. Entries of one part are timed in groups, interleaved round by round "
        "(A, B, C, then B, C, A: no entry always runs first) with a centralized baseline of their own; the ratio is each round's time per training token "
        "over the centralized round's, median and 10th–90th percentiles over the measured rounds. A round is one step of "
        "every client (and the average that follows it); bytes are per client step. Peak memory is each party's own process "
        "(a separate short run over gRPC loopback; its own high-water mark, `VmHWM`). Planner error = (predicted − measured) / measured; targets "
        f"±{TARGETS['step_s']:.0%} on step time, ±{TARGETS['bytes_up']:.0%} on bytes and memory.",
    ]


def markdown(results: dict[str, Any], plots: dict[str, list[tuple[str, Path]]]) -> str:
    lines = ["# splittune bench", "", *_intro(results), ""]
    for part in results["parts"]:
        lines += [f"## {part['name']}: `{part['model']}`", "",
                  f"{part['reps']} measured rounds per entry after {part['warmup']} warm-up; settings: "
                  f"{', '.join(f'`{s}`' for s in part['sets'])}.", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row(name, f)) + " |" for name, f in part["entries"].items()]
        notes = [f"- **{n}**: {f['note']}" for n, f in part["entries"].items() if f.get("note")]
        lines += ["", *notes, ""]
        for caption, path in plots.get(part["name"], []):
            lines += [f"![{caption}]({path.name})", ""]
    for w in results.get("warnings", []):
        lines += [f"> warning: {w.splitlines()[0]}", ""]
    return "\n".join(lines)


def page(results: dict[str, Any], plots: dict[str, list[tuple[str, Path]]]) -> str:
    """One HTML file with everything inlined (the plots as data URIs): it can be mailed or archived alone."""
    esc = html.escape
    body = ["<h1>splittune bench</h1>", *(f"<p>{esc(p)}</p>" for p in _intro(results) if p)]
    for part in results["parts"]:
        body.append(f"<h2>{esc(part['name'])}: <code>{esc(part['model'])}</code></h2>")
        body.append(f"<p>{part['reps']} measured rounds per entry after {part['warmup']} warm-up.</p>")
        head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
        rows = []
        for name, f in part["entries"].items():
            title = f' title="{esc(f["note"])}"' if f.get("note") else ""
            cells = "".join(f"<td>{esc(c)}</td>" for c in row(name, f))
            rows.append(f"<tr{title}>{cells}</tr>")
        body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        for caption, path in plots.get(part["name"], []):
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(f"<figure><img alt=\"{esc(caption)}\" src=\"data:image/png;base64,{data}\"><figcaption>{esc(caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f6f6f6}"
             "figure{margin:1.5em 0}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>splittune bench</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """``bench.json``, the plots, ``report.md`` and ``report.html`` in ``out``; returns their paths."""
    plots = {part["name"]: plot_part(part, out) for part in results["parts"]}
    results["plots"] = {name: [p.name for _, p in made] for name, made in plots.items()}
    files = {"json": out / "bench.json", "markdown": out / "report.md", "html": out / "report.html"}
    files["json"].write_text(json.dumps(results, indent=2))
    files["markdown"].write_text(markdown(results, plots))
    files["html"].write_text(page(results, plots))
    return files
