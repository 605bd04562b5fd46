"""The privacy grid's report: ``privacy.png`` (each attack's success against eval perplexity, one point per setting,
the recommended one starred) and ``privacy.html`` (the same figure inline, and every setting's figures)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from .report import STYLE


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = result["attacks"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 4.2), squeeze=False)
    for ax, name in zip(axes[0], attacks):
        for row in result["settings"]:
            value = row["attacks"].get(name, {}).get("success")
            if value is None:
                continue
            best = row["name"] == result["recommended"]
            ax.scatter(row["eval_ppl"], value, s=140 if best else 40, marker="*" if best else "o",
                       color="tab:red" if row["name"] == "none" else ("tab:green" if best else "tab:blue"), zorder=3)
            ax.annotate(row["name"], (row["eval_ppl"], value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("eval perplexity (lower is better)")
        ax.set_ylabel(f"{name} success (lower is more private)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(name)
    fig.suptitle(f"privacy–utility · {result['model']} · cuts {result['cuts']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def page(result: dict[str, Any], png: bytes) -> str:
    esc = html.escape
    attacks = result["attacks"]
    head = "".join(f"<th>{esc(a)}</th>" for a in attacks)
    body = []
    for r in result["settings"]:
        cells = "".join(f"<td>{r['attacks'].get(a, {}).get('success', float('nan')):.3f}</td>" for a in attacks)
        eps = ", ".join(f"{k} {v:.3g}" for k, v in r["epsilon"].items() if isinstance(v, (int, float))) or "–"
        acc = f"{r['eval_accuracy']:.3f}" if r.get("eval_accuracy") is not None else "–"
        mark = ' style="background:#c8f0c8"' if r["name"] == result["recommended"] else ""
        body.append(f"<tr{mark}><td>{esc(r['name'])}</td><td class=tok>{esc(r['defense'])}</td><td>{r['eval_ppl']:.3f}</td>"
                    f"<td>{acc}</td>{cells}<td>{esc(eps)}</td><td>{r['dcs']:.3f}</td></tr>")
    image = base64.b64encode(png).decode()
    return (f"<!doctype html><html><head><meta charset=utf-8><title>splittune privacy</title><style>{STYLE}</style></head><body>"
            f"<h1>Privacy–utility frontier</h1><p>{esc(result['model'])} · cuts {esc(str(result['cuts']))} · "
            f"recommended within +{result['budget']:.0%} perplexity: <b>{esc(result['recommended'])}</b></p>"
            f"<img alt='attack success against eval perplexity' src='data:image/png;base64,{image}' style='max-width:100%'>"
            f"<table class=figs><tr><th>setting</th><th>defense</th><th>eval ppl</th><th>eval accuracy</th>{head}"
            f"<th>ε</th><th>DCS</th></tr>{''.join(body)}</table>"
            f"<p><small>attack success: ROUGE-L F1 (text from activations), token accuracy (labels from gradients), "
            f"2·|AUC − 0.5| (a class), token-set F1 (the aggregator). {esc(result['score'])}.</small></p></body></html>")


def write_report(result: dict[str, Any], out: Path) -> None:
    plot(result, out / "privacy.png")
    (out / "privacy.html").write_text(page(result, (out / "privacy.png").read_bytes()))
