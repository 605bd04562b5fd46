"""The planner (``splittune plan``): units, predictions against real runs, the search under budgets, the CLI.

Search tests use a hand-written profile (exact, no timing noise); bytes are checked against real tiny runs;
every invariant has a twin that shows its check can fail.
"""

import json

import pytest
import yaml
from typer.testing import CliRunner

import splittune.plan as plan_pkg
import splittune.plan.profile as profile_mod
from splittune.channels.emulated import LinkModel
from splittune.cli import app
from splittune.config import ConfigError, LoraConfig, load_config
from splittune.models.arch import detect_arch
from splittune.models.tiny import DEFAULTS, tiny_config
from splittune.plan import BudgetError, Fit, Profile, predict, profile_model, search
from splittune.plan.pipeline import Hop, simulate
from splittune.plan.sizes import model_sizes
from splittune.plan.units import parse_rate, parse_size, parse_time
from splittune.run import train

runner = CliRunner()
MODEL = "tiny:llama,layers=8"
RUN = [f"model={MODEL}", "train.seq_len=32", "train.steps=2", "train.warmup_steps=0", "data.max_documents=3", "train.eval_batches=1"]
RUNTIME = 300 << 20  # a party process's baseline, fixed here (measuring it takes a fresh process)
BASELINE = {"server": RUNTIME, "client": RUNTIME, "client_peak": RUNTIME}


@pytest.fixture(autouse=True)
def fixed_runtime(monkeypatch):
    monkeypatch.setattr(profile_mod, "runtime_bytes", lambda config_yaml=None: BASELINE)


def synthetic(saved_per_token: float = 4e5) -> Profile:
    """A profile written by hand: blocks whose saved activations dominate memory, simple linear times."""
    config = tiny_config("llama", {**DEFAULTS, "layers": 8})
    sizes = model_sizes(config, detect_arch(config), LoraConfig())
    return Profile(model=MODEL, sizes=sizes, batch=4, seq_len=32, dtype="float32", device="cpu", threads=1, modes=("lora",),
                   block_fwd={"lora": Fit(1e-3, 1e-5)}, block_bwd={"lora": Fit(2e-3, 2e-5)}, segment_fwd=Fit(5e-4),
                   head_fwd=Fit(1e-3, 1e-5), head_bwd=Fit(1e-3, 1e-5), optimizer_s=1e-8,
                   block_saved={"lora": Fit(0.0, saved_per_token)}, shared_saved=Fit(), head_peak=Fit(0.0, 2 * saved_per_token),
                   block_peak=Fit(0.0, saved_per_token / 4), trainable_itemsize=4, runtime_server=RUNTIME, runtime_client=RUNTIME)


