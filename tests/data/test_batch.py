"""Collate: shifted labels per sample, positions restarting at 0, cu_seqlens, the dummy, loss-token counts."""

from __future__ import annotations

from pathlib import Path

import torch

from minitrain.data.batch import collate, count_loss_tokens
from minitrain.data.store import TokenStore
from tests.data.test_store import make_samples, write_tokenized


def reference(samples: list[dict], indices: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Obviously-right layout: per sample, ids as is, labels shifted left by one with -100 last, positions
    0.."""
    ids, labels, positions = [], [], []
    for i in indices:
        s = samples[i]
        ids += s["input_ids"]
        labels += s["labels"][1:] + [-100]
        positions += list(range(len(s["input_ids"])))
    return ids, labels, positions


def test_layout_matches_reference(tmp_path: Path) -> None:
    samples = make_samples(30, seed=5)
    store = TokenStore.open(write_tokenized(tmp_path / "b.jsonl", samples))
    indices = [7, 2, 19, 0]
    mb = collate(store, indices)
    ids, labels, positions = reference(samples, indices)
    assert mb.input_ids.tolist() == [ids]
    assert mb.labels.tolist() == [labels]
    assert mb.position_ids.tolist() == [positions]
    lens = [samples[i]["len"] for i in indices]
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert mb.input_ids.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.int64
    assert mb.input_ids.shape == (1, sum(lens))
    assert (mb.max_seqlen, mb.num_samples, mb.num_tokens) == (max(lens), 4, sum(lens))
    assert mb.num_loss_tokens == sum(x != -100 for x in labels)
    # no position predicts across a boundary: the last token of every sample is masked
    ends = (mb.cu_seqlens[1:] - 1).long()
    assert (mb.labels[0, ends] == -100).all()


def test_hand_drawn_example(tmp_path: Path) -> None:
    samples = [
        {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]},
        {"input_ids": [20, 21, 22], "labels": [-100, 21, 22]},
        {"input_ids": [30, 31], "labels": [30, 31]},
    ]
    store = TokenStore.open(write_tokenized(tmp_path / "h.jsonl", samples))
    mb = collate(store, [0, 1, 2])
    assert mb.labels.tolist() == [[-100, 12, 13, -100, 21, 22, -100, 31, -100]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7, 9]
    assert mb.num_loss_tokens == 5 == count_loss_tokens(store, [0, 1, 2])


def test_empty_rank_gets_a_zero_loss_dummy(tmp_path: Path) -> None:
    store = TokenStore.open(write_tokenized(tmp_path / "d.jsonl", make_samples(3)))
    mb = collate(store, [])
    assert mb.input_ids.shape == mb.labels.shape == mb.position_ids.shape == (1, 1)
    assert mb.labels.tolist() == [[-100]]
    assert mb.cu_seqlens.tolist() == [0, 1]
    assert (mb.num_samples, mb.num_tokens, mb.num_loss_tokens) == (0, 0, 0)


def test_count_loss_tokens_equals_sum_over_minibatches(tmp_path: Path) -> None:
    samples = make_samples(60, seed=9)
    store = TokenStore.open(write_tokenized(tmp_path / "c.jsonl", samples))
    batch = list(range(0, 60, 2))
    parts = [batch[:7], batch[7:20], [], batch[20:]]
    assert count_loss_tokens(store, batch) == sum(collate(store, p).num_loss_tokens for p in parts)
    assert count_loss_tokens(store, []) == 0
