"""An attack's page: its figures, then original and recovered text side by side with the matches highlighted.

One self-contained HTML file (inline style, no scripts, every text escaped). Token-level recoveries mark each
position whose recovered token equals the original; bag recoveries mark the tokens found.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}
th{background:#f3f3f3}.hit{background:#c8f0c8}.miss{background:#f8d0d0}.figs td{font-variant-numeric:tabular-nums}
.tok{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em}small{color:#666}"""

FIGURES = ("rouge_l_f1", "token_accuracy", "leak_auc", "precision", "recall", "f1", "prompt_rouge_l_f1", "prompt_token_accuracy",
           "response_rouge_l_f1", "response_token_accuracy")


def _tokens(tokens: list[str], marks: list[bool]) -> str:
    return "".join(f'<span class="{"hit" if m else "miss"}">{html.escape(t)}</span>' for t, m in zip(tokens, marks))


def _example(example: dict[str, Any]) -> tuple[str, str]:
    if "original_tokens" in example:
        original, recovered = example["original_tokens"], example["recovered_tokens"]
        marks = [a == b for a, b in zip(original, recovered)]
        return _tokens(original, marks), _tokens(recovered, marks)
    if "hits" in example:
        hits = set(example["hits"])
        found = example["recovered"].split(" ") if example["recovered"] else []
        words = example["original"].split(" ") if example.get("original") else []
        return _tokens([w + " " for w in words], [w in hits for w in words]), _tokens([w + " " for w in found], [w in hits for w in found])
    return html.escape(example.get("original", "")), html.escape(example.get("recovered", ""))


def page(result: dict[str, Any]) -> str:
    title = f"splittune attack · {result['attack']}"
    figures = "".join(f"<tr><th>{k}</th><td>{result[k]:.4f}</td></tr>" for k in FIGURES if isinstance(result.get(k), (int, float)))
    setting = (f"run {html.escape(str(result.get('run')))} · model {html.escape(str(result.get('model')))} · cuts {result.get('cuts')} · "
               f"aux {html.escape(str(result.get('aux')))} · {result.get('seconds')} s")
    steps = result.get("per_step") or {}
    step_rows = "".join(
        "<tr><td>" + html.escape(step) + "</td>" + "".join(f"<td>{v[k]:.4f}</td>" for k in FIGURES if isinstance(v.get(k), (int, float))) + "</tr>"
        for step, v in steps.items())
    step_head = ""
    if steps:
        first = next(iter(steps.values()))
        step_head = "<tr><th>step</th>" + "".join(f"<th>{k}</th>" for k in FIGURES if isinstance(first.get(k), (int, float))) + "</tr>"
    examples = "".join(
        f"<tr><td>{e.get('step', '')}</td><td class='tok'>{o}</td><td class='tok'>{r}</td></tr>"
        for e in result.get("examples", []) for o, r in [_example(e)])
    note = f"<p><small>{html.escape(result['scored'])}</small></p>" if "scored" in result else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(result.get('summary', ''))}</p><p><small>{setting}</small></p>{note}
<table class="figs">{figures}</table>
{'<h2>By training step</h2><table class="figs">' + step_head + step_rows + '</table>' if steps else ''}
<h2>Original and recovered</h2><p><small>green: the recovered token equals the original one; red: it does not</small></p>
<table><tr><th>step</th><th>original</th><th>recovered</th></tr>{examples}</table></body></html>"""


def write_page(result: dict[str, Any], path: Path) -> None:
    path.write_text(page(result))
