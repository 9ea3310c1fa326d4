"""One rank's packed minibatch: the samples a rank trains in one forward/backward, as torch tensors.

Owns the batch contract between the data engine and the model. Samples are concatenated into one row
with no padding; attention is kept inside each sample by `position_ids` that restart at 0 (and by
`cu_seqlens` for flash-attn varlen). Labels are shifted HERE, inside each sample, so the loss is a plain
cross-entropy of `logits[t]` against `labels[t]` and never predicts across a sample boundary:

    sample:         |------- A (4) -------|---- B (3) ----|-- C (2) --|
    input_ids       a0    a1    a2    a3    b0    b1    b2    c0    c1
    orig labels     -100  -100  a2    a3    -100  b1    b2    c0    c1     (aligned, from the JSONL)
    labels          -100  a2    a3    -100  b1    b2    -100  c1    -100   (shifted: target of position t)
    position_ids    0     1     2     3     0     1     2     0     1
    cu_seqlens      [0, 4, 7, 9]              max_seqlen = 4
    num_loss_tokens 5  (labels != -100 after the shift; a sample's first label is never trained)

A rank with no samples in a minibatch gets a 1-token dummy (`input_ids=[0]`, `labels=[-100]`,
`position_ids=[0]`, `cu_seqlens=[0, 1]`): it contributes zero loss and zero gradient but runs the same
forward/backward, so the FSDP collectives of all ranks stay in step.

Trade-off: the labels are shifted on the CPU per minibatch (a copy of T int64) so that the loss, the
chunked CE and Liger's fused kernel all see the same plain `labels[t]` convention, instead of each loss
implementation shifting and masking sample boundaries itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from minitrain.data.format import IGNORE_INDEX
from minitrain.data.store import TokenStore


@dataclass
class PackedMinibatch:
    """Tensors for one rank's forward/backward (shapes as in the module docstring)."""

    input_ids: torch.Tensor  # (1, T) int64, samples concatenated, no padding
    labels: torch.Tensor  # (1, T) int64, shifted within each sample, -100 at each sample's last token
    position_ids: torch.Tensor  # (1, T) int64, restarting at 0 for every sample
    cu_seqlens: torch.Tensor  # (num_samples + 1,) int32, cumulative lengths from 0 (the dummy: [0, 1])
    max_seqlen: int
    num_samples: int  # real samples (0 for the dummy)
    num_tokens: int  # T of real samples (0 for the dummy)
    num_loss_tokens: int  # labels != -100 in this minibatch (after the shift)

    def to(self, device: torch.device | str) -> PackedMinibatch:
        """The same minibatch with its tensors on `device` (non-blocking where possible)."""
        move = {"non_blocking": True} if str(device).startswith("cuda") else {}
        return PackedMinibatch(
            input_ids=self.input_ids.to(device, **move),
            labels=self.labels.to(device, **move),
            position_ids=self.position_ids.to(device, **move),
            cu_seqlens=self.cu_seqlens.to(device, **move),
            max_seqlen=self.max_seqlen,
            num_samples=self.num_samples,
            num_tokens=self.num_tokens,
            num_loss_tokens=self.num_loss_tokens,
        )


def _dummy() -> PackedMinibatch:
    zero = torch.zeros((1, 1), dtype=torch.int64)
    return PackedMinibatch(
        input_ids=zero,
        labels=torch.full((1, 1), IGNORE_INDEX, dtype=torch.int64),
        position_ids=zero.clone(),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
        max_seqlen=1,
        num_samples=0,
        num_tokens=0,
        num_loss_tokens=0,
    )


def collate(store: TokenStore, indices: Sequence[int]) -> PackedMinibatch:
    """Pack the samples `indices` of `store` into one row; `[]` gives the zero-loss 1-token dummy."""
    if len(indices) == 0:
        return _dummy()
    lengths = store.lengths[np.asarray(indices, dtype=np.int64)]
    total = int(lengths.sum())
    cu = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    ids = np.empty(total, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    for k, i in enumerate(indices):
        start, end = cu[k], cu[k + 1]
        ids[start:end] = store.input_ids(int(i))
        labels[start : end - 1] = store.labels(int(i))[1:]  # target of position t is token t+1 of the sample
    starts = np.repeat(cu[:-1], lengths)
    positions = np.arange(total, dtype=np.int64) - starts
    return PackedMinibatch(
        input_ids=torch.from_numpy(ids).unsqueeze(0),
        labels=torch.from_numpy(labels).unsqueeze(0),
        position_ids=torch.from_numpy(positions).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        num_samples=len(indices),
        num_tokens=total,
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def count_loss_tokens(store: TokenStore, indices: Sequence[int]) -> int:
    """Trained tokens of the samples `indices` after the shift (the global loss normaliser).

    Equals the sum of `num_loss_tokens` over the minibatches these samples are packed into: a sample
    trains every label except its first one (no position predicts it). Reads a per-sample array only.
    """
    idx = np.asarray(indices, dtype=np.int64)
    return int(store.num_trained[idx].sum()) if idx.size else 0
