"""``splittune bench``: the quick suite's smoke test (files, keys, ratios), the arithmetic of its figures, and
its refusals."""

import json
import re

import pytest
from typer.testing import CliRunner

from splittune.bench.harness import _groups
from splittune.bench.measure import spread, summarise
from splittune.bench.predict import compare
from splittune.bench.suites import ENTRIES, SUITES, select, suite
from splittune.cli import app
from splittune.config import ConfigError, load_config

runner = CliRunner()


def test_quick_suite_smoke(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--suite", "quick", "--model", "tiny:llama", "--only", "split", "--reps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("bench.json", "report.md", "report.html", "tiny-ratio.png", "tiny-bytes.png", "tiny-memory.png", "tiny-tokens.png",
                 "tiny-eval.png", "tiny-breakdown.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "bench.json").read_text())
    assert results["suite"] == "quick" and results["machine"]["cores"] >= 1 and "torch" in results["versions"]
    assert "torch.set_num_threads" in results["threads_how"]
    assert [p["name"] for p in results["parts"]] == ["tiny", "builtin"]
    entries = results["parts"][0]["entries"]
    assert list(entries) == ["centralized", "peft", "split"]  # the baselines run with whatever --only names
    central, split, peft = entries["centralized"], entries["split"], entries["peft"]
    assert "ratio_vs_centralized" not in central and central["bytes_up"] == 0
    # a plain transformers + peft loop on the same batches: its ratio, and every entry's against it
    assert peft["ratio_vs_centralized"]["median"] > 0 and central["ratio_vs_peft"]["median"] > 0
    assert split["ratio_vs_peft"]["median"] > 0 and "ratio_vs_peft" not in peft and "predicted" not in peft
    assert abs(peft["eval"]["loss"] - central["eval"]["loss"]) < 0.5  # the same model, data and steps
    assert split["ratio_vs_centralized"]["median"] > 0 and split["bytes_up"] > 0 and split["bytes_down"] > 0
    assert split["config"]["cuts"] and split["config"]["model"] == "tiny:llama"  # the entry's resolved config
    assert set(split["breakdown"]) >= {"compute_s", "server_s", "wire_s"}
    assert split["eval"]["loss"] > 0 and split["tokens_per_s"] > 0
    # each party in its own process: two processes, two different peaks, both more than the torch runtime alone
    assert split["memory"]["client_peak_rss"] > 100 * 2**20 and split["memory"]["server_peak_rss"] > 100 * 2**20
    assert "server_peak_rss" not in central["memory"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and not re.search(r'src="[^"]+\.png"', page)  # self-contained
    assert "| split |" in (out / "report.md").read_text()
    assert not (out / "memory").exists()  # the memory runs' scratch directories are gone


class _Timed:
    def __init__(self, rounds):
        self.rounds = rounds


def _round(s, tokens=100, up=10, down=20):
    return {"round_s": s, "tokens": tokens, "bytes_up": up, "bytes_down": down, "loss": 1.0}


def test_ratios_pair_each_round_with_the_baseline_round():
    central = _Timed([_round(9.0), _round(1.0), _round(2.0), _round(1.0)])
    entry = _Timed([_round(9.0), _round(2.0), _round(3.0), _round(2.0)])
    figures = summarise(entry, 1, central)
    assert figures["rounds"] == 3 and figures["step_s"]["median"] == 2.0  # the warm-up round is left out
    assert figures["ratio_vs_centralized"] == {"median": 2.0, "p10": 1.5, "p90": 2.0}  # 2/1, 3/2, 2/1
    # per token: a round of two clients (twice the tokens) in twice the time costs the same per token
    two = _Timed([_round(9.0, 200), _round(2.0, 200), _round(4.0, 200), _round(2.0, 200)])
    assert summarise(two, 1, central)["ratio_vs_centralized"]["median"] == 1.0
    assert summarise(central, 1, central)["ratio_vs_centralized"] == {"median": 1.0, "p10": 1.0, "p90": 1.0}
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "p10": 1.0, "p90": 5.0}


def test_prediction_error_is_relative_to_what_was_measured():
    figures = {"step_s": {"median": 2.0}, "bytes_up": 100, "bytes_down": 0, "memory": {"client_peak_rss": 1000}}
    errors = compare({"step_s": 2.4, "bytes_up": 90, "bytes_down": 5, "client_peak_bytes": 1100, "server_peak_bytes": 7}, figures)
    assert errors["step_s"] == pytest.approx(0.2) and errors["bytes_up"] == pytest.approx(-0.1)
    assert errors["client_peak"] == pytest.approx(0.1)
    assert errors["bytes_down"] is None and errors["server_peak"] is None  # nothing measured: no error, not a division by zero


def test_every_entry_is_a_valid_config_and_suites_name_known_entries():
    names = {e.name for e in ENTRIES}
    for parts in SUITES.values():
        for part in parts:
            assert set(part.entries) <= names and part.entries[0] == "centralized"
            for name in part.entries:
                e = next(x for x in ENTRIES if x.name == name)
                load_config(None, [f"model={part.model}", *part.sets, *e.sets])
    assert {e.group for e in ENTRIES} >= {"baseline", "codec", "pipelining", "link", "clients"}
    assert "naive split" in names


def test_groups_each_carry_their_own_baseline():
    groups = _groups(tuple(e.name for e in ENTRIES))
    assert all(g[:2] == ["centralized", "peft"] and 2 < len(g) <= 8 for g in groups)  # both baselines in every group
    assert sorted(n for g in groups for n in g[2:]) == sorted(e.name for e in ENTRIES if e.name not in ("centralized", "peft"))
    assert _groups(("centralized", "split")) == [["centralized", "split"]]  # a suite without the peft entry


def test_unknown_suite_and_entry_are_refused():
    with pytest.raises(ConfigError, match="unknown bench suite 'fast'; suites: quick, full"):
        suite("fast")
    with pytest.raises(ConfigError, match="unknown bench entry 'int9'.*'int8'"):
        select(suite("quick"), ["int9"], None)
    result = runner.invoke(app, ["bench", "--suite", "fast"])
    assert result.exit_code == 2 and "error: unknown bench suite 'fast'" in result.output
    result = runner.invoke(app, ["bench", "--reps", "0", "--only", "split"])
    assert result.exit_code == 2 and "--reps" in result.output


def test_the_scale_suite_pairs_in_process_with_ray_and_stays_out_of_the_others():
    from splittune.bench.suites import EVERY, entry

    (part,) = suite("scale")
    assert part.entries == ("centralized", "8 clients, sfl-v2", "8 clients, sfl-v2, Ray")
    assert set(entry("8 clients, sfl-v2, Ray").sets) - set(entry("8 clients, sfl-v2").sets) == {"engine=ray"}  # only that
    assert not any("Ray" in name for name in EVERY)  # quick and full start no cluster
