"""``evaluate``: a run's fine-tuned model and its base, scored on held-out prompts with references (eval/tasks.py).

The models come from here because only the command may reach both kinds: through the split (``generation``, as
``splittune generate``), or unsplit from an exported adapter (peft); the scoring below knows neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import Output, console, fail, quiet_libraries, shows_warnings, user_errors


class _Models:
    """Where answers come from: the run's split model (and its base through the same split), or an exported adapter
    on the unsplit base model (and the same model with the adapter disabled)."""

    def __init__(self, run_dir: Path, adapter: Path | None, client: int | None):
        from ..config import load_config
        from ..data.files import Reading
        from ..data.instruction import DEFAULT_LABEL_PROMPT
        from ..data.task import LABEL_PROMPTS
        from ..eval.tasks import EvalError

        self.run_dir, self.adapter, self.client = run_dir, adapter, client
        self.cfg = None
        if (run_dir / "config.yaml").exists():
            self.cfg = load_config(run_dir / "config.yaml")
        elif adapter is None and (run_dir / "adapter_config.json").exists():
            self.adapter = run_dir  # an exported adapter given as the directory
        elif adapter is None:
            raise EvalError(f"{run_dir} is neither a run directory (no config.yaml) nor an exported adapter "
                            "(no adapter_config.json); train one with splittune train --out DIR")
        if self.adapter is not None and not (self.adapter / "adapter_config.json").exists():
            raise EvalError(f"--adapter {self.adapter}: not an exported adapter (no adapter_config.json); write one with "
                            "splittune export RUN_DIR --out DIR")
        if self.adapter is not None and client is not None:
            raise EvalError("--client picks a client's model of a run through the split; an export already holds one model")
        self.mode = "unsplit" if self.adapter is not None else "split"
        # the run's way of reading rows (its field names, layout, encoding), but every row: --limit is the cap here
        self.reading = dataclasses.replace(Reading.of(self.cfg.data), max_documents=None) if self.cfg is not None else Reading()
        self.label_prompt = LABEL_PROMPTS.get(self.cfg.data.source, DEFAULT_LABEL_PROMPT) if self.cfg is not None else DEFAULT_LABEL_PROMPT
        self._peft = None
        self.tokenizer = self._tokenizer()

    def _tokenizer(self):
        if self.cfg is not None:
            from ..models.zoo import resolve_model

            return resolve_model(self.cfg.model).tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.adapter))

    def describe(self) -> str:
        return self.cfg.model if self.cfg is not None else json.loads((self.adapter / "adapter_config.json").read_text()).get(
            "base_model_name_or_path", "?")

    @contextlib.contextmanager
    def open(self, base: bool):
        """The fine-tuned model (``base``: the base model) as something with transformers' ``generate``."""
        if self.mode == "split":
            from ..generation import load_split

            with load_split(self.run_dir, client=self.client, base=base) as split:
                yield split
            return
        model = self._unsplit()
        with model.disable_adapter() if base else contextlib.nullcontext():
            yield model

    def _unsplit(self):
        if self._peft is None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            if self.cfg is not None:
                from ..models.zoo import resolve_model

                where = str(resolve_model(self.cfg.model).path)
            else:
                where = self.describe()
            try:
                model = AutoModelForCausalLM.from_pretrained(where)
                self._peft = PeftModel.from_pretrained(model, str(self.adapter)).eval()
            except (OSError, ValueError) as err:
                from ..eval.tasks import EvalError

                raise EvalError(f"cannot load the exported adapter {self.adapter} on its base {where}: {err}") from None
        return self._peft


