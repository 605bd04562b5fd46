"""A newcomer's first hour (issue 8): run directories one run at a time, shorthands, cuts that fit the model,
warnings that say what is off, progress that tells the truth, threads, and docs that cannot drift."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import warnings
from io import StringIO
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from splittune.cli import app
from splittune.config import ConfigError, SplittuneDeprecationWarning, SplittuneWarning, default_cuts, dump_config, load_config, validate
from splittune.rundir import RunDirError, RunLock

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model=tiny:gpt2", "--set", "train.steps=2", "--set", "train.seq_len=32", "--set", "data.max_documents=3",
        "--set", "train.eval_batches=1"]
QUIET = ["--set", "train.warmup_steps=0", "--set", "train.batch_size=2"]  # no setting a warning would flag


def flat(output: str) -> str:
    return " ".join(output.split())


# -- 1. one run per directory -------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys
    from splittune.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    if sys.argv[2] == "die":
        import os; os._exit(0)  # dies holding it: the kernel drops the flock, the file keeps the owner
    sys.stdin.read()
    lock.release()
""")


def hold(folder: Path, how: str = "hold") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    other = hold(out)
    try:
        result = runner.invoke(app, ["train", *TINY, "--out", str(out)])
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert f"{out} is in use by another run: pid {other.pid} on {socket.gethostname()} since" in text
        assert not (out / "config.yaml").exists()  # refused before it touched anything
        with pytest.raises(RunDirError, match=f"pid {other.pid}"):
            RunLock(out).acquire()
    finally:
        other.communicate("")
    # the twin: released, the directory is free again, with no notice (a clean release empties the file)
    assert (out / ".lock").read_text() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunLock(out) as lock:
            owner = json.loads((out / ".lock").read_text())
            assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["since"] and "command" in owner
            assert lock.took_over is None
            with pytest.raises(RunDirError, match="in use by another run"):  # even from the same process
                RunLock(out).acquire()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path):
    out = tmp_path / "run"
    dead = hold(out, "die")
    dead.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == dead.pid  # the file says who; nobody holds it
    result = runner.invoke(app, ["train", *TINY, *QUIET, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "warning:" in text and f"taking over the lock of a run that is gone (pid {dead.pid} on" in text
    assert (out / ".lock").read_text() == ""  # released at the end of the run
    # the twin: the library says it as a warning tests (and callers) can catch, naming whoever the file names
    (out / ".lock").write_text(json.dumps({"pid": 4194304, "host": "elsewhere", "since": "yesterday"}))
    with pytest.warns(SplittuneWarning, match=r"pid 4194304 on elsewhere since yesterday"):
        with RunLock(out) as lock:
            assert lock.took_over["pid"] == 4194304


def test_serve_and_compare_lock_their_directories(tmp_path):
    state, out = tmp_path / "state", tmp_path / "cmp"
    with RunLock(state, "server"):
        result = runner.invoke(app, ["serve", "--model", "tiny:llama", "--state", str(state), "--listen", "127.0.0.1:50999"])
        assert result.exit_code == 2 and "is in use by another server: pid" in flat(result.output), result.output
    with RunLock(out, "compare"):
        result = runner.invoke(app, ["compare", *TINY, "--out", str(out)])
        assert result.exit_code == 2 and "is in use by another compare: pid" in flat(result.output), result.output
        assert not (out / "centralized").exists()


# -- 2. shorthands and one shape ------------------------------------------------------------------------------
def test_a_plain_string_for_data_is_its_source(tmp_path):
    assert load_config(None, ["data=my.jsonl"]).data.source == "my.jsonl"
    cfg = load_config(None, ["data.max_documents=3", "data=my.jsonl", "data.task=instruction"])  # merged, not replaced
    assert (cfg.data.source, cfg.data.max_documents, cfg.data.task) == ("my.jsonl", 3, "instruction")
    path = tmp_path / "run.yaml"
    path.write_text("data: notes.txt\n")
    assert load_config(path, ["data.max_documents=2"]).data.source == "notes.txt"
    # the twins: what is not a string or a mapping, and unknown keys, are still clear errors
    with pytest.raises(ConfigError, match=r"^data: Input should be a valid dictionary"):
        load_config(None, ["data=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sourc' \(did you mean 'data.source'\?\): 'sourc' is not one of source, task"):
        load_config(None, ["data.sourc=x"])
    result = runner.invoke(app, ["train", *TINY, "--set", f"data={tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output and "dictionary" not in result.output


def test_client_overrides_take_the_top_levels_shapes(recwarn):
    cfg = validate({"clients": 2, "client_overrides": {1: {"lora": {"rank": 2}, "data": "b.jsonl"}}})
    assert (cfg.client_rank(0), cfg.client_rank(1)) == (8, 2)
    assert (cfg.client_source(0), cfg.client_source(1)) == ("builtin:shakespeare", "b.jsonl")
    assert not [w for w in recwarn if issubclass(w.category, SplittuneWarning)]
    saved = yaml.safe_load(dump_config(cfg))["client_overrides"]["1"]
    assert saved == {"cuts": None, "lora": {"rank": 2}, "data": {"source": "b.jsonl"}}
    with pytest.raises(ConfigError, match=r"^client_overrides.1.lora.rank: Input should be greater than or equal to 1 \(got 0\)$"):
        validate({"clients": 2, "client_overrides": {1: {"lora": {"rank": 0}}}})
    with pytest.raises(ConfigError, match=r"'alpha' is not one of rank"):  # only the rank is per client
        validate({"clients": 2, "client_overrides": {1: {"lora": {"alpha": 3}}}})


def test_the_old_spellings_still_work_with_a_deprecation_warning():
    with pytest.warns(SplittuneDeprecationWarning, match=r"lora_rank: 2 is deprecated; write lora: \{rank: 2\}"):
        cfg = load_config(None, ["clients=2", "client_overrides=[{}, {lora_rank: 2}]"])
    assert cfg.client_rank(1) == 2
    assert yaml.safe_load(dump_config(cfg))["client_overrides"][1]["lora"] == {"rank": 2}  # config.yaml: the new shape
    with pytest.warns(SplittuneDeprecationWarning, match="source"):
        cfg = load_config(None, ["clients=2", "partition=by_source", "client_overrides=[{source: a.txt}, {data: b.txt}]"])
    assert (cfg.client_source(0), cfg.client_source(1)) == ("a.txt", "b.txt")
    with pytest.raises(ConfigError, match="lora_rank=2 and lora.rank=3 disagree"):
        load_config(None, ["clients=2", "client_overrides=[{}, {lora_rank: 2, lora: {rank: 3}}]"])
    result = runner.invoke(app, ["config", "--set", "clients=2", "--set", "client_overrides={1: {lora_rank: 4}}"])
    assert result.exit_code == 0 and "warning: client_overrides: lora_rank: 4 is deprecated" in flat(result.output)


# -- 3. cuts that fit the model; none without a split -------------------------------------------------------
def test_default_cuts_fit_the_model():
    assert [default_cuts(n) for n in (2, 3, 4, 6, 30)] == [[0, 1], [1, 2], [1, 3], [2, 4], [2, 28]]
    assert load_config(None, []).cuts is None  # auto until the model is known
    assert load_config(None, []).resolve(30).cuts == [2, 28]
    assert load_config(None, ["cuts=auto"]).resolve(4).cuts == [1, 3]
    assert load_config(None, ["cuts=[2]"]).resolve(4).cuts == [2]  # the twin: explicit cuts stay as written
    assert load_config(None, ["mode=centralized"]).resolve(4).cuts is None
    with pytest.raises(ConfigError, match="needs at least 2 blocks"):
        default_cuts(1)


def test_tiny_model_alone_trains_with_cuts_that_fit(tmp_path):
    result = runner.invoke(app, ["train", *TINY, *QUIET, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "cuts auto" in result.output and "u-shape · cuts [1, 3]" in result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["cuts"] == [1, 3]
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["cuts"] == [1, 3]  # the resolved config


def test_centralized_has_no_cuts(tmp_path):
    args = ["train", *TINY, *QUIET, "--set", "model=tiny:llama", "--set", "mode=centralized"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["shape"] == "centralized" and summary["cuts"] is None
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["cuts"] is None
    # the twin: explicit cuts are checked exactly as before, centralized or not
    result = runner.invoke(app, [*args, "--set", "cuts=[2,28]", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cuts [2, 28] do not fit a model of 4 blocks" in flat(result.output)


def test_a_centralized_plan_without_cuts_trains_everything_as_the_segments_say():
    from splittune.models.partition import plan_split

    plan = plan_split(4, [], mode="centralized")
    assert plan.shape == "centralized" and [(s.name, s.start, s.end, s.embeds, s.head) for s in plan.segments] == [
        ("bottom", 0, 0, True, False), ("trunk", 0, 4, False, False), ("top", 4, 4, False, True)]
    with pytest.raises(Exception, match="cuts: auto becomes real cuts"):  # a split needs its cuts resolved
        plan_split(4, [])


# -- 4. messages --------------------------------------------------------------------------------------------
def test_hub_data_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    result = runner.invoke(app, ["train", *TINY, "--set", "data=hf:someone/something", "--out", str(tmp_path / "h")])
    assert result.exit_code == 2 and "pip install 'splittune[datasets]'" in flat(result.output), result.output
    # the twin: printed as rich markup, the extra vanishes (what the CLI used to show)
    console = Console(file=StringIO(), width=200)
    console.print("pip install 'splittune[datasets]'")
    assert "[datasets]" not in console.file.getvalue()


def test_settings_that_run_but_not_as_meant_warn(tmp_path):
    from splittune.run import train

    base = ["model=tiny:gpt2", "train.steps=2", "train.seq_len=32", "data.max_documents=3", "train.eval_batches=1"]
    with pytest.warns(SplittuneWarning) as caught:
        train(load_config(None, [*base, "data.max_train_examples=2", "train.batch_size=4"]), tmp_path / "w")
    messages = [str(w.message) for w in caught if issubclass(w.category, SplittuneWarning)]
    assert any("train.batch_size=4 is larger than the training set (2 examples)" in m for m in messages)
    assert any("train.warmup_steps=2 >= train.steps=2" in m for m in messages)
    # the twin: sensible settings run silently
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplittuneWarning)
        train(load_config(None, [*base, "data.max_train_examples=2", "train.batch_size=2", "train.warmup_steps=1"]), tmp_path / "q")


def test_cli_prints_one_warning_line_each_and_says_when_it_resumes(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--set", "data.max_train_examples=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2 and "batch_size" in lines[0] + lines[1] and "warmup_steps" in lines[0] + lines[1]
    assert "resuming" not in result.output
    result = runner.invoke(app, ["train", *TINY, "--set", "data.max_train_examples=2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resuming from step 2" in result.output


# -- 5. progress ----------------------------------------------------------------------------------------------
def test_plain_progress_lines_when_not_on_a_terminal(tmp_path):
    result = runner.invoke(app, ["train", *TINY, *QUIET, "--out", str(tmp_path / "p")])  # CliRunner: not a terminal
    assert result.exit_code == 0, result.output
    out = result.output
    order = [out.index(s) for s in ("loading model and data", "eval before training: loss", "step 1/2 · loss", "step 2/2 · loss",
                                    "eval after training: loss")]
    assert order == sorted(order), out
    assert not re.search(r"━+\s*\d+/\d+", out)  # no bar


def test_a_terminal_gets_a_bar_with_an_evaluating_phase():
    from splittune.report.progress import RunProgress

    console = Console(file=StringIO(), force_terminal=True, width=160)
    shown = RunProgress(console)
    with shown.live() as bar:
        bar.add("train", 2)
        bar.update("train", 0, 2, {"phase": "start", "cuts": [1, 3], "shape": "u-shape", "threads": 1, "resume": None})
        bar.update("train", 1, 3, {"phase": "eval", "label": "before training"})
        task = bar.bar.tasks[0]
        assert task.fields["phase"] == "evaluating" and task.fields["info"] == "evaluating before training: 1/3 batches"
        row = {"step": 1, "client": 0, "loss": 2.0, "bytes_up": 10, "bytes_down": 10, "step_s": 0.1}
        bar.update("train", 1, 2, row)
        assert task.completed == 1 and task.fields["phase"] == "training"
    assert "step 1/2 ·" not in console.file.getvalue()  # the twin of the plain lines: a bar, not lines


# -- 6. threads ---------------------------------------------------------------------------------------------
def test_auto_threads(monkeypatch):
    import splittune.threads as threads

    for cores, shared, lone in ((1, 1, 1), (2, 1, 2), (16, 8, 16), (64, 8, 64)):
        monkeypatch.setattr(threads, "available_cores", lambda: cores)
        assert (threads.resolve_threads("auto", True), threads.resolve_threads("auto", False)) == (shared, lone)
    assert threads.resolve_threads(3, True) == 3
    with pytest.raises(ConfigError, match=r"train.threads: must be auto or an integer >= 1, got 0"):
        load_config(None, ["train.threads=0"])


def test_threads_are_applied_recorded_and_restored(tmp_path):
    import torch

    from splittune.threads import resolve_threads

    before = torch.get_num_threads()
    result = runner.invoke(app, ["train", *TINY, *QUIET, "--set", "train.threads=1", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["threads"] == 1
    assert "1 thread" in result.output and torch.get_num_threads() == before
    from splittune.run import train

    summary = train(load_config(None, ["model=tiny:gpt2", "train.steps=1", "train.warmup_steps=0", "train.seq_len=32",
                                       "data.max_documents=3", "train.eval_batches=1"]), tmp_path / "auto")
    assert summary["threads"] == resolve_threads("auto", shared=False)  # one client, no pipelining: the parties take turns
    piped = train(load_config(None, ["model=tiny:gpt2", "train.steps=1", "train.warmup_steps=0", "train.seq_len=32",
                                     "data.max_documents=3", "train.eval_batches=1", "train.micro_batches=2"]), tmp_path / "piped")
    assert piped["threads"] == resolve_threads("auto", shared=True)  # the client computes while the server does


# -- 7. docs that cannot drift ------------------------------------------------------------------------------------
def test_docs_config_md_holds_the_generated_reference():
    from splittune.config_reference import block, current_block, reference

    doc = (ROOT / "docs" / "config.md").read_text()
    assert current_block(doc) == block(), "docs/config.md is out of date: run `splittune config --reference --update docs/config.md`"
    text = reference()
    assert "| `data.eval_fraction` | `0.05` | a number > 0 and < 0.5 |" in text
    assert "| `train.lr` | `0.0002` | a number > 0 |" in text and "| `mode` | `split` | `split`, `centralized`, `federated` |" in text
    assert "## Run directory" in doc and "`metrics.jsonl`" in doc  # the hand-written parts stay
    # the twin: a document whose block differs (a stale default) is caught
    assert current_block(doc.replace("| `train.steps` | `40` |", "| `train.steps` | `30` |")) != block()
    result = runner.invoke(app, ["config", "--reference"])
    assert result.exit_code == 0 and result.output == text


def options_missing_from_readme(readme: str) -> dict[str, list[str]]:
    import typer.main

    missing = {}
    for name, command in typer.main.get_command(app).commands.items():
        rows = " ".join(line for line in readme.splitlines() if line.startswith(f"| `splittune {name}"))
        lost = [o for p in command.params for o in p.opts if o.startswith("--") and not re.search(re.escape(o) + r"\b", rows)]
        if lost or not rows:
            missing[name] = lost or ["(no row)"]
    return missing


def test_readme_command_table_has_every_option():
    readme = (ROOT / "README.md").read_text()
    assert options_missing_from_readme(readme) == {}
    # the twin: a flag left out is named
    assert options_missing_from_readme(readme.replace("--client-index", "")) == {"train": ["--client-index"]}


def test_models_lists_the_tiny_models_as_the_docs_do():
    from splittune.models.catalog import TESTED_ARCHITECTURES
    from splittune.models.tiny import DEFAULTS, tiny_reference

    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert tiny_reference() in result.output and all(f"{k}=" in tiny_reference() for k in DEFAULTS)
    assert all(f"tiny:{a}" in result.output for a in TESTED_ARCHITECTURES)
    assert tiny_reference() in (ROOT / "docs" / "models-and-data.md").read_text().replace("\n  ", "")


def family_rows(output: str) -> dict[str, str]:
    """``splittune models``' families table: model_type → status, from its rows."""
    rows = [re.match(r"│ (\S.*?) +│ (\S+) +│", line) for line in output.splitlines()]
    return {m.group(1): m.group(2) for m in rows if m}


def test_models_lists_each_family_with_its_status():
    from splittune.models.catalog import FAMILIES

    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    rows, listed = family_rows(result.output), {f.model_type: f.status for f in FAMILIES}
    assert listed.items() <= rows.items()
    assert rows["any other"] == "detected" and "run splittune verify" in result.output
    refused = next(f for f in FAMILIES if f.status == "refused")
    assert refused.why.split(",")[0].split()[-1] in result.output  # the reason is shown (wrapped in its cell)
    # the twin: a family shown with another status is caught
    shown_wrong = re.sub(r"│ gptj( +)│ exact  ", r"│ gptj\1│ refused", result.output)
    assert shown_wrong != result.output and not listed.items() <= family_rows(shown_wrong).items()


# -- 8. compare's table ---------------------------------------------------------------------------------------
def test_compare_prints_skip_reasons_under_the_table(tmp_path, monkeypatch):
    import splittune.compare as compare_mod

    reason = "schedule: sequential relays one client-side model from client to client; nothing can be personal " * 2
    done = {"eval_loss_before": 5.0, "eval_loss_after": 4.0, "train_loss_last": 4.1, "bytes_up": 1, "bytes_down": 2, "wall_s": 1.0}
    monkeypatch.setattr(compare_mod, "compare", lambda cfg, out, progress: {"sfl-v2": done, "sequential": {"skipped": reason}})
    result = runner.invoke(app, ["compare", *TINY, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("sequential skipped: schedule: sequential relays") for line in lines)  # one line, whole
    cell = [line for line in lines if line.startswith("│ sequential")]
    assert cell and "skipped" in cell[0] and "relays" not in result.output.split("sequential skipped:")[0]
