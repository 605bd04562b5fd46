"""One registry: every defense is one class, and the config, the chain, the client, the summary and the privacy grid
read it from there. The twins show the registry refuses what it should and that a new class is all it takes."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from pydantic import Field

from splittune.config import DEFENSE_NAMES, ConfigError, Defense as DefenseEntry, DpSgdConfig, load_config
from splittune.cut.transforms import TRANSFORMS, Crossing, End, build_transform
from splittune.defenses import (DEFENSES, ClientDefenses, Defense, DefenseError, NoisyTransform, Placement, Settings,
                                defense, register, under)
from splittune.defenses.dp_sgd import DPSGD
from splittune.defenses.dx import Dx
from splittune.defenses.nopeek import NoPeek
from splittune.wire import Message

from configs import small

ROOT = Path(__file__).resolve().parents[2]


def test_the_config_entries_are_the_classes_settings():
    entries = typing.get_args(typing.get_args(DefenseEntry)[0])
    assert entries == tuple(cls.Settings for cls in under("defense"))
    assert {"adversarial", "dx", "gaussian", "label-noise", "mid", "nopeek", "textobfuscator"} <= set(DEFENSE_NAMES)
    assert DEFENSE_NAMES == tuple(cls.name for cls in under("defense")) and DpSgdConfig is DPSGD.Settings
    for cls in DEFENSES.values():
        assert cls.__doc__ or cls.Settings.__doc__, cls.name
        for name, field in cls.Settings.model_fields.items():
            assert name == "name" or field.description, f"{cls.name}.{name} has no description"
    privacy = (ROOT / "docs" / "privacy.md").read_text()
    for name in DEFENSE_NAMES:
        assert f"| `{name}` (" in privacy, f"docs/privacy.md's table of defenses lacks {name}"
    assert "`dp_sgd:`" in privacy


def test_each_defense_acts_where_it_says():
    crossing = {n for n, c in DEFENSES.items() if c.crosses}
    assert {"gaussian", "label-noise", "mid"} <= crossing and not {"dx", "nopeek", "adversarial", "textobfuscator"} & crossing
    for name, cls in DEFENSES.items():
        assert (TRANSFORMS.get(name) is cls) == cls.crosses  # a defense on what crosses is a transform of the chain
    with pytest.raises(NotImplementedError, match="the chain builds it"):
        DEFENSES["gaussian"].create(None, None)


def test_an_unknown_defense_is_refused_with_the_registered_ones():
    with pytest.raises(DefenseError, match=f"no defense 'blur'; the defenses are {', '.join(sorted(DEFENSES))}$"):
        defense("blur")
    with pytest.raises(ValueError, match="registered twice"):
        register(DEFENSES["dx"])


class FlipSettings(Settings):
    """Negates the activations (a test defense: it protects nothing)."""

    name: typing.Literal["test-flip"]
    scale: float = Field(1.0, description="what the activations are multiplied by after the sign flip")


def test_a_new_defense_is_one_registered_class():
    """Registering a class puts it in the chain's transforms and the registry, with its hooks; nothing else changes."""

    class Flip(NoisyTransform, Defense):
        name = "test-flip"
        Settings = FlipSettings
        crosses = True

        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def spec(self):
            return {"name": self.name, "scale": self.scale}

        def send(self, crossing, end):
            crossing.msg.tensors["hidden"] = -self.scale * crossing.msg.tensors["hidden"]

    assert "test-flip" not in DEFENSES and "test-flip" not in TRANSFORMS  # the twin: not there before
    register(Flip)
    try:
        t = build_transform({"name": "test-flip", "scale": 2.0})
        crossing = Crossing(Message("activations", "s", 1, 0, {"hidden": torch.ones(1, 2, 3)}, {}))
        t.send(crossing, End())
        assert torch.equal(crossing.msg.tensors["hidden"], torch.full((1, 2, 3), -2.0))
        assert defense("test-flip") is Flip and Flip in under("defense")
    finally:
        del DEFENSES["test-flip"], TRANSFORMS["test-flip"]


def test_a_clients_defenses_compose_in_config_order_and_keep_their_state():
    """dχ noises the embeddings, NoPeek correlates the noised ones; their state travels under each one's name."""
    from splittune.run import build

    cfg = load_config(None, small("defense=[{name: nopeek, alpha: 1}, {name: dx, epsilon: 50}]", "defense_seed=5"))
    client = build(cfg)[0]
    made = client.defenses
    assert [type(d) for d in made.defenses] == [NoPeek, Dx] and made.active
    assert made.varies() == "the dx defense draws new noise on the embeddings at every forward"
    ids, mask = torch.randint(0, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    clean = client.party.model.get_input_embeddings()(ids)
    with made.bottom(1, 0) as box:
        hidden = client.party.run(0, 1, input_ids=ids, attention_mask=mask).hidden
    assert not torch.allclose(box["embeds"], clean)  # NoPeek saw what dχ released, not the clean embeddings
    terms = made.penalty(box, hidden, mask, 1.0)
    assert set(terms) == {"nopeek"} and made.figures({"nopeek": float(terms["nopeek"].detach())})["nopeek_dcor"] > 0
    with made.bottom():  # an evaluation draw advances dχ's count, which the checkpoint keeps
        client.party.run(0, 1, input_ids=ids, attention_mask=mask)
    state = made.state_dict()
    assert list(state) == ["dx.count"] and int(state["dx.count"][0]) == 1
    other = ClientDefenses.build(cfg, Placement(client.party, 5))
    other.load_state_dict(state)
    assert int(other.find(Dx).noise.count) == 1
    other.close()


def test_a_defense_that_does_not_fit_the_run_is_refused_by_its_own_check():
    with pytest.raises(ConfigError, match="label-noise needs cuts: \\[a, b\\] or auto"):
        load_config(None, small("cuts=[2]", "defense=[{name: label-noise}]"))
    with pytest.raises(ConfigError, match="dp_sgd protects the client's adapters"):
        load_config(None, small("mode=centralized", "dp_sgd={noise_multiplier: 1.0}"))
    load_config(None, small("defense=[{name: label-noise}]"))  # the twin: a U-shape takes it