def _generate_all(models: _Models, items, which: list[tuple[str, bool]], max_new_tokens: int, batch_size: int) -> dict:
    """Each model's answers, with a bar on a terminal and a line per model elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..eval.tasks import generate_answers

    answers = {}
    bar = Progress(TextColumn("[bold blue]{task.description:<11}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=False) if console.is_terminal else None
    with bar if bar is not None else contextlib.nullcontext():
        for label, base in which:
            task = bar.add_task(label, total=len(items)) if bar is not None else None
            t0 = time.perf_counter()
            with models.open(base) as model:
                answers[label] = generate_answers(model, models.tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                  on_batch=(lambda n, t=task: bar.advance(t, n)) if bar is not None else None)
            if bar is None:
                console.print(f"{label}: {len(items)} answers in {time.perf_counter() - t0:.1f} s", highlight=False)
    return answers


@shows_warnings
def evaluate(
    run_dir: Path = typer.Argument(..., help="a finished run directory (or an exported adapter, splittune export --out DIR)"),
    data: Path = typer.Option(..., "--data", "-d", help="held-out examples with references: JSONL, JSON or CSV in any "
                              "layout training reads (prompt/response, instruction/input/output, messages, text+label)"),
    metric: str = typer.Option(",".join(("exact_match", "rouge_l", "accuracy")), "--metric", "-m",
                               help="comma-separated: exact_match, rouge_l, accuracy"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate at most per answer"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate the first N examples only"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="prompts generated together (left-padded)"),
    no_base: bool = typer.Option(False, "--no-base", help="skip the base model's answers"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="an exported adapter (splittune export): generate unsplit "
                                           "with it instead of through the run's split"),
    client: Optional[int] = typer.Option(None, "--client", min=0, help="a client's personalised model in a run of several"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where eval.json and eval.html go (default: RUN_DIR)"),
) -> None:
    """Score the fine-tuned model and its base on held-out prompts with references (greedy): eval.json, eval.html, a table."""
    quiet_libraries()
    from ..eval.page import page
    from ..eval.tasks import parse_metrics, read_items, report

    try:
        metrics = parse_metrics(metric)
        if max_new_tokens < 1:
            raise _usage_error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        models = _Models(run_dir, adapter, client)
        items = read_items(data, models.tokenizer, reading=models.reading, label_prompt=models.label_prompt, limit=limit)
        which = [("fine-tuned", False)] + ([] if no_base else [("base model", True)])
        answers = _generate_all(models, items, which, max_new_tokens, batch_size)
    except user_errors() as err:
        fail(str(err))
    settings = {"data": str(data), "mode": models.mode, "model": models.describe(), "decoding": "greedy",
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit, "client": client,
                **({"adapter": str(models.adapter)} if models.adapter is not None else {})}
    result = report(items, metrics, answers["fine-tuned"], answers.get("base model"), settings)
    where = out if out is not None else run_dir
    where.mkdir(parents=True, exist_ok=True)
    (where / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (where / "eval.html").write_text(page(result), encoding="utf-8")
    if Output.json:  # the scores as one line for a machine; the page and the examples are in the files
        Output.emit(sys.stdout, event="evaluated", n=result["n"], fine_tuned=result["fine_tuned"], base=result["base"],
                    eval_json=str(where / "eval.json"), eval_html=str(where / "eval.html"))
        return
    _table(result)
    console.print(f"wrote [bold green]{escape(str(where / 'eval.json'))}[/] and [bold green]{escape(str(where / 'eval.html'))}[/]")


def _table(result: dict) -> None:
    from rich.table import Table

    base = result.get("base")
    table = Table(title=f"{result['n']} examples, {result['settings']['mode']}, greedy", show_header=True)
    table.add_column("metric")
    if base:
        table.add_column("base model", justify="right")
    table.add_column("fine-tuned", justify="right")
    if base:
        table.add_column("Δ", justify="right")
    for m in result["metrics"]:
        tuned = result["fine_tuned"][m]
        cells = [f"{base[m]:.4f}", f"{tuned:.4f}", f"{tuned - base[m]:+.4f}"] if base else [f"{tuned:.4f}"]
        table.add_row(m, *cells)
    console.print(table)


def _usage_error(message: str) -> Exception:
    from ..eval.tasks import EvalError

    return EvalError(message)
