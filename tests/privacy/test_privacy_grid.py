"""``splittune privacy``: every setting trained, attacked and scored into privacy.json and its report; a finished
cell is not recomputed; a bad grid is one clear error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from splittune.cli import app
from splittune.config import load_config
from splittune.privacy.grid import Setting, dcs, default_grid, success
from configs import small

runner = CliRunner()
SETS = small("train.steps=2", "train.seq_len=32", "data.max_train_examples=16", "cuts=null")
FAST = ["--attack-set", "inversion.aux_rows=24", "--attack-set", "inversion.random_rows=8"]


def _args(out, grid, *more):
    return ["privacy", *[x for s in SETS for x in ("--set", s)], "--grid", str(grid), "--attack", "inversion", *FAST,
            "--out", str(out), *more]


def test_the_grid_writes_its_frontier_and_resumes(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {name: noise, defense: [{name: gaussian, sigma: 0.5, clip: auto}]}\n")
    out = tmp_path / "grid"
    result = runner.invoke(app, _args(out, grid))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "privacy.json").read_text())
    names = [s["name"] for s in data["settings"]]
    assert names == ["none", "noise"]  # the undefended baseline is always there
    none, noise = data["settings"]
    assert none["defense"] == "none" and noise["defense"].startswith("gaussian(sigma=0.5, clip=")
    for s in data["settings"]:
        assert s["eval_ppl"] > 1 and set(s["attacks"]["inversion"]) >= {"rouge_l_f1", "token_accuracy", "success"}
    assert noise["epsilon"]["gaussian_epsilon"] > 0 and none["epsilon"] == {}
    assert noise["attacks"]["inversion"]["rouge_l_f1"] < none["attacks"]["inversion"]["rouge_l_f1"] - 0.3
    assert data["recommended"] in names and "DCS" in data["score"]
    assert (out / "privacy.png").stat().st_size > 0 and "data:image/png;base64," in (out / "privacy.html").read_text()
    stamp = (out / "cells" / "noise" / "summary.json").stat().st_mtime_ns
    again = runner.invoke(app, _args(out, grid))  # finished cells are read back, not trained again
    assert again.exit_code == 0, again.output
    assert (out / "cells" / "noise" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "privacy.json").read_text())["settings"] == data["settings"]


@pytest.mark.parametrize("text, fragment", [
    ("- {name: a, defence: []}\n", "setting 0 has ['defence']"),
    ("{name: a}\n", "non-empty list of settings"),
    ("- {name: a, defense: [{name: gaussian, sigma: 1}]}\n", "setting 'a'"),
    ("- [unclosed\n", "cannot read it as YAML"),
])
def test_a_bad_grid_is_one_error_line(tmp_path, text, fragment):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    result = runner.invoke(app, _args(tmp_path / "out", grid))
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output


def test_the_default_grid_fits_the_run():
    scale = {"row_norm": 2.0, "embedding_norm": 0.5, "width": 64.0}
    u = default_grid(load_config(None, ["cuts=[2,28]", "data.source=builtin:sentiment", "train.batch_size=4"]), scale)
    names = [s.name for s in u]
    assert names[0] == "none" and {"gaussian-0.5x", "dx-1x", "nopeek-0.5", "label-noise-4"} <= set(names)
    gauss = next(s for s in u if s.name == "gaussian-1x")
    assert gauss.overlay["defense"][0]["clip"] == 2.0  # the median activation row norm
    assert gauss.overlay["defense"][0]["sigma"] == 1 / 8  # noise per value σ·clip = the per-value signal clip/√64
    dx = next(s for s in u if s.name == "dx-1x")
    assert dx.overlay["defense"][0]["epsilon"] == 64 / 0.5  # expected noise norm d/ε = one embedding norm
    two_part = [s.name for s in default_grid(load_config(None, ["cuts=[0]", "segments.bottom=frozen"]), scale)]
    assert not any(n.startswith(("label-noise", "nopeek")) for n in two_part)


def test_the_score_is_the_documented_formula():
    assert dcs(1.0, 1.0) == 1.0 and dcs(0.0, 1.0) == pytest.approx(1 - 0.5**0.5)
    assert success({"target": "class", "leak_auc": 0.25}) == 0.5 and success({"target": "inputs", "rouge_l_f1": 0.7}) == 0.7
    assert Setting("x", {"defense": [{"name": "nopeek", "alpha": 2.0}], "secure_aggregation": True}).label == "nopeek(alpha=2) + secure_aggregation"
