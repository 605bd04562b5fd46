"""Task evaluation (issue 28, item 4): ``splittune evaluate`` scores a fine-tuned run and its base on held-out prompts
with references, through the split or unsplit from an export; the metrics on hand-made cases; every refusal is one
``error:`` line. Each check has a twin that shows it can fail."""

import json

import pytest
from typer.testing import CliRunner

from splittune.cli import app
from splittune.config import load_config
from splittune.eval.page import page
from splittune.eval.tasks import EvalError, Item, exact_match, normalize, parse_metrics, rouge_l, score
from splittune.export import export_run
from splittune.run import train

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "piano", "lemon", "candle", "forest", "silver"]
HELD = ["grape", "cabin", "zebra", "tulip"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def teach_yes(data, *sets):
    """A tiny U-shaped instruction run taught to answer every question "yes"."""
    return load_config(None, ["model=tiny:llama", "cuts=[1,3]", f"data.source={data}", "train.steps=40", "train.batch_size=4",
                              "train.seq_len=80", "train.eval_every=20", "train.eval_batches=1", "lora.rank=4", "train.lr=0.01",
                              "train.warmup_steps=0", "data.max_documents=40", *sets])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run (scoring generated answers at each evaluation) and its export."""
    root = tmp_path_factory.mktemp("taskeval")
    data = jsonl(root / "train.jsonl", [{"prompt": f"Is {w} a word?", "response": "yes"} for w in WORDS] * 4)
    out = root / "run"
    train(teach_yes(data, "train.eval_metrics=[exact_match,accuracy]", "train.eval_generate=2"), out)
    export_run(out, root / "export")
    return out


def held(tmp_path, answer="yes"):
    """Held-out rows whose prompts hold markup, so the page must escape them."""
    return jsonl(tmp_path / "held.jsonl", [{"prompt": f"Is <b>{w}</b> & a word?", "response": answer} for w in HELD])


def evaluate(*args):
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


# -- the command ---------------------------------------------------------------------------------------------------
def test_evaluate_scores_the_fine_tuned_run_against_its_base(run, tmp_path):
    result = evaluate(run, "--data", held(tmp_path), "-n", "4", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert got["n"] == 4 and got["metrics"] == ["exact_match", "rouge_l", "accuracy"]
    assert got["fine_tuned"] == {"exact_match": 1.0, "rouge_l": 1.0, "accuracy": 1.0}  # it learned to say yes
    assert got["base"]["exact_match"] == 0.0 and got["base"]["accuracy"] == 0.0  # the random base did not
    assert got["settings"]["mode"] == "split" and got["settings"]["decoding"] == "greedy"
    assert [e["answer"] for e in got["examples"]] == ["yes"] * 4 and all(e["base_answer"] != "yes" for e in got["examples"])
    assert "fine-tuned" in result.stdout and "base model" in result.stdout and "+1.0000" in result.stdout  # one table
    html = (tmp_path / "ev" / "eval.html").read_text()
    assert "Is &lt;b&gt;grape&lt;/b&gt; &amp; a word?" in html and "<b>grape" not in html
    assert html.count("<td class='text'>yes</td>") == 4  # each reference


def test_a_wrong_reference_scores_lower(run, tmp_path):
    """The twin of the scores above: the same answers against references they do not match score 0."""
    result = evaluate(run, "--data", held(tmp_path, answer="no way"), "-n", "4", "--no-base", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["fine_tuned"] == {"exact_match": 0.0, "rouge_l": 0.0, "accuracy": 0.0} and got["base"] is None
    assert "base model" not in result.stdout


def test_unsplit_from_the_export_answers_as_the_split_does(run, tmp_path):
    split = evaluate(run, "--data", held(tmp_path), "-n", "4", "--out", tmp_path / "split", "--metric", "rouge_l")
    unsplit = evaluate(run.parent / "export", "--data", held(tmp_path), "-n", "4", "--out", tmp_path / "unsplit", "-m", "rouge_l")
    assert split.exit_code == 0 and unsplit.exit_code == 0, (split.output, unsplit.output)
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("split", "unsplit"))
    assert b["settings"]["mode"] == "unsplit" and a["settings"]["mode"] == "split"
    assert [e["answer"] for e in a["examples"]] == [e["answer"] for e in b["examples"]]
    assert [e["base_answer"] for e in a["examples"]] == [e["base_answer"] for e in b["examples"]]
    given = evaluate(run, "--adapter", run.parent / "export", "--data", held(tmp_path), "-n", "4", "--no-base", "--out", tmp_path)
    assert given.exit_code == 0, given.output
    c = json.loads((tmp_path / "eval.json").read_text())
    assert c["settings"]["mode"] == "unsplit" and [e["answer"] for e in c["examples"]] == [e["answer"] for e in a["examples"]]


@pytest.mark.parametrize("args,message", [
    (["--metric", "bleu"], "error: unknown metric 'bleu'; allowed: exact_match, rouge_l, accuracy"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1, got 0"),
    (["--adapter", "."], "error: --adapter .: not an exported adapter (no adapter_config.json)"),
])
def test_bad_options_get_one_error_line(run, tmp_path, args, message):
    result = evaluate(run, "--data", held(tmp_path), *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_data_without_references_and_missing_runs_are_refused(run, tmp_path):
    raw = jsonl(tmp_path / "raw.jsonl", [{"text": "Once upon a time"}])
    result = evaluate(run, "--data", raw)
    assert result.exit_code == 2 and "row 1 has no reference answer (raw text)" in result.stderr
    missing = evaluate(run, "--data", tmp_path / "missing.jsonl")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr  # the data readers' own message
    nowhere = evaluate(tmp_path / "nowhere", "--data", held(tmp_path))
    assert nowhere.exit_code == 2 and "is neither a run directory" in nowhere.stderr
    assert all("Traceback" not in r.output for r in (result, missing, nowhere))


def test_the_runs_row_cap_does_not_cap_the_held_out_file(run, tmp_path):
    """The run read 40 of its 48 rows (data.max_documents); evaluate reads every row but what --limit leaves out."""
    whole = evaluate(run, "--data", run.parent / "train.jsonl", "-n", "1", "--no-base", "-m", "accuracy", "--out", tmp_path)
    assert whole.exit_code == 0, whole.output
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 48
    assert evaluate(run, "--data", run.parent / "train.jsonl", "-n", "1", "--no-base", "--limit", "5", "--out", tmp_path).exit_code == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 5  # the twin: a cap given is kept
    line = CliRunner().invoke(app, ["--log-format", "json", "evaluate", str(run), "--data", str(run.parent / "train.jsonl"),
                                    "-n", "1", "--no-base", "--limit", "2", "-m", "accuracy", "--out", str(tmp_path)])
    assert json.loads(line.stdout) == {"event": "evaluated", "n": 2, "fine_tuned": {"accuracy": 1.0}, "base": None,
                                       "eval_json": str(tmp_path / "eval.json"), "eval_html": str(tmp_path / "eval.html")}


# -- during training -------------------------------------------------------------------------------------------------
def test_evaluations_during_training_score_generated_answers_and_change_no_loss(run, tmp_path):
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40] and all(r["generated_n"] == 2 for r in rows)
    assert rows[0]["generated_exact_match"] == 0.0 and rows[0]["generated_accuracy"] == 0.0  # the base says no yes
    assert rows[-1]["generated_exact_match"] == 1.0 and rows[-1]["generated_accuracy"] == 1.0  # the trained run does
    assert "generated_rouge_l" not in rows[-1]  # only the metrics asked for
    plain = tmp_path / "plain"
    train(teach_yes(run.parent / "train.jsonl"), plain)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, plain)]
    assert losses[0] == losses[1]  # the generation beside training changed nothing it trained
    again = [json.loads(line) for line in (plain / "evals.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows] and "generated_n" not in again[-1]


def test_data_that_is_not_instruction_data_gets_a_warning_and_no_scores(tmp_path):
    from splittune.config import SplittuneWarning

    with pytest.warns(SplittuneWarning, match="train.eval_metrics scores generated answers to instruction prompts; this "
                      "run's data is causal_lm"):
        train(load_config(None, ["model=tiny:llama", "train.steps=1", "train.seq_len=32", "train.batch_size=2",
                                 "train.eval_batches=1", "data.max_documents=3", "train.eval_metrics=rouge_l"]), tmp_path)
    assert "generated_rouge_l" not in (tmp_path / "evals.jsonl").read_text()


# -- the metrics on hand-made cases ----------------------------------------------------------------------------------
def test_exact_match_normalises_as_squad_does():
    assert normalize("  The Paris.  ") == "paris" and exact_match("The Paris.", "paris") == 1.0
    assert exact_match("an apple, a day", "Apple day") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0  # the twin: more words do not match


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    # LCS 5 words: precision 5/5, recall 5/6, F1 = 2·1·(5/6) / (1 + 5/6) = 10/11
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # the twin, order matters: the same words reversed share only "the on the", F1 = 3/6
    assert rouge_l("mat the on sat cat the", "the cat sat on the mat") == pytest.approx(0.5)


def test_accuracy_is_the_first_token_and_means_average_examples():
    items = [Item("p", "yes", [1], 7), Item("q", "no", [1], 8)]
    means, rows = score(items, [("yes", [7, 2]), ("yes", [7])], ["accuracy", "exact_match"])
    assert rows == [{"accuracy": 1.0, "exact_match": 1.0}, {"accuracy": 0.0, "exact_match": 0.0}]
    assert means == {"accuracy": 0.5, "exact_match": 0.5}
    assert score(items[:1], [("", [])], ["accuracy"])[0] == {"accuracy": 0.0}  # an empty answer misses


def test_metric_names_are_checked():
    assert parse_metrics("rouge_l, exact_match,rouge_l") == ("rouge_l", "exact_match")
    with pytest.raises(EvalError, match="unknown metric 'bleu'; allowed: exact_match, rouge_l, accuracy"):
        parse_metrics("rouge_l,bleu")


def test_the_page_escapes_every_text():
    result = {"n": 1, "metrics": ["exact_match"], "fine_tuned": {"exact_match": 1.0}, "base": None, "settings": {"data": "<x>"},
              "examples": [{"prompt": "<script>alert(1)</script>", "reference": "a & b", "answer": "<i>", "scores": {}}]}
    html = page(result)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a &amp; b" in html and "&lt;i&gt;" in html and "&lt;x&gt;" in html
    assert "<script>" not in html and "<i>" not in html


def test_every_layout_with_references_is_read_and_framed_as_training_frames_it(tmp_path):
    from splittune.data.instruction import InstructionFormat
    from splittune.eval.tasks import read_items
    from splittune.models.zoo import resolve_model

    tok = resolve_model("tiny:llama").tokenizer()
    rows = [{"instruction": "Name the capital.", "input": "France", "output": "Paris"},
            {"text": "a fine film", "label": "positive"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    items = read_items(jsonl(tmp_path / "mixed.jsonl", rows), tok)
    assert [(i.prompt, i.reference) for i in items] == [("Name the capital.\n\nFrance", "Paris"),
                                                        ("Text: a fine film\nLabel:", "positive"), ("Hi", "Hello")]
    assert items[0].prompt_ids == InstructionFormat(tok).prompt_ids(["Name the capital.\n\nFrance"])[0]  # as generate frames it
    assert [tok.decode([i.reference_first]) for i in items] == ["P", "p", "H"]  # the byte tokenizer: the first letter
    assert len(read_items(tmp_path / "mixed.jsonl", tok, limit=2)) == 2
