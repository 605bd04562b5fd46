"""Data the way people bring it: Alpaca JSON arrays, ShareGPT and question/answer rows, their own field names,
one sentence per line, other encodings, long cells, bad lines skipped and counted. Each case reproduces what a new
user met (issue 25) and its twin shows the check can fail."""

from __future__ import annotations

import json
import warnings

import pytest

from splittune.config import ConfigError, DataConfig, SplittuneWarning, load_config
from splittune.data import DataError, load_records


def load(source, **kw):
    return load_records(DataConfig(source=str(source), **kw))


ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]


def test_an_alpaca_json_array_is_instruction_pairs(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    assert load(path) == [{"prompt": "Name a colour.", "response": "Blue."},
                          {"prompt": "Translate to French.\n\ncat", "response": "chat"}]
    (tmp_path / "held.json").write_text(json.dumps({"data": ALPACA}))  # an object holding the array
    assert len(load(tmp_path / "held.json")) == 2
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ALPACA))  # JSON Lines named .json
    assert load(tmp_path / "lines.json") == load(path)
    (tmp_path / "two.json").write_text(json.dumps({"a": ALPACA, "b": ALPACA}))
    with pytest.raises(DataError, match="an object with lists 'a', 'b'"):  # the twin: which list is meant is unclear
        load(tmp_path / "two.json")


def test_a_bad_row_of_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([*ALPACA, {"instruction": "x"}], indent=2))
    with pytest.raises(DataError, match=r"alpaca\.json: line 12: no usable fields \(found 'instruction'\)"):
        load(path)


def test_sharegpt_alpaca_and_question_answer_rows_are_detected(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"instruction": "Add.", "input": "1+1", "output": "2"},
        {"question": "Capital of France?", "answer": "Paris"},
        {"prompt": "Say hi", "response": "hi", "system": "You are kind."},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    chat, alpaca, qa, system = load(path)
    assert chat == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}
    assert alpaca == {"prompt": "Add.\n\n1+1", "response": "2"} and qa == {"prompt": "Capital of France?", "response": "Paris"}
    assert system["messages"][0] == {"role": "system", "content": "You are kind."}
    with pytest.raises(DataError, match="data.format sharegpt needs a 'conversations' field"):
        load(path, format="sharegpt")  # the twin: a named layout is held to


def test_your_own_field_names_map_onto_ours(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "2+2?", "a": "4", "sys": "Math tutor."}) + "\n")
    with pytest.raises(DataError, match=r"no usable fields \(found 'q', 'a', 'sys'\).*data\.fields"):
        load(path)  # the twin: unknown names are refused and the error says what to set
    assert load(path, fields={"prompt": "q", "response": "a", "system": "sys"}) == [{"messages": [
        {"role": "system", "content": "Math tutor."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    with pytest.raises(ConfigError, match="data.fields.*'text', 'label', 'prompt', 'response', 'system' or 'messages'"):
        load_config(None, ["data.fields={question: q}"])
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("q,a\nWho?,Me\n")
    assert load(csv_path, fields={"prompt": "q", "response": "a"}) == [{"prompt": "Who?", "response": "Me"}]


def test_one_sentence_per_line_says_how_to_split_it(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"Sentence number {i} is here.\n" for i in range(400)))
    with pytest.warns(SplittuneWarning, match="data.document_split: line"):
        assert len(load(path)) == 1
    docs = load(path, document_split="line")
    assert 15 <= len(docs) <= 25 and docs[0]["text"].startswith("Sentence number 0 is here.\nSentence number 1")
    assert load(path, document_split="file") == [{"text": path.read_text().strip()}]
    (tmp_path / "paras.txt").write_text("One.\n\nTwo.\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the twin: a file with blank lines draws no warning
        assert len(load(tmp_path / "paras.txt")) == 2


def test_another_encoding_is_declared_and_a_wrong_one_names_the_right_line(tmp_path):
    path = tmp_path / "win.csv"
    path.write_bytes("text,label\n".encode() + "".join(f"row {i} caf\u00e9,pos\n" for i in range(3)).encode("cp1252"))
    with pytest.raises(DataError, match=r"win\.csv: line 2 is not valid UTF-8 \(byte 0xe9"):
        load(path)
    assert load(path, encoding="cp1252")[0] == {"text": "row 0 caf\u00e9", "label": "pos"}
    jsonl = tmp_path / "late.jsonl"
    good = "".join(json.dumps({"text": f"line {i} " + "x" * 200}) + "\n" for i in range(40))
    jsonl.write_bytes(good.encode() + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"late\.jsonl: line 41 is not valid UTF-8"):
        load(jsonl)
    with pytest.raises(DataError, match="data.encoding 'klingon' is not an encoding"):
        load(jsonl, encoding="klingon")


def test_bad_lines_are_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "tab\there"}\n{"text": "also fine"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON \(invalid control character at column 14\) \(a tab or line "
                                        r"break inside a string must be written \\t or \\n\)"):
        load(path)
    with pytest.warns(SplittuneWarning, match=r"skipped 2 bad rows \(lines 2, 4\); the first: is not valid JSON"):
        assert load(path, skip_bad_lines=True) == [{"text": "fine"}, {"text": "also fine"}]


def test_a_long_csv_cell_is_one_document(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "word " * 40_000 + "\nshort\n")  # 200,000 characters, past csv's default limit
    records = load(path)
    assert len(records) == 2 and len(records[0]["text"]) == 200_000


def test_an_alpaca_file_trains_as_instructions(tmp_path):
    from splittune.run import train

    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in
                                ["red", "green", "blue", "cyan", "pink", "gray", "gold", "teal"] * 3]))
    summary = train(load_config(None, ["model=tiny:llama", f"data.source={path}", "train.steps=1", "train.seq_len=64",
                                       "train.batch_size=2", "train.eval_batches=1", "cuts=[1,3]", "train.warmup_steps=0"]), tmp_path / "run")
    assert summary["task"] == "instruction" and summary["train_examples"] >= 20


def test_rows_longer_than_seq_len_are_counted_or_refused(tmp_path):
    from splittune.data import build_task
    from splittune.models.zoo import resolve_model

    tokenizer = resolve_model("tiny:llama").tokenizer()
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Question {i}?", "response": "short" if i % 2 else "a long answer " * 20} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(SplittuneWarning, match=r"10 of 20 instruction rows are longer than train.seq_len=64 tokens .*the first "
                                             r"row 0\): they are cut at the end"):
        task = build_task(DataConfig(source=str(path)), tokenizer, 64, 0)
    assert task.stats["truncated"] == 10
    with pytest.raises(DataError, match="10 of 20 instruction rows .* set data.truncation: cut"):
        build_task(DataConfig(source=str(path), truncation="refuse"), tokenizer, 64, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the twin: rows that fit draw no warning
        build_task(DataConfig(source=str(path)), tokenizer, 512, 0)
