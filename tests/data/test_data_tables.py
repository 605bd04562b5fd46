"""Sources the datasets package reads, with the real package: Parquet, Arrow, save_to_disk folders (Dataset and
DatasetDict), folders of data files, and hf: pointing at local files."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from splittune.config import DataConfig  # noqa: E402
from splittune.data import DataError, load_records  # noqa: E402

ALPACA = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe")]
EXPECTED = [{"prompt": f"Say {w}.", "response": w} for w in ("yes", "no", "maybe")]


def load(source, **kw):
    return load_records(DataConfig(source=str(source), **kw))


@pytest.fixture(scope="module")
def alpaca():
    return datasets.Dataset.from_list(ALPACA)


def prompts(records):
    return [{"prompt": r["prompt"].strip(), "response": r["response"].strip()} for r in records]


def test_parquet_and_arrow_files_load_with_their_shape_detected(alpaca, tmp_path):
    alpaca.to_parquet(str(tmp_path / "alpaca.parquet"))
    assert prompts(load(tmp_path / "alpaca.parquet")) == EXPECTED
    assert prompts(load(f"hf:{tmp_path / 'alpaca.parquet'}")) == EXPECTED  # hf: with a local file
    alpaca.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert prompts(load(arrow)) == EXPECTED
    assert prompts(load(tmp_path / "alpaca.parquet", max_documents=2)) == EXPECTED[:2]


def test_save_to_disk_folders_load_a_dataset_or_a_dicts_split(alpaca, tmp_path):
    alpaca.save_to_disk(str(tmp_path / "one"))
    assert prompts(load(tmp_path / "one")) == EXPECTED
    datasets.DatasetDict({"train": alpaca, "test": alpaca.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert prompts(load(tmp_path / "dict", hf_split="test")) == EXPECTED[2:]
    with pytest.raises(DataError, match=r"has splits train, test; data.hf_split is 'validation'"):
        load(tmp_path / "dict", hf_split="validation")


def test_a_folder_of_jsonl_files_and_field_mapping(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    rows = [{"q": "Capital of France?", "a": "Paris"}, {"q": "2+2?", "a": "4"}]
    (folder / "part-0.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load(folder, fields={"prompt": "q", "response": "a"})
    assert prompts(records) == [{"prompt": "Capital of France?", "response": "Paris"}, {"prompt": "2+2?", "response": "4"}]


def test_bad_rows_name_the_row_and_can_be_skipped(tmp_path):
    datasets.Dataset.from_list([{"text": "fine"}, {"text": "  "}, {"text": "also fine"}]).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError, match=r"t.parquet: row 1: field 'text' is empty.*skip_bad_lines"):
        load(tmp_path / "t.parquet")
    assert [r["text"] for r in load(tmp_path / "t.parquet", skip_bad_lines=True)] == ["fine", "also fine"]


def test_a_missing_table_file_and_a_corrupt_one_get_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data file .*missing.parquet' does not exist"):
        load(tmp_path / "missing.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"could not load dataset .*bad.parquet"):
        load(tmp_path / "bad.parquet")
