"""A run says what it is about to do before its first step, and keeps the same figures in summary.json."""

from __future__ import annotations

from splittune.config import load_config
from splittune.report.progress import opening_lines
from splittune.run import train

from configs import tiny


def test_the_opening_names_data_training_wire_and_defenses_with_their_planned_epsilon(tmp_path):
    cfg = load_config(None, tiny("cuts=[1,3]", "train.steps=2", "data.max_documents=4", "train.warmup_steps=0", "train.batch_size=3",
                                 "codec.up=int8", "defense=[{name: gaussian, sigma: 1.0, clip: 1.0}, {name: nopeek, alpha: 0.5}]"))
    summary = train(cfg, tmp_path / "run")
    o = summary["opening"]
    assert (o["task"], o["train_examples"], o["eval_examples"]) == ("causal_lm", summary["train_examples"], summary["eval_examples"])
    assert o["client_trainable"] == summary["client_trainable"] and o["server_trainable"] == summary["server_trainable"] > 0
    assert o["codec"] == {"up": "int8", "down": "raw"} and o["dtype"] == "float32"
    assert o["defenses"]["nopeek"] is None and o["defenses"]["gaussian"] >= summary["gaussian_epsilon"] > 0  # planned: a bound
    lines = opening_lines(o)
    assert lines[0].startswith(f"causal_lm · {o['train_examples']} training / {o['eval_examples']} held-out examples")
    assert "wire: up int8 · down raw" in lines and lines[-1].startswith("defenses: gaussian (ε ≤ ")
    assert lines[-1].endswith("nopeek (no ε)")
    assert not any(line.startswith(("wire", "defenses")) for line in opening_lines({**o, "codec": None, "defenses": {}}))
