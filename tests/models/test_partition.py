"""Partitioning one dataset across clients, per-client tasks, and pooling them back together."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from splittune.config import DataConfig, RunConfig
from splittune.data import (
    DataError,
    build_client_tasks,
    build_task,
    build_task_from_records,
    merge_tasks,
    partition_records,
)
from splittune.data import tokens as tokens_mod


def labelled(n=200):
    return [{"text": f"film {i} was {'good' if i % 2 else 'bad'}", "label": "positive" if i % 2 else "negative"}
            for i in range(n)]


def docs(n=200):
    return [{"text": f"document number {i}"} for i in range(n)]


def purity(records, parts):
    """Share of records that belong to their client's majority label (0.5: balanced, 1: one label each)."""
    return sum(max(Counter(records[i]["label"] for i in p).values()) for p in parts) / len(records)


@pytest.fixture(autouse=True)
def private_token_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_mod, "cache_dir", lambda: tmp_path)  # keep test token caches out of the user's


def run_cfg(**kw) -> RunConfig:
    return RunConfig.model_validate(kw)


# --- partition_records --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
@pytest.mark.parametrize("records", [labelled(20), docs(7)], ids=["labelled", "docs"])
def test_one_client_is_the_identity(method, records):
    for seed in (0, 1):
        assert partition_records(records, 1, method, 0.01, seed) == [list(range(len(records)))]


