"""generation-inversion (PIDI): from what the server saw while a client generated through the split, the prompt and
the response are both read back, each scored on its own; the response's last token (which never crosses upward)
comes from the tail side alone; noise in place of the activations gives nothing; bad truth files are refused."""

from __future__ import annotations

import json

import pytest
import torch

from splittune.config import load_config
from splittune.generation import SplitModel
from splittune.privacy.attacks.base import run_attack
from splittune.privacy.attacks.generation import GenerationInversion, sequences
from splittune.privacy.job import attack_run
from splittune.privacy.judge import JudgeError
from splittune.privacy.judge_generation import read_generations, score_generation
from splittune.privacy.knowledge import PublicKnowledge
from splittune.taps.recording import Recording
from splittune.taps.tap import Tap, TapError, TapWriter
from configs import SMALL, small

PROMPTS = ["To be, or not to be: that is", "Now is the winter of our discontent"]
NEW = 6
FAST = {"iterations": 0, "inversion": {"model": "linear", "epochs": 0, "aux_rows": 48, "random_rows": 64}}  # least squares


def _generate(folder, cuts):
    """Two prompts generated (greedy) through a split of the small model, the server tapped: its tap folder and the
    client's own record (what `generate --json` prints)."""
    cfg = load_config(None, small(f"cuts={cuts}"))
    recording = Recording(folder, ("server",), 1 << 30, truth=False)
    with SplitModel(cfg, None, serve_through=recording.attach) as split:
        done = split.complete(PROMPTS, max_new_tokens=NEW, raw=True)
    recording.close()
    lines = folder / "answers.jsonl"
    lines.write_text("".join(json.dumps(c.to_json()) + "\n" for c in done))
    return folder, lines


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return {cuts: _generate(tmp_path_factory.mktemp(f"gen{cuts[1]}"), cuts) for cuts in ("[1,3]", "[1]")}


@pytest.fixture(scope="module")
def public():
    return PublicKnowledge(SMALL, aux="builtin:sentiment")


def _scores(folder, lines, public, **options):
    recovery = run_attack(GenerationInversion({**FAST, **options}), Tap.open(folder / "server"), public)
    return score_generation(recovery, read_generations(lines, public.tokenizer), public.tokenizer), recovery


@pytest.mark.parametrize("cuts", ["[1,3]", "[1]"])
def test_the_server_reads_back_the_prompt_and_the_response(generated, public, cuts):
    folder, lines = generated[cuts]
    found = sequences(Tap.open(folder / "server"))
    assert [len(s.ups) for s in found] == [NEW, NEW]  # the prompt's prefill, then every new token but the last
    result, recovery = _scores(folder, lines, public)
    assert result["prompt_positions"] == sum(len(p.encode()) for p in PROMPTS)  # byte-level tokens
    assert result["response_positions"] == 2 * NEW
    assert result["prompt_token_accuracy"] >= 0.9 and result["prompt_rouge_l_f1"] >= 0.8, result
    assert result["response_token_accuracy"] >= 0.9, result
    assert recovery.info["sequences"][0]["tail"] is True


def test_the_last_token_comes_from_the_tail_side_alone(generated, public):
    """The twin of the test above: without the tail side the response's last token is never claimed."""
    folder, lines = generated["[1,3]"]
    result, recovery = _scores(folder, lines, public, prior_weight=0)
    assert (recovery.items[0].tokens[:, -1] == -1).all()
    assert result["response_token_accuracy"] <= (NEW - 1) / NEW


def test_noise_in_place_of_the_activations_gives_nothing(generated, public, tmp_path):
    folder, lines = generated["[1,3]"]
    tap = Tap.open(folder / "server")
    writer = TapWriter(tmp_path / "server", "server")
    writer.sessions = {s: dict(e) for s, e in tap.sessions.items()}
    g = torch.Generator().manual_seed(0)
    for r in tap.records():
        tensors = r.tensors()
        if r.kind == "generate":
            tensors = {k: torch.randn(v.shape, generator=g) * v.std() if v.is_floating_point() else v for k, v in tensors.items()}
        writer.add(r.direction, r.kind, r.session, r.step, r.micro, tensors, r.meta, r.frame_bytes)
    writer.close()
    result, _ = _scores(tmp_path, lines, public)
    assert result["prompt_token_accuracy"] < 0.1 and result["response_token_accuracy"] < 0.2, result


def test_the_patched_inversion_runs_and_keeps_what_it_reads(generated, public):
    folder, lines = generated["[1]"]
    result, recovery = _scores(folder, lines, public, iterations=3, patch=8)
    assert all(len(s["patch_losses"]) >= 2 for s in recovery.info["sequences"])
    assert result["prompt_token_accuracy"] >= 0.9


def test_the_command_scores_with_the_clients_record_and_refuses_what_does_not_fit(generated, public, tmp_path):
    folder, lines = generated["[1]"]
    options = FAST
    result = attack_run(folder, "generation-inversion", aux="builtin:sentiment", out=tmp_path / "a", options=options,
                        model=SMALL, truth=lines)
    assert result["response_token_accuracy"] >= 0.8 and (tmp_path / "a" / "attack.html").exists()
    unscored = attack_run(folder, "generation-inversion", aux="builtin:sentiment", out=tmp_path / "b", options=options, model=SMALL)
    assert "--truth" in unscored["scored"] and unscored["examples"]
    with pytest.raises(TapError, match="--truth scores a generation attack"):
        attack_run(folder, "inversion", model=SMALL, truth=lines)
    one = tmp_path / "one.jsonl"
    one.write_text(lines.read_text().splitlines()[0] + "\n")
    with pytest.raises(JudgeError, match="2 generated rows but the truth has 1"):
        score_generation(run_attack(GenerationInversion(options), Tap.open(folder / "server"), public),
                         read_generations(one, public.tokenizer), public.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(JudgeError, match="line 1: needs prompt, token_ids and prompt_tokens"):
        read_generations(bad, public.tokenizer)
