"""`splittune plan --max-leak`: the planner meets a privacy target from a leak table it measures once per model (and
reads back after), says how sure it is, refuses a target it cannot reach with the best it can, and its pick holds
the target when trained and attacked again."""

import json

import pytest
from typer.testing import CliRunner

from splittune.cli import app
from splittune.config import load_config
from splittune.plan.leak import LeakTargetError, meet
from splittune.privacy.job import attack_run
from splittune.privacy.leak_table import LeakPoint, LeakTable, read, upper
from splittune.run import train

from configs import SMALLEST

FAST = ["--attack-set", "inversion.aux_rows=24", "--attack-set", "inversion.random_rows=8"]
PLAN = ["plan", "--model", SMALLEST, "--client-memory", "8GB", "--bandwidth", "1Gbps", "--leak-cuts", "1",
        "--leak-defenses", "gaussian", "--codecs", "raw", "--shape", "two-part", "--top", "1", *FAST]


def _point(cut, setting, leak, hi, ratio, codec="raw"):
    return LeakPoint(cut, codec, setting, {} if setting == "none" else {"defense": [{"name": "gaussian", "sigma": 0.1, "clip": 3.0}]},
                     leak, hi, 8, 10.0 * ratio, ratio)


TABLE = LeakTable("m", [_point(2, "none", 0.9, 0.95, 1.0), _point(2, "gaussian-1x", 0.4, 0.5, 1.05),
                        _point(2, "gaussian-2x", 0.1, 0.2, 1.9), _point(4, "none", 0.6, 0.7, 1.0),
                        _point(4, "gaussian-1x", 0.25, 0.28, 1.04)])


def test_the_table_bounds_a_choice_as_it_says():
    assert TABLE.at(4, "raw", "none")[0].leak == 0.6 and TABLE.at(4, "raw", "none")[1] == ""
    point, how = TABLE.at(7, "raw", "none")  # no defense: a deeper cut leaks at most what the shallower measured one does
    assert point.cut == 4 and how == "measured at cut 4: at most that"
    assert TABLE.at(7, "raw", "gaussian-1x")[0] is None  # a defense is offered only at the cut its strength was set for
    point, how = TABLE.at(2, "int8", "gaussian-1x")
    assert point.codec == "raw" and how == "int8 not measured: at most raw's"
    assert TABLE.at(1, "raw", "none")[0] is None  # shallower than anything measured: unknown
    assert upper([0.5]) == 0.5 and upper([0.4, 0.6]) == pytest.approx(0.5 + 1.96 * 0.1414213 / 1.4142135, abs=1e-4)


class _Choice:
    def __init__(self, cut):
        self.cuts, self.up = (cut,), "raw"


class _Ranked:
    """What ``meet`` reads of the planner's choices (a config, a choice, and room for the guard)."""

    def __init__(self, cut, time):
        from splittune.config import load_config

        self.choice, self.time, self.guard = _Choice(cut), time, None
        self.config = load_config(None, ["model=tiny:llama", f"cuts=[{cut}]"])

    def __repr__(self):
        return f"cut {self.choice.cuts[0]} {self.guard.point.setting if self.guard else ''}"


@pytest.fixture(autouse=True)
def plain_replace(monkeypatch):
    import splittune.plan.leak as leak

    def swap(r, **changes):
        new = _Ranked.__new__(_Ranked)
        new.__dict__.update({**r.__dict__, **changes})
        return new

    monkeypatch.setattr(leak, "replace", swap)


def test_the_pick_meets_the_target_at_the_least_perplexity_cost_then_time():
    fits = [_Ranked(2, 0.1), _Ranked(4, 0.2)]
    ranked = meet(fits, TABLE, 0.3, rank=lambda r: r.time)
    best = ranked[0]
    assert (best.choice.cuts, best.guard.point.setting, best.guard.sure) == ((4,), "gaussian-1x", True)
    assert best.config.defense[0].name == "gaussian"  # the setting is in the config the plan writes
    assert [(r.choice.cuts[0], r.guard.point.setting) for r in ranked] == [(4, "gaussian-1x"), (2, "gaussian-2x")]
    loose = meet(fits, TABLE, 0.45, rank=lambda r: r.time)  # at equal cost, a sure choice before a faster likely one
    assert [(r.choice.cuts[0], r.guard.point.setting, r.guard.sure) for r in loose][:2] == [(4, "gaussian-1x", True), (2, "gaussian-1x", False)]


def test_a_target_no_choice_reaches_is_refused_with_the_best_reachable():
    with pytest.raises(LeakTargetError, match=r"no choice that fits meets --max-leak 0.05: the least leak reachable is 0.100 .* "
                                              r"with cut 2, gaussian-2x, perplexity x1.90; raise --max-leak to at least 0.10"):
        meet([_Ranked(2, 0.1), _Ranked(4, 0.2)], TABLE, 0.05, rank=lambda r: r.time)


def test_plan_measures_the_table_once_and_its_pick_holds_when_re_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITTUNE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    first = runner.invoke(app, [*PLAN, "--max-leak", "0.5", "--json"])
    assert first.exit_code == 0, first.output
    assert "measuring the leak table" in first.output
    plan = json.loads(first.stdout[first.stdout.index("{"):])
    pick = plan["choices"][0]
    assert pick["leak"]["rouge_l_f1"] <= 0.5 and pick["cuts"] == [1] and pick["leak"]["texts"] > 0
    (saved,) = (tmp_path / "cache" / "leak-tables").glob("*/table.json")
    undefended = next(p for p in read(saved).points if p.setting == "none")
    assert undefended.leak > 0.5 and pick["defense"]["setting"].startswith("gaussian-")  # the defense is what meets it
    again = runner.invoke(app, [*PLAN, "--max-leak", "0.5", "--write-config", str(tmp_path / "pick.yaml")])
    assert again.exit_code == 0, again.output
    assert "measuring the leak table" not in again.output and "#1 leak: ROUGE-L" in again.output  # read back from the cache
    # the pick, trained and attacked afresh (its own run, its own noise): within the target
    cfg = load_config(tmp_path / "pick.yaml", ["data.source=builtin:sentiment", "train.steps=2", "train.seq_len=64",
                                                "train.batch_size=2", "data.max_train_examples=16", "data.max_eval_examples=4",
                                                "train.eval_batches=1", "train.warmup_steps=0"])
    assert [d.name for d in cfg.defense] == ["gaussian"]
    train(cfg, tmp_path / "again", record_tap=("server",))
    result = attack_run(tmp_path / "again", "inversion", options={"aux_rows": 24, "random_rows": 8})
    assert result["rouge_l_f1"] <= 0.5
    least = min(p.leak for p in read(saved).points)
    if least > 0:  # the twin: a target below every point the table holds (its unit twin above never skips)
        impossible = runner.invoke(app, [*PLAN, "--max-leak", f"{least / 2:g}"])
        assert impossible.exit_code == 2 and f"the least leak reachable is {least:.3f}" in impossible.output
