"""``eval.html``: an evaluation's scores, then each prompt with its reference and the answers side by side.

One self-contained file (inline style, no scripts); every text from the data or the model is escaped, so a prompt
that holds markup shows as text.
"""

from __future__ import annotations

import html
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}
th{background:#f3f3f3}.figs{width:auto}.figs td{font-variant-numeric:tabular-nums}
.text{white-space:pre-wrap}.hit{background:#c8f0c8}small{color:#666}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _scores(row: dict[str, float] | None) -> str:
    return "<br>".join(f"<small>{_e(k)} {v:.3f}</small>" for k, v in (row or {}).items())


def _answer(answer: str, scores: dict[str, float] | None) -> str:
    mark = ' class="text hit"' if scores and scores.get("exact_match") == 1.0 else ' class="text"'
    return f"<td{mark}>{_e(answer)}<br>{_scores(scores)}</td>"


def page(result: dict[str, Any]) -> str:
    """The HTML of one ``eval.json`` result."""
    base = result.get("base")
    metrics = result["metrics"]
    head = "<tr><th>metric</th>" + ("<th>base model</th>" if base else "") + "<th>fine-tuned</th>" + ("<th>Δ</th>" if base else "") + "</tr>"
    rows = "".join(
        f"<tr><th>{_e(m)}</th>" + (f"<td>{base[m]:.4f}</td>" if base else "") + f"<td>{result['fine_tuned'][m]:.4f}</td>"
        + (f"<td>{result['fine_tuned'][m] - base[m]:+.4f}</td>" if base else "") + "</tr>"
        for m in metrics)
    s = result["settings"]
    setting = " · ".join(_e(f"{k} {v}") for k, v in s.items())
    ex_head = "<tr><th>#</th><th>prompt</th><th>reference</th>" + ("<th>base model</th>" if base else "") + "<th>fine-tuned</th></tr>"
    examples = "".join(
        f"<tr><td>{i + 1}</td><td class='text'>{_e(e['prompt'])}</td><td class='text'>{_e(e['reference'])}</td>"
        + (_answer(e["base_answer"], e.get("base_scores")) if base else "") + _answer(e["answer"], e.get("scores")) + "</tr>"
        for i, e in enumerate(result["examples"]))
    title = f"splittune evaluate · {result['n']} examples"
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p><small>{setting}</small></p><table class=\"figs\">{head}{rows}</table>"
            "<h2>Prompts, references and answers</h2><p><small>green: the answer matches the reference exactly "
            f"(normalised)</small></p><table>{ex_head}{examples}</table></body></html>")
