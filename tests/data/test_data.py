"""Tasks: packed causal-LM blocks, instruction examples with response-only loss, splits, caps, choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from splittune.config import DataConfig
from splittune.data import (
    IGNORE_INDEX,
    DataError,
    InstructionFormat,
    build_task,
    build_task_from_records,
    choice_accuracy,
    pack,
    resolve_kind,
)
from splittune.data import tokens as tokens_mod
from splittune.data.instruction import build_examples

EOS, PAD, IM_START, IM_END, BOS = 256, 257, 258, 259, 260


def cfg(source="memory", **kw) -> DataConfig:
    return DataConfig(source=source, **kw)


def ids(text: str) -> list[int]:
    return list(text.encode())


def examples_of(tokenizer, records, seq_len):
    return build_examples(InstructionFormat(tokenizer).encode(records), seq_len)


def letters_docs(n=10, size=5):
    return [{"text": chr(ord("a") + i) * size} for i in range(n)]


def labelled(n=20):
    return [
        {"text": f"film {i} was {'good' if i % 2 else 'bad'}", "label": "positive" if i % 2 else "negative"}
        for i in range(n)
    ]


# --- causal LM ----------------------------------------------------------------------------------


def test_pack_exact_blocks():
    blocks, left = pack([ids("abc"), ids("de")], seq_len=3, eos_id=EOS)
    assert [b["input_ids"].tolist() for b in blocks] == [ids("abc"), [EOS, *ids("de")]]
    assert left == 1  # the final EOS does not fill a block
    assert all(b["input_ids"].dtype == torch.long and torch.equal(b["labels"], b["input_ids"]) for b in blocks)
    blocks, left = pack([ids("abc"), ids("de")], seq_len=4, eos_id=EOS, prefix=[BOS])
    assert [b["input_ids"].tolist() for b in blocks] == [[BOS, *ids("abc")], [EOS, BOS, *ids("de")]]
    assert left == 1


def test_causal_lm_packs_train_documents_exactly_and_holds_out_whole_documents(byte_tok):
    task = build_task_from_records(
        letters_docs(), cfg(eval_fraction=0.2, max_eval_examples=None), byte_tok, seq_len=4, seed=0
    )
    assert task.kind == "causal_lm" and task.choices is None
    train_stream = torch.cat([e["input_ids"] for e in task.train]).tolist()
    eval_stream = torch.cat([e["input_ids"] for e in task.eval]).tolist()
    train_letters = [chr(t) for t in dict.fromkeys(train_stream) if t != EOS]
    eval_letters = [chr(t) for t in dict.fromkeys(eval_stream) if t != EOS]
    assert len(eval_letters) == 2 and not set(train_letters) & set(eval_letters)
    assert sorted(train_letters + eval_letters) == list("abcdefghij")
    expected = [t for c in train_letters for t in [*ids(c * 5), EOS]]  # documents in source order, EOS after each
    assert train_letters == sorted(train_letters)
    assert train_stream == expected  # 8 documents x 6 tokens = 12 full blocks, nothing dropped
    assert len(task.train) == 12 and all(len(e["input_ids"]) == 4 for e in task.train + task.eval)
    assert task.stats | {} == task.stats and task.stats["train_documents"] == 8 and task.stats["eval_documents"] == 2
    assert task.stats["tokens"] == 4 * (len(task.train) + len(task.eval))


def test_split_is_deterministic_and_depends_on_the_seed(byte_tok):
    def eval_letters(seed):
        task = build_task_from_records(letters_docs(), cfg(eval_fraction=0.2), byte_tok, seq_len=4, seed=seed)
        return frozenset(chr(t) for e in task.eval for t in e["input_ids"].tolist() if t != EOS)

    assert eval_letters(0) == eval_letters(0)
    assert len({eval_letters(seed) for seed in range(5)}) > 1


def test_at_least_one_document_is_held_out(byte_tok):
    task = build_task_from_records(letters_docs(5, 8), cfg(eval_fraction=0.01), byte_tok, seq_len=4, seed=0)
    assert task.stats["eval_documents"] == 1 and task.stats["train_documents"] == 4
    with pytest.raises(DataError, match="at least 2 are needed"):
        build_task_from_records(letters_docs(1), cfg(), byte_tok, seq_len=4, seed=0)


def test_too_little_held_out_text_is_an_error(byte_tok):
    with pytest.raises(DataError, match=r"held-out documents hold \d+ tokens, fewer than one block of seq_len=64"):
        build_task_from_records(letters_docs(10, 20), cfg(eval_fraction=0.1), byte_tok, seq_len=64, seed=0)


def test_caps_take_an_ordered_seeded_subset(byte_tok):
    full = build_task_from_records(
        letters_docs(10, 11), cfg(eval_fraction=0.2, max_eval_examples=None), byte_tok, seq_len=4, seed=0
    )
    capped = build_task_from_records(
        letters_docs(10, 11),
        cfg(eval_fraction=0.2, max_train_examples=3, max_eval_examples=1),
        byte_tok,
        seq_len=4,
        seed=0,
    )
    assert len(capped.train) == 3 and len(capped.eval) == 1
    rows = [e["input_ids"].tolist() for e in full.train]
    positions = [rows.index(e["input_ids"].tolist()) for e in capped.train]
    assert positions == sorted(positions)
    assert capped.stats["train_examples"] == 3 and capped.stats["eval_examples"] == 1


def test_bos_tokenizers_get_bos_before_each_document(make_tok):
    tok = make_tok(bos=True)
    task = build_task_from_records(letters_docs(4, 3), cfg(eval_fraction=0.25), tok, seq_len=5, seed=0)
    stream = torch.cat([e["input_ids"] for e in task.train]).tolist()
    assert stream[:5] == [BOS, *ids(chr(stream[1]) * 3), EOS]


def test_causal_lm_needs_an_eos(make_tok):
    tok = make_tok()
    tok.eos_token = None
    with pytest.raises(DataError, match="no eos_token"):
        build_task_from_records(letters_docs(), cfg(), tok, seq_len=4, seed=0)


def test_builtin_tokens_are_cached_by_tokenizer_and_text(byte_tok, make_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)
    texts = ["To be, or not to be", "that is the question"]
    first = tokens_mod.encode_cached(byte_tok, texts, "demo")
    assert [x.tolist() for x in first] == [ids(t) for t in texts]
    (path,) = (tmp_path / "tokens").glob("demo-*.safetensors")

    def no_encode(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokens_mod, "encode", no_encode)
    assert [x.tolist() for x in tokens_mod.encode_cached(byte_tok, texts, "demo")] == [ids(t) for t in texts]
    monkeypatch.undo()
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)
    path.write_bytes(b"garbage")  # a damaged cache is rebuilt
    assert [x.tolist() for x in tokens_mod.encode_cached(byte_tok, texts, "demo")] == [ids(t) for t in texts]
    save_file({"ids": np.zeros(3, dtype=np.int32), "lengths": np.array([2, 2])}, path)  # inconsistent sizes
    assert [x.tolist() for x in tokens_mod.encode_cached(byte_tok, texts, "demo")] == [ids(t) for t in texts]
    tokens_mod.encode_cached(make_tok(merges=(("Ġ", "b"),)), texts, "demo")  # another tokenizer, another file
    assert len(list((tmp_path / "tokens").glob("demo-*.safetensors"))) == 2


def test_builtin_shakespeare_task(byte_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)  # keep test token caches out of the user's
    task = build_task(DataConfig(source="builtin:shakespeare", max_documents=3, max_eval_examples=8), byte_tok, 64, 0)
    assert task.kind == "causal_lm" and task.stats["documents"] == 3 and task.stats["eval_documents"] == 1
    assert len(task.eval) == 8 and len(task.train) > 1000
    assert all(e["input_ids"].shape == (64,) for e in task.train[:10])


# --- instruction --------------------------------------------------------------------------------


def test_plain_instruction_masks_the_prompt(byte_tok):
    records = [{"prompt": "Q: 2+2?\nA:", "response": " 4"}, {"prompt": "Say hi.", "response": "\nhi there"}]
    examples, truncated = examples_of(byte_tok, records, seq_len=64)
    assert truncated == 0
    for record, example in zip(records, examples, strict=True):
        n = len(record["prompt"])
        assert example["input_ids"].tolist() == ids(record["prompt"] + record["response"]) + [EOS]
        assert example["labels"][:n].tolist() == [IGNORE_INDEX] * n
        assert torch.equal(example["labels"][n:], example["input_ids"][n:])


def test_bos_is_in_the_prompt_part(make_tok):
    (example,), _ = examples_of(make_tok(bos=True), [{"prompt": "Q:", "response": " A"}], 16)
    assert example["input_ids"].tolist() == [BOS, *ids("Q: A"), EOS]
    assert example["labels"].tolist() == [IGNORE_INDEX] * 3 + [*ids(" A"), EOS]


def test_chat_turns_last_trains_only_the_last_assistant_turn(chat_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4, of course"},
    ]
    (example,), _ = build_examples(InstructionFormat(chat_tok, all_turns=False).encode([{"messages": messages}]), 256)
    full = chat_tok.apply_chat_template(messages, tokenize=False)
    prompt = chat_tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert chat_tok.decode(example["input_ids"]) == full
    n = len(chat_tok(prompt)["input_ids"])
    assert chat_tok.decode(example["input_ids"][:n]).endswith("<|im_start|>assistant\n")
    assert (example["labels"][:n] == IGNORE_INDEX).all()
    assert torch.equal(example["labels"][n:], example["input_ids"][n:])
    assert chat_tok.decode(example["input_ids"][n:]) == "4, of course<|im_end|>\n"


def test_pairs_use_the_chat_template_when_there_is_one(chat_tok):
    (example,), _ = examples_of(chat_tok, [{"prompt": "Name a colour", "response": "Blue"}], 128)
    assert (
        chat_tok.decode(example["input_ids"])
        == "<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>\n"
    )
    assert chat_tok.decode(example["input_ids"][example["labels"] != IGNORE_INDEX]) == "Blue<|im_end|>\n"


def test_chat_records_without_a_template_get_a_plain_transcript(byte_tok):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (example,), _ = examples_of(byte_tok, [record], 64)
    assert example["input_ids"].tolist() == ids("User: hi\nAssistant: yo") + [EOS]
    assert byte_tok.decode(example["input_ids"][example["labels"] != IGNORE_INDEX]) == " yo<|endoftext|>"


def test_prompt_that_is_not_a_token_prefix_is_refused(make_tok):
    tok = make_tok(merges=(("Ġ", "x"),))  # " x" is one token: "Q: " + "x" tokenizes differently from "Q: "
    records = [{"prompt": "ok:", "response": " y"}, {"prompt": "Q: ", "response": "x"}]
    with pytest.raises(DataError, match=r"record 1: the prompt's tokens are not a prefix"):
        examples_of(tok, records, 64)
    examples_of(tok, [{"prompt": "Q:", "response": " x"}], 64)  # the fix the error suggests


def test_truncation_keeps_the_prompt_and_drops_prompts_that_fill_the_window(byte_tok):
    records = [{"prompt": "abc", "response": "defghijkl"}, {"prompt": "abcdefgh", "response": "i"}]
    examples, truncated = examples_of(byte_tok, records, seq_len=8)
    assert truncated == 1 and examples[1] is None
    assert examples[0]["input_ids"].tolist() == ids("abcdefgh")
    assert examples[0]["labels"].tolist() == [IGNORE_INDEX] * 3 + ids("defgh")
    records = [
        {"prompt": f"p{i}", "response": "r" * (i % 3)} if i % 3 else {"prompt": "x" * 20, "response": "r"}
        for i in range(30)
    ]
    records = [r if r["response"] else {**r, "response": "ok"} for r in records]
    task = build_task_from_records(records, cfg(eval_fraction=0.2), byte_tok, seq_len=8, seed=0)
    assert task.stats["dropped"] == 10 and len(task.train) + len(task.eval) == 20
    assert all(len(e["input_ids"]) <= 8 for e in task.train + task.eval)


def test_instruction_split_is_by_example_and_deterministic(byte_tok):
    records = [{"prompt": f"Q{i}:", "response": f" answer {i}"} for i in range(40)]
    a = build_task_from_records(records, cfg(eval_fraction=0.1), byte_tok, 64, seed=0)
    b = build_task_from_records(records, cfg(eval_fraction=0.1), byte_tok, 64, seed=0)
    c = build_task_from_records(records, cfg(eval_fraction=0.1), byte_tok, 64, seed=1)
    assert a.kind == "instruction" and len(a.eval) == 4 and len(a.train) == 36
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.train + a.eval, b.train + b.eval, strict=True)
    )
    as_text = lambda task: {byte_tok.decode(e["input_ids"]) for e in task.eval}  # noqa: E731
    assert not as_text(a) & {byte_tok.decode(e["input_ids"]) for e in a.train}
    assert as_text(a) != as_text(c)


# --- labelled data: choices ---------------------------------------------------------------------


def test_sentiment_choices_with_a_chat_template(chat_tok):
    records = labelled(40)
    task = build_task_from_records(records, cfg("builtin:sentiment", eval_fraction=0.25), chat_tok, 128, seed=0)
    choices = task.choices
    assert task.kind == "instruction" and choices is not None
    assert choices.label_words == ("positive", "negative")
    assert choices.candidates.tolist() == [ord("p"), ord("n")]  # first token of each word after "assistant\n"
    assert len(choices) == len(task.eval) == 10
    for prompt, target, example in zip(choices.prompts, choices.targets.tolist(), task.eval, strict=True):
        n = len(prompt)
        assert torch.equal(example["input_ids"][:n], prompt)
        text = chat_tok.decode(prompt)
        assert text.startswith("<|im_start|>user\nReview: film ") and text.endswith(
            "Sentiment:<|im_end|>\n<|im_start|>assistant\n"
        )
        word = choices.label_words[target]
        assert chat_tok.decode(example["input_ids"][n:]) == f"{word}<|im_end|>\n"
        assert ("good" in text) == (word == "positive")


def test_plain_label_words_must_differ_in_their_first_token(byte_tok, make_tok):
    with pytest.raises(DataError, match="begin with the same token"):  # " positive", " negative": both start with " "
        build_task_from_records(labelled(), cfg("builtin:sentiment"), byte_tok, 128, seed=0)
    tok = make_tok(merges=(("Ġ", "p"), ("Ġ", "n")))
    task = build_task_from_records(labelled(), cfg("builtin:sentiment"), tok, 128, seed=0)
    assert task.choices.candidates.tolist() == [tok.convert_tokens_to_ids("Ġp"), tok.convert_tokens_to_ids("Ġn")]
    assert tok.decode(task.choices.prompts[0]).startswith("Review: film") and tok.decode(
        task.choices.prompts[0]
    ).endswith("\nSentiment:")


def test_other_labelled_sources_use_sorted_label_words(chat_tok):
    records = [{"text": f"item {i}", "label": ["spam", "ham", "eggs"][i % 3]} for i in range(30)]
    task = build_task_from_records(records, cfg(eval_fraction=0.2), chat_tok, 128, seed=0)
    assert task.choices.label_words == ("eggs", "ham", "spam")
    assert chat_tok.decode(task.choices.prompts[0]).startswith("<|im_start|>user\nText: item")


def test_choice_accuracy_and_batches(chat_tok):
    task = build_task_from_records(labelled(40), cfg("builtin:sentiment", eval_fraction=0.25), chat_tok, 128, seed=0)
    choices = task.choices
    n, vocab = len(choices), len(chat_tok)
    right = torch.zeros(n, vocab)
    right[torch.arange(n), choices.candidates[choices.targets]] = 1.0
    assert choice_accuracy(right, choices) == 1.0
    wrong = torch.zeros(n, vocab)
    wrong[torch.arange(n), choices.candidates[1 - choices.targets]] = 1.0
    assert choice_accuracy(wrong, choices) == 0.0
    half = torch.where(torch.arange(n)[:, None] < n // 2, right, wrong)
    assert choice_accuracy(half, choices) == 0.5
    with pytest.raises(ValueError, match="expected last_logits of shape"):
        choice_accuracy(torch.zeros(n + 1, vocab), choices)
    batch = choices.batch(2, 6, pad_id=PAD)
    assert batch["input_ids"].shape[0] == 4 and torch.equal(batch["targets"], choices.targets[2:6])
    for row, prompt in enumerate(choices.prompts[2:6]):
        last = int(batch["last_index"][row])
        assert last == len(prompt) - 1 and batch["input_ids"][row, last] == prompt[-1]
        assert batch["attention_mask"][row].sum() == len(prompt) and (batch["input_ids"][row, last + 1 :] == PAD).all()


def test_builtin_instruction_encodings_are_cached(chat_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)
    encoded = []
    original = InstructionFormat.encode
    monkeypatch.setattr(
        InstructionFormat, "encode", lambda self, records: encoded.append(len(records)) or original(self, records)
    )
    config = cfg("builtin:sentiment", eval_fraction=0.25)
    first = build_task_from_records(labelled(40), config, chat_tok, 128, seed=0)
    assert encoded == [40, 2]  # every record, then the two label-word probes
    assert len(list((tmp_path / "tokens").glob("sentiment-*.safetensors"))) == 1
    second = build_task_from_records(labelled(40), config, chat_tok, 128, seed=0)
    assert encoded == [40, 2, 2]  # the records' tokens came from the cache
    for a, b in zip(first.train + first.eval, second.train + second.eval, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    build_task_from_records(labelled(40), cfg("memory", eval_fraction=0.25), chat_tok, 128, seed=0)
    assert len(list((tmp_path / "tokens").iterdir())) == 1  # private (non-builtin) data is never cached


def test_builtin_sentiment_task(chat_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)
    task = build_task(DataConfig(source="builtin:sentiment", max_documents=300), chat_tok, 256, 0)
    assert task.kind == "instruction" and task.stats["documents"] == 300
    assert task.stats["eval_documents"] == 15 and len(task.choices) == len(task.eval) == task.stats["eval_examples"]
    assert task.stats["train_examples"] + task.stats["eval_examples"] + task.stats["dropped"] == 300
    assert set(task.choices.targets.tolist()) == {0, 1}


# --- choosing the task --------------------------------------------------------------------------


def test_task_auto_and_explicit():
    texts, pairs = [{"text": "a"}], [{"prompt": "p", "response": "r"}]
    assert resolve_kind("auto", texts) == "causal_lm"
    assert resolve_kind("auto", pairs) == resolve_kind("auto", labelled()) == "instruction"
    assert resolve_kind("causal_lm", labelled()) == "causal_lm"  # the texts alone, as raw text
    with pytest.raises(DataError, match="mixes raw text"):
        resolve_kind("auto", texts + pairs)
    with pytest.raises(DataError, match="use task: causal_lm"):
        resolve_kind("instruction", texts)
    with pytest.raises(DataError, match="use task: instruction"):
        resolve_kind("causal_lm", pairs)


CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}


def test_a_multi_turn_chat_trains_every_assistant_turn(chat_tok):
    fmt = InstructionFormat(chat_tok)
    (example,), _ = build_examples(fmt.encode([CHAT]), 256)
    trained = example["labels"] != IGNORE_INDEX
    assert chat_tok.decode(example["input_ids"][trained]) == "4<|im_end|>\n6<|im_end|>\n"  # both turns, nothing the user said
    assert torch.equal(example["labels"][trained], example["input_ids"][trained])
    (last,), _ = build_examples(InstructionFormat(chat_tok, all_turns=False).encode([CHAT]), 256)
    assert chat_tok.decode(last["input_ids"][last["labels"] != IGNORE_INDEX]) == "6<|im_end|>\n"  # the twin: last only


def test_a_multi_turn_chat_without_a_template_trains_every_assistant_turn(byte_tok):
    (example,), _ = build_examples(InstructionFormat(byte_tok).encode([CHAT]), 256)
    assert example["input_ids"].tolist() == ids("User: 2+2?\nAssistant: 4\nUser: and 3+3?\nAssistant: 6") + [EOS]
    labelled = example["labels"] != IGNORE_INDEX
    assert byte_tok.decode(example["input_ids"][labelled]) == " 4 6<|endoftext|>"