@pytest.mark.parametrize("method, alpha", [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 0.5), ("dirichlet", 100.0)])
@pytest.mark.parametrize("records", [labelled(), docs()], ids=["labelled", "docs"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_parts_are_sorted_disjoint_covering_and_big_enough(method, alpha, records, n):
    parts = partition_records(records, n, method, alpha, seed=3)
    assert len(parts) == n
    assert all(p == sorted(p) and len(p) >= 2 for p in parts)
    assert sorted(i for p in parts for i in p) == list(range(len(records)))


def test_iid_sizes_differ_by_at_most_one_and_mix_the_source():
    parts = partition_records(docs(23), 4, "iid", 1.0, seed=0)
    assert sorted(len(p) for p in parts) == [5, 6, 6, 6]
    assert parts != [list(range(0, 6)), list(range(6, 12)), list(range(12, 18)), list(range(18, 23))]
    assert [len(p) for p in partition_records(docs(8), 4, "iid", 1.0, seed=0)] == [2, 2, 2, 2]


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_same_seed_same_parts_other_seed_other_parts(method):
    records = labelled()
    first = partition_records(records, 3, method, 0.5, seed=7)
    assert partition_records(records, 3, method, 0.5, seed=7) == first
    assert partition_records(records, 3, method, 0.5, seed=8) != first


def test_small_alpha_gives_each_client_mostly_one_label():
    records = labelled(200)
    skewed = [purity(records, partition_records(records, 4, "dirichlet", 0.05, seed)) for seed in range(10)]
    balanced = [purity(records, partition_records(records, 4, "dirichlet", 1000.0, seed)) for seed in range(10)]
    assert sum(skewed) / len(skewed) > 0.85 and sum(s > 0.9 for s in skewed) >= 6
    assert max(balanced) < 0.56
    parts = partition_records(records, 4, "dirichlet", 1000.0, seed=0)
    assert all(40 <= len(p) <= 60 for p in parts)  # near-equal sizes too
    iid = partition_records(records, 4, "iid", 1.0, seed=0)
    assert purity(records, iid) < 0.6


def test_small_alpha_skews_quantities_of_unlabelled_documents():
    records = docs(200)
    largest = [max(map(len, partition_records(records, 2, "dirichlet", 0.05, seed))) for seed in range(10)]
    assert sum(size > 180 for size in largest) >= 6  # one client holds nearly everything
    balanced = [max(map(len, partition_records(records, 2, "dirichlet", 1000.0, seed))) for seed in range(10)]
    assert max(balanced) < 110


def test_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(DataError, match=r"Dirichlet\(alpha=0\.01\) kept leaving a client with fewer than 2 documents"
                       r".*larger partition_alpha or fewer clients"):
        partition_records(docs(20), 10, "dirichlet", 0.01, seed=0)


@pytest.mark.parametrize(
    "args, message",
    [
        ((docs(7), 5, "iid", 1.0), r"clients=5 need at least 10 documents \(2 each: one is held out for evaluation\); "
                                   r"the data has 7"),
        ((docs(7), 4, "dirichlet", 1.0), r"clients=4 need at least 8 documents"),
        ((docs(7), 0, "iid", 1.0), r"clients=0"),
        ((docs(7), 2, "dirichlet", 0.0), r"partition_alpha=0.0 must be > 0"),
        ((docs(7), 2, "dirichlet", -1.0), r"partition_alpha=-1.0 must be > 0"),
        ((docs(7), 2, "by_label", 1.0), r"unknown partition method 'by_label'; allowed: iid, dirichlet"),
    ],
)
def test_partition_errors(args, message):
    with pytest.raises(DataError, match=message):
        partition_records(*args, seed=0)


# --- build_client_tasks -------------------------------------------------------------------------


def same_examples(a, b):
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_one_client_equals_the_single_client_task(byte_tok, partition):
    cfg = run_cfg(clients=1, partition=partition, seed=3, train={"seq_len": 64},
                  data={"source": "builtin:shakespeare", "max_documents": 3, "max_eval_examples": 8})
    (task,) = build_client_tasks(cfg, byte_tok)
    single = build_task(cfg.data, byte_tok, 64, 3)
    assert task.kind == single.kind and same_examples(task.train, single.train) and same_examples(task.eval, single.eval)
    assert task.stats == {**single.stats, "client": 0, "records": 3}


def test_one_client_labelled_equals_the_single_client_task(chat_tok):
    cfg = run_cfg(clients=1, train={"seq_len": 256}, data={"source": "builtin:sentiment", "max_documents": 60})
    (task,) = build_client_tasks(cfg, chat_tok)
    single = build_task(cfg.data, chat_tok, 256, 0)
    assert same_examples(task.train, single.train) and same_examples(task.eval, single.eval)
    assert torch.equal(task.choices.targets, single.choices.targets)
    assert task.choices.label_words == ("positive", "negative")
    labels = task.stats.pop("labels")
    assert sum(labels.values()) == single.stats["train_documents"] and set(labels) == {"positive", "negative"}
    assert task.stats == {**single.stats, "client": 0, "records": 60}


def test_shakespeare_across_three_clients(byte_tok):
    cfg = run_cfg(clients=3, train={"seq_len": 64},
                  data={"source": "builtin:shakespeare", "max_documents": 6, "max_eval_examples": 8})
    tasks = build_client_tasks(cfg, byte_tok)
    assert [t.stats["client"] for t in tasks] == [0, 1, 2]
    assert all(t.kind == "causal_lm" and t.stats["records"] == 2 and t.stats["eval_documents"] == 1 for t in tasks)
    assert all(len(t.eval) == 8 and len(t.train) > 100 for t in tasks)
    firsts = {tuple(t.train[0]["input_ids"].tolist()) for t in tasks}
    assert len(firsts) == 3  # each client trains on its own plays
    assert [len(t.train) for t in build_client_tasks(cfg, byte_tok)] == [len(t.train) for t in tasks]

    merged = merge_tasks(tasks)
    assert len(merged.train) == sum(len(t.train) for t in tasks) and len(merged.eval) == 24
    assert merged.stats["clients"] == 3 and merged.stats["documents"] == merged.stats["records"] == 6
    assert merged.stats["train_examples"] == len(merged.train) and merged.stats["eval_documents"] == 3
    assert [s["client"] for s in merged.stats["per_client"]] == [0, 1, 2] and "client" not in merged.stats
    assert merged.train[0] is tasks[0].train[0] and merged.eval[-1] is tasks[2].eval[-1]


def test_too_many_clients_names_the_source(byte_tok):
    cfg = run_cfg(clients=5, data={"source": "builtin:shakespeare", "max_documents": 7})
    with pytest.raises(DataError, match=r"clients=5 need at least 10 documents \(2 each: one is held out for "
                                        r"evaluation\); data source 'builtin:shakespeare' \(max_documents=7\) has 7"):
        build_client_tasks(cfg, byte_tok)


def test_dirichlet_clients_report_their_label_histograms(chat_tok):
    cfg = run_cfg(clients=3, partition="dirichlet", partition_alpha=0.1, train={"seq_len": 256},
                  data={"source": "builtin:sentiment", "max_documents": 120, "eval_fraction": 0.2})
    tasks = build_client_tasks(cfg, chat_tok)
    records = [t.stats["records"] for t in tasks]
    assert sum(records) == 120 and min(records) >= 2
    for t in tasks:
        assert sum(t.stats["labels"].values()) == t.stats["train_documents"]
    dominant = [max(t.stats["labels"].values()) / t.stats["train_documents"] for t in tasks]
    assert max(dominant) > 0.9  # alpha=0.1: skewed (how skewed, over many draws, is tested above)

    merged = merge_tasks(tasks)
    assert merged.choices is not None and len(merged.choices) == len(merged.eval) == sum(len(t.eval) for t in tasks)
    assert torch.equal(merged.choices.targets, torch.cat([t.choices.targets for t in tasks]))
    assert sum(merged.stats["labels"].values()) == merged.stats["train_documents"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_by_source_gives_each_client_its_own_file(byte_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha " * 20 + str(i)} for i in range(4)])
    b = tmp_path / "b.txt"
    b.write_text("\n\n".join("beta " * 20 + str(i) for i in range(3)))
    cfg = run_cfg(clients=2, partition="by_source", train={"seq_len": 16}, data={"source": a},
                  client_overrides={0: {"data": a}, 1: {"data": str(b)}})
    tasks = build_client_tasks(cfg, byte_tok)
    assert [t.stats["source"] for t in tasks] == [a, str(b)]
    assert [t.stats["records"] for t in tasks] == [4, 3]
    text = [byte_tok.decode(torch.cat([e["input_ids"] for e in t.train])) for t in tasks]
    assert "alpha" in text[0] and "beta" not in text[0] and "beta" in text[1] and "alpha" not in text[1]
    merged = merge_tasks(tasks)
    assert merged.stats["source"] == f"{a}, {b}" and merged.stats["records"] == 7


def test_by_source_mixing_raw_text_and_instructions_is_an_error(byte_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"plain text {i}"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Q{i}?", "response": " A."} for i in range(4)])
    cfg = run_cfg(clients=2, partition="by_source", client_overrides=[{"data": a}, {"data": b}])
    with pytest.raises(DataError, match=r"same task.*client 0 \(.*a\.jsonl\): causal_lm, client 1 \(.*b\.jsonl\): "
                                        r"instruction"):
        build_client_tasks(cfg, byte_tok)


def test_by_source_client_with_too_little_data_is_named(byte_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "plain text " * 10} for _ in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "only one document"}])
    cfg = run_cfg(clients=2, partition="by_source", train={"seq_len": 8}, client_overrides=[{"data": a}, {"data": b}])
    with pytest.raises(DataError, match=r"client 1 \(.*b\.jsonl, 1 documents\): the source has 1 documents"):
        build_client_tasks(cfg, byte_tok)


# --- merge_tasks --------------------------------------------------------------------------------


def test_merge_of_one_task_is_that_task(chat_tok):
    task = build_task_from_records(labelled(40), DataConfig(source="memory", eval_fraction=0.25), chat_tok, 256, 0)
    merged = merge_tasks([task])
    assert merged.kind == task.kind and merged.pad_id == task.pad_id and merged.stats == task.stats
    assert same_examples(merged.train, task.train) and same_examples(merged.eval, task.eval)
    assert merged.choices is task.choices


def test_merge_counts_and_choices(chat_tok):
    data = DataConfig(source="memory", eval_fraction=0.25)
    records = labelled(40)
    tasks = [build_task_from_records(records[k : k + 20], data, chat_tok, 256, 0) for k in (0, 20)]
    for i, t in enumerate(tasks):
        t.stats.update(client=i, records=20, labels={"negative": 5 + i, "positive": 10 - i})
    merged = merge_tasks(tasks)
    assert len(merged.train) == 30 and len(merged.eval) == 10
    assert merged.stats["documents"] == merged.stats["records"] == 40 and merged.stats["train_documents"] == 30
    assert merged.stats["labels"] == {"negative": 11, "positive": 19}
    assert merged.stats["per_client"][1]["labels"] == {"negative": 6, "positive": 9}
    assert torch.equal(merged.choices.targets, torch.cat([t.choices.targets for t in tasks]))
    assert [p.tolist() for p in merged.choices.prompts] == [p.tolist() for t in tasks for p in t.choices.prompts]

    renamed = [dict(r, label={"positive": "yes", "negative": "no"}[r["label"]]) for r in records[:20]]
    other = build_task_from_records(renamed, data, chat_tok, 256, 0)
    assert merge_tasks([tasks[0], other]).choices is None  # other label words: no common choice set
    with pytest.raises(DataError, match="no tasks"):
        merge_tasks([])


def test_a_stub_keeps_its_layer_of_a_kv_cache_in_step():
    """Split generation: each party's cache must report the full length for layers it does not hold, wherever
    the decoder loop hands the cache to a block (keyword cache=, falcon's layer_past=, gpt2's positional)."""
    import torch
    from transformers.cache_utils import DynamicCache

    from splittune.models.partition import AbsentBlock

    hidden = torch.zeros(2, 5, 8)
    for call in (lambda b, c: b(hidden, cache=c), lambda b, c: b(hidden, layer_past=c), lambda b, c: b(hidden, c)):
        cache = DynamicCache()
        call(AbsentBlock(index=0), cache)
        assert cache.get_seq_length(0) == 5
        call(AbsentBlock(index=0), cache)
        assert cache.get_seq_length(0) == 10
    cache = DynamicCache()
    AbsentBlock()(hidden, cache=cache)  # the twin: a stub that does not know its place leaves the cache alone
    assert cache.get_seq_length(0) == 0
