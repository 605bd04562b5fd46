"""Batches: padding and masks, and the deterministic, resumable sampler."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from splittune.config import DataConfig
from splittune.data import IGNORE_INDEX, ResumableBatchSampler, build_task_from_records, collate, pad_token_id

PAD = 257


def example(tokens, n_prompt=0):
    ids = torch.tensor(tokens, dtype=torch.long)
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_collate_right_pads_and_masks():
    batch = collate([example([1, 2, 3], n_prompt=1), example([4, 5, 6, 7, 8]), example([9])], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, PAD, PAD], [4, 5, 6, 7, 8], [9, PAD, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [4, 5, 6, 7, 8], [9, -100, -100, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="empty batch"):
        collate([], PAD)


def test_pad_id_falls_back_to_eos(byte_tok, make_tok):
    assert pad_token_id(byte_tok) == PAD
    assert pad_token_id(make_tok(pad=False)) == 256


def take(sampler, n):
    return list(islice(sampler, n))


def test_sampler_is_deterministic_full_and_covers_each_epoch():
    a = take(ResumableBatchSampler(10, 4, seed=0), 15)  # 60 indices = 6 epochs
    assert a == take(ResumableBatchSampler(10, 4, seed=0), 15)
    assert a != take(ResumableBatchSampler(10, 4, seed=1), 15)
    assert all(len(batch) == 4 for batch in a)
    stream = [i for batch in a for i in batch]
    epochs = [stream[k : k + 10] for k in range(0, 60, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_sampler_with_fewer_examples_than_a_batch():
    batches = take(ResumableBatchSampler(3, 4, seed=0), 3)
    assert all(len(b) == 4 for b in batches) and sorted(sum(batches, [])) == sorted(list(range(3)) * 4)


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 7])  # 3 batches of 4 out of 10: the state is mid-epoch
def test_sampler_resumes_exactly(stop):
    original = ResumableBatchSampler(10, 4, seed=3)
    take(original, stop)
    state = original.state_dict()
    expected = take(original, 12)
    resumed = ResumableBatchSampler(10, 4, seed=3)
    resumed.load_state_dict(dict(state))
    assert take(resumed, 12) == expected
    assert resumed.state_dict() == original.state_dict()


def test_sampler_refuses_a_foreign_state():
    state = ResumableBatchSampler(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size=4, this one has 2"):
        ResumableBatchSampler(10, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples=10, this one has 9"):
        ResumableBatchSampler(9, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid sampler state"):
        ResumableBatchSampler(10, 4, seed=0).load_state_dict({"epoch": 0, "position": 10})


def test_same_seed_same_batches_bit_for_bit(byte_tok):
    records = [{"prompt": f"Question {i}:", "response": " yes" * (1 + i % 5)} for i in range(50)]

    def batches(seed):
        task = build_task_from_records(records, DataConfig(source="memory"), byte_tok, seq_len=32, seed=seed)
        sampler = task.sampler(batch_size=4, seed=seed)
        return [task.collate([task.train[i] for i in next(sampler)]) for _ in range(5)]

    first, again, other = batches(0), batches(0), batches(1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, again, strict=True) for k in x)
    assert [b["input_ids"].tolist() for b in first] != [b["input_ids"].tolist() for b in other]
