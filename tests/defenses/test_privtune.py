"""PrivTune: the noise mean moves toward the tokens exactly n hops away in the public kNN graph, the noise is dχ's
(radius Gamma(d, s/ε)) scaled down for important tokens, and that is exactly what the server sees at cut 0."""

from __future__ import annotations

import pytest
import torch

from splittune.config import load_config
from splittune.defenses.privtune import PrivTune, PrivTuneDefense
from splittune.defenses.vocabulary import Neighbours
from splittune.privacy.knowledge import PublicKnowledge
from splittune.run import train
from splittune.taps.tap import Tap, Truth
from configs import SMALLEST
from short_text import short_run


def test_n_hop_neighbours_are_indirect():
    """On a line of points the k=2 graph links each point to the two beside it: 2 hops are the points 2 away."""
    line = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 0.0]])
    graph = Neighbours(line, 2)
    assert sorted(graph.hops(5, 1).tolist()) == [4, 6]
    assert sorted(graph.hops(5, 2).tolist()) == [3, 7]  # the direct neighbours are left out
    assert sorted(graph.hops(0, 2).tolist()) == [3]  # an end point's two nearest are both on one side: 1 and 2
    assert int(graph.known.sum()) < 10  # rows are built only for the tokens walked through


def test_the_noise_is_scaled_by_importance_and_the_guarantee_says_whose():
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    settings = PrivTuneDefense(name="privtune", epsilon=4.0, shift=0.0, importance=0.5)
    d = PrivTune(settings, table, secret=1)
    ids = torch.tensor([[0] * 400 + [49] * 400])
    d.inputs(ids)
    z = d.embeddings(table[ids], 1, 0) - table[ids]
    radius = z.norm(dim=-1)[0]
    assert float(radius[:400].mean()) == pytest.approx(16 / 4.0, rel=0.05)  # token 0: full dχ noise, E‖z‖ = d/ε
    assert float(radius[400:].mean()) == pytest.approx(0.5 * 16 / 4.0, rel=0.05)  # the last (rarest) id: half
    usage = type("U", (), {"releases": 3, "eval_passes": 1})()
    g = PrivTune.guarantee({**settings.model_dump()}, usage)
    assert g.epsilon == 8.0 and g.figures["epsilon_most_noised"] == 4.0 and g.figures["epsilon_per_token_all_releases"] == 32.0
    same = PrivTune(settings.model_copy(update={"importance": 0.0}), table, secret=1)
    same.inputs(ids)
    flat = (same.embeddings(table[ids], 1, 0) - table[ids]).norm(dim=-1)[0]
    assert float(flat[400:].mean()) == pytest.approx(float(flat[:400].mean()), rel=0.1)  # the twin: one scale for all


def test_the_server_sees_the_shifted_embedding_plus_dx_noise(tmp_path):
    """Cut 0, so what crosses is the released embedding: minus the expected mean, each row's noise has the dχ radius
    (E‖z‖ = s·d/ε), and with the shift removed the residual is no longer that noise (the twin)."""
    out = tmp_path / "run"
    run = short_run(tmp_path, "cuts=[0]", "defense=[{name: privtune, epsilon: 2000, shift: 0.8, importance: 0.5}]")
    summary = train(load_config(None, run), out, record_tap=("server",))
    tap, truth = Tap.open(out / "tap" / "server"), Truth.open(out / "tap" / "truth")
    rec = next(r for r in tap.records("activations", "up") if r.meta.get("train") and r.step == 1)
    ids = truth.batch(rec.session, rec.step, rec.micro)["input_ids"]
    table = PublicKnowledge(SMALLEST).embeddings()
    d = PrivTune(PrivTuneDefense(name="privtune", epsilon=2000, shift=0.8, importance=0.5), table, secret=0)
    mean = 0.2 * table[ids] + 0.8 * d.centroids(ids)
    scale = d.scale(ids)
    radius = (rec.tensor("hidden") - mean).norm(dim=-1) / scale
    assert float(radius.mean()) == pytest.approx(32 / 2000, rel=0.1)  # Gamma(32, 1/2000): mean d/ε
    unshifted = (rec.tensor("hidden") - table[ids]).norm(dim=-1) / scale
    assert float(unshifted.mean()) > 3 * float(radius.mean())  # the twin: the mean did move toward the neighbours
    assert summary["privtune_epsilon"] == 4000.0  # ε / (1 − importance): the least-noised tokens'