@pytest.fixture(scope="module")
def measured():
    """A real profile of the tiny model (a few repetitions: its times are not what these tests check)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profile_mod, "runtime_bytes", lambda config_yaml=None: BASELINE)
        return profile_model(MODEL, batch=4, seq_len=32, reps=2)


# -- units -----------------------------------------------------------------------------------------------
def test_units_read_as_people_write_them():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("1.5 GiB") == 3 << 29
    assert parse_rate("100Mbps") == 100 and parse_rate("1Gbps") == 1000 and parse_rate("512kbps") == 0.512
    assert parse_time("20ms") == 20 and parse_time("0.5s") == 500 and parse_time("0") == 0
    for bad, parse, flag in (("8", parse_size, "--client-memory"), ("eight GB", parse_size, "--client-memory"),
                             ("100MB", parse_rate, "--bandwidth"), ("20", parse_time, "--latency"), ("-3ms", parse_time, "--latency")):
        with pytest.raises(ConfigError, match=flag) as err:
            parse(bad, flag)
        assert "write a number and a unit" in str(err.value)


def test_a_party_process_baseline_is_measured_in_a_fresh_process():
    from splittune.plan.baseline import runtime_bytes

    figures = runtime_bytes(None)
    assert figures["server"] > 50 << 20 and figures["client_peak"] >= figures["server"] * 0.9  # torch alone is more


# -- the step's timeline ---------------------------------------------------------------------------------
def test_pipeline_overlaps_micro_batches_and_queues_frames():
    """Two micro-batches, 1 s of client work each before sending, 1 s of server work, 0.5 s after the reply:
    pipelined, the second forward overlaps the first's server job (the server ends at 3 s, the client at 3.5 s);
    one in flight at a time, nothing overlaps (5 s)."""
    micros = [[Hop(1.0, 0, 1.0, 0, 0.5)], [Hop(1.0, 0, 1.0, 0, 0.5)]]
    step = Hop(0.0, 0, 0.0, 0, 0.0)
    assert simulate(micros, step, 2, None) == pytest.approx(3.5)
    assert simulate(micros, step, 1, None) == pytest.approx(5.0)  # the twin: without overlap it is the plain sum
    link = LinkModel({"up": 1000.0, "down": None}, latency=0.1)  # 1000 B/s up
    one = [[Hop(0.0, 500, 0.0, 0, 0.0)]]
    assert simulate(one, step, 1, link) == pytest.approx(0.5 + 0.1 + 0.1 + 0.1 + 0.1)  # bytes/rate + latency per crossing


# -- predictions against real runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("sets", [["cuts=[2,6]"], ["cuts=[3]", "codec.up=int8", "codec.down=int4", "train.micro_batches=2"]],
                         ids=["u-shape raw", "two-part lossy pipelined"])
def test_predicted_bytes_are_the_bytes_a_run_counts(measured, tmp_path, sets):
    cfg = load_config(None, [*RUN, *sets])
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    p = predict(cfg, measured)
    assert p.bytes_up == pytest.approx(rows[0]["bytes_up"], rel=0.02)
    assert p.bytes_down == pytest.approx(summary["bytes_down"] / summary["steps"], rel=0.02)
    # the twin: the same run predicted without padding removal (or with another codec) is far off
    off = predict(load_config(None, [*RUN, *sets, "codec.up=int4"]), measured)
    assert off.bytes_up != pytest.approx(rows[0]["bytes_up"], rel=0.02)


def test_padded_batches_are_drawn_from_the_data(tmp_path):
    sets = [f"model={MODEL}", "cuts=[2,6]", "data.source=builtin:sentiment", "data.max_documents=200", "train.seq_len=128",
            "train.steps=3", "train.warmup_steps=0", "train.eval_batches=1"]
    cfg = load_config(None, sets)
    prof = profile_model(MODEL, batch=4, seq_len=128, cfg=cfg, reps=1, steps=3)
    assert any(sum(b.kept) < b.rows * b.width for b in prof.batches)  # padded rows: fewer positions cross
    summary = train(cfg, tmp_path / "run")
    assert predict(cfg, prof).bytes_up == pytest.approx(summary["bytes_up"] / summary["steps"], rel=0.02)
    # the twin: taking rows as packed (no data drawn) overcounts what crosses
    packed = profile_model(MODEL, batch=4, seq_len=128, reps=1, estimate=True)
    assert predict(cfg, packed).bytes_up > 1.1 * summary["bytes_up"] / summary["steps"]


def test_estimate_loads_no_weights(monkeypatch, measured):
    import splittune.models.partition as partition

    def refuse(*a, **k):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr(partition, "load_party_model", refuse)
    monkeypatch.setattr(partition, "safe_open", refuse)
    est = profile_model("tiny:llama,layers=5,hidden=96", batch=2, seq_len=16, estimate=True)  # a model never built here
    assert est.estimated and est.sizes.n_blocks == 5
    p = predict(load_config(None, ["model=tiny:llama,layers=5,hidden=96", "cuts=[2]", "train.batch_size=2", "train.seq_len=16"]), est)
    assert p.step_s > 0 and p.client_peak_bytes > RUNTIME and p.bytes_up > 0
    # the estimate's memory formulas are near the measured ones on a llama-like block
    mest = profile_model(MODEL, batch=4, seq_len=32, estimate=True)
    assert mest.block_saved["lora"](128) == pytest.approx(measured.block_saved["lora"](128), rel=0.25)
    with pytest.raises(Exception, match="a weight was loaded"):  # the twin: a measured profile does load them
        profile_model(MODEL, batch=4, seq_len=32, reps=1)


# -- the search --------------------------------------------------------------------------------------------
def test_choices_respect_the_budgets():
    prof = synthetic()
    base = load_config(None, [f"model={MODEL}", "train.seq_len=32"])
    every = search(base, prof, 10**12, bandwidth_mbps=100).ranked
    peaks = sorted(r.prediction.client_peak_bytes for r in every)
    client, server = peaks[len(peaks) // 2], sorted(r.prediction.server_peak_bytes for r in every)[len(every) // 2]
    fit = search(base, prof, client, server, bandwidth_mbps=100).ranked
    assert fit and all(r.prediction.client_peak_bytes <= client and r.prediction.server_peak_bytes <= server for r in fit)
    assert all(r.choice.cuts[0] >= 1 for r in every)
    # the twin: some choices are over these budgets, so the filter had something to refuse
    assert any(r.prediction.client_peak_bytes > client or r.prediction.server_peak_bytes > server for r in every)
    assert len(fit) < len(every)


def test_a_tighter_client_budget_moves_the_cut_or_saves_activations():
    prof = synthetic()
    base = load_config(None, [f"model={MODEL}", "train.seq_len=32"])
    loose = search(base, prof, 10**12, bandwidth_mbps=100).ranked[0]
    budget = (RUNTIME + loose.prediction.client_peak_bytes) // 2
    tight = search(base, prof, budget, bandwidth_mbps=100).ranked[0]
    assert tight.prediction.client_peak_bytes <= budget
    assert (tight.choice.cuts[0] < loose.choice.cuts[0] or tight.choice.checkpointing
            or tight.choice.micro_batches > loose.choice.micro_batches)
    assert loose.prediction.client_peak_bytes > budget  # the twin: the loose plan's best does not fit the tight budget


def test_ties_go_to_the_deeper_first_cut():
    """One row, no pipelining, no link: a two-part step costs the same wherever the cut is, so the deepest
    first cut the client can hold wins; the shallowest is as fast (the twin: only the tie-break chose)."""
    base = load_config(None, [f"model={MODEL}", "train.seq_len=32", "train.batch_size=1"])
    ranked = search(base, synthetic(), 10**12, shape="two-part", codecs=("raw",)).ranked
    best = ranked[0]
    assert best.choice.cuts == (7,) and not best.choice.checkpointing
    shallow = next(r for r in ranked if r.choice.cuts == (1,) and not r.choice.checkpointing)
    assert shallow.prediction.step_s == pytest.approx(best.prediction.step_s, rel=0.01)


def test_an_impossible_budget_names_the_smallest_footprint():
    prof = synthetic()
    base = load_config(None, [f"model={MODEL}", "train.seq_len=32"])
    with pytest.raises(BudgetError) as err:
        search(base, prof, RUNTIME // 2, bandwidth_mbps=100)
    text = str(err.value)
    assert "--client-memory" in text and "smallest client footprint" in text and "cuts [1]" in text
    assert all(w in text for w in ("runtime", "weights", "activations", "AdamW"))
    with pytest.raises(BudgetError, match="smallest server footprint"):
        search(base, prof, 10**12, server_memory=RUNTIME // 2, bandwidth_mbps=100)
    assert search(base, prof, 10**12, bandwidth_mbps=100).ranked  # the twin: a budget that fits gets an answer


# -- the command -------------------------------------------------------------------------------------------
PLAN = ["plan", "--model", MODEL, "--seq-len", "32", "--bandwidth", "100Mbps", "--latency", "20ms"]


def test_plan_prints_choices_and_writes_a_config_that_trains(measured, monkeypatch, tmp_path):
    monkeypatch.setattr(plan_pkg, "profile_model", lambda *a, **k: measured)
    out = tmp_path / "plan.yaml"
    sets = ["--set", "data.max_documents=3", "--set", "train.steps=1", "--set", "train.eval_batches=1"]
    result = runner.invoke(app, [*PLAN, "--client-memory", "2GB", "--top", "3", "--write-config", str(out), *sets])
    assert result.exit_code == 0, result.output
    assert "client" in result.output and "lossy" in result.output and "shallow cuts leak more" in result.output
    text = out.read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert text.startswith("# splittune plan:") and "predicted per step" in text and "link:" in text and "link:" not in body
    written = yaml.safe_load(text)
    cfg = load_config(out)
    assert cfg.cuts == written["cuts"] and cfg.train.micro_batches == written["train"]["micro_batches"]
    assert cfg.data.max_documents == 3 and not cfg.link.active  # the base config's keys stay; the link is a comment
    result = runner.invoke(app, ["train", "--config", str(out), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cuts"] == written["cuts"]
    # the twin: the same file with cuts the model cannot take is refused by train
    (tmp_path / "bad.yaml").write_text(text.replace(f"cuts:\n- {written['cuts'][0]}", "cuts:\n- 40", 1))
    assert runner.invoke(app, ["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")]).exit_code == 2
    result = runner.invoke(app, [*PLAN, "--client-memory", "2GB", "--json", "--codecs", "raw", "--top", "50", *sets])
    assert result.exit_code == 0, result.output
    choices = json.loads(result.output)["choices"]
    assert choices[0]["prediction"]["bytes_up"] > 0 and {c["codec"]["up"] for c in choices} == {"raw"}


@pytest.mark.parametrize("args,needle", [
    (["--client-memory", "8"], "--client-memory '8' is not a quantity"),
    (["--client-memory", "8GB", "--bandwidth", "fast"], "--bandwidth 'fast'"),
    (["--client-memory", "8GB", "--batch", "0"], "--batch must be at least 1"),
    (["--client-memory", "8GB", "--model", "tiny:nosuchmodel"], "unknown model_type 'nosuchmodel'"),
    (["--client-memory", "8GB", "--shape", "round"], "--shape 'round'"),
    (["--client-memory", "8GB", "--codecs", "raw,zip"], "--codecs 'raw,zip': zip"),
    (["--client-memory", "1MB"], "smallest client footprint"),
])
def test_plan_errors_are_one_line(measured, monkeypatch, args, needle):
    if "--model" not in args:
        monkeypatch.setattr(plan_pkg, "profile_model", lambda *a, **k: measured)
    result = runner.invoke(app, [*PLAN, *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and needle in result.output.replace("\n", " ")



def test_the_runtime_baseline_is_the_fresh_process_own_not_a_large_parents():
    """A process started from a big one (the bench holds many models) inherits its high-water mark in ``ru_maxrss``;
    the baseline must be the child's own, or every prediction is the parent's size."""
    import torch

    from splittune.plan.baseline import runtime_bytes

    ballast = torch.ones(2**28)  # 1 GiB, resident in this process
    measured = runtime_bytes.__wrapped__()
    assert float(ballast[-1]) == 1.0
    assert 50 * 2**20 < measured["client_peak"] < 2**30 and measured["server"] < 2**30


def test_plan_profiles_with_the_threads_the_run_will_use(measured, monkeypatch):
    """A pipelined run shares the cores between its parties (auto: half of them): the plan profiles at that count,
    not at every core, or its step time is a run that never happens."""
    from splittune.threads import resolve_threads

    seen = []
    monkeypatch.setattr(plan_pkg, "profile_model", lambda *a, **k: seen.append(k["threads"]) or measured)
    for sets in (["--set", "train.micro_batches=2"], [], ["--set", "train.threads=3"]):
        result = runner.invoke(app, [*PLAN, "--client-memory", "2GB", *sets])
        assert result.exit_code == 0, result.output
    assert seen == [resolve_threads("auto", True), resolve_threads("auto", False), 3]
