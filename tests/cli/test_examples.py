"""Every example config under examples/ loads and runs (on a tiny model, a step or two), through the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import splittune
from splittune.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TINY = ["model=tiny:llama", "train.steps=2", "train.seq_len=192", "train.batch_size=3", "train.eval_batches=1",
        "train.warmup_steps=0", "train.checkpoint_every=0", "data.max_documents=120", "data.max_eval_examples=4"]


def test_there_are_examples_and_the_readme_lists_each():
    listed = (ROOT / "examples" / "README.md").read_text()
    assert len(EXAMPLES) >= 4 and all(f"]({p.name})" in listed for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their data relative to the repository
    cfg = splittune.configure(path, TINY)
    assert cfg.model == "tiny:llama" and splittune.configure(path).model == "builtin:smollm2-135m"  # only the size changed
    cuts = ["cuts=[1,3]"] if cfg.cuts is not None else []
    longer = ["train.seq_len=320"] if "sentiment" in cfg.data.source else []  # a review and its label, byte by byte
    summary = splittune.train(path, tmp_path / "run", overrides=[*TINY, *cuts, *longer])
    assert summary["steps"] == 2 and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    if "alpaca" in path.stem:
        assert summary["task"] == "instruction"
    if "defended" in path.stem:
        assert summary["dx_epsilon"] == 60 and "nopeek" in summary["opening"]["defenses"]


def test_the_api_takes_a_dict_or_a_config_and_names_a_wrong_key():
    cfg = splittune.configure({"model": "tiny:llama", "train": {"steps": 3}}, ["train.lr=0.01"])
    assert (cfg.train.steps, cfg.train.lr) == (3, 0.01) and splittune.configure(cfg, ["train.steps=4"]).train.steps == 4
    with pytest.raises(ConfigError, match=r"unknown config key 'steps' \(did you mean 'train.steps'\?\)"):
        splittune.configure({"steps": 3})
