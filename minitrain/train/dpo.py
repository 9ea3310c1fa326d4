"""Preference training (`--objective dpo`): a step on a global batch of pairs, and the reference pass.

Data: the store holds pair i as samples 2i (chosen) and 2i+1 (rejected) (`minitrain.data.store`); the
sampler hands out PAIR indices, and the planner packs pairs (a pair's length is both sides'), so both sides
of a pair always sit in the same minibatch on the same rank:

    pairs = sampler.next_batch(B)                   B pair ids, the same on every rank
      -> plan_minibatches(pair lengths)             plan[m][r]: the pairs rank r packs into minibatch m
      -> P = pairs in the plan (all ranks)          the loss of the step is the MEAN over these P pairs
      -> for each minibatch m:  model(collate([2p, 2p+1 for p in plan[m][r]]), weigh)
           weigh(rows, ce):  per-token -log p  -> per-sequence sums (segment_sums, float64)
                             -> pair_terms(sums, reference sums) -> L_m = sum of pair losses * world / P
                             -> dL_m/d(sums) -> per-token weights (token_weights)
           backward of sum_t w_t CE_t = the gradient of L_m (FSDP2's averaging undone by `world`)

The loss, rewards and log-probs of the step are all-reduced sums over the P pairs divided by P: the same
numbers for any `--nproc` and `--max-tokens-per-gpu` (tests/train/test_dpo.py).

Reference (objectives with one: sigmoid, ipo, hinge): the initial model's summed log-probabilities of every
side, computed ONCE before training by the same sharded model with no gradients (`reference_logps`), kept
in OUT/reference_logps.npy with its key (`reference_key`: the data's fingerprint, the model's files, the
seed of a from-scratch model, the base adapters, the master dtype, the token budget and --truncate) in
OUT/reference_logps.json, and read by every step. A
resumed run, or a new run with the same key in the same folder, reads the file instead of recomputing.
Trade-off: one extra forward pass over the data before the first step and 16 bytes per pair on disk,
instead of a second model in memory (a frozen copy doubles the weights) or a second forward per step.

Adapter runs (`--lora-rank`, QLoRA, stacked `--base-adapter`): the reference is the same model with the new
adapter switched off (`minitrain.train.adapters.reference_adapters`: the base model, plus the frozen base
adapters of a stack), run per minibatch with no gradients just before the policy's forward
(`adapter_reference`). No cache and no second copy; the price is one no-grad forward per minibatch. Both
kinds are a `ReferenceSums`: `reference(samples, batch)` -> float64 [S] sums of the minibatch's sides, which
every rank calls for every minibatch (a dummy too: the adapter kind runs FSDP's collectives).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from minitrain.atomic import atomic_write
from minitrain.data.batch import PackedMinibatch, collate
from minitrain.data.packing import plan_minibatches
from minitrain.data.store import TokenStore, fingerprint
from minitrain.rundir import REFERENCE_KEY_FILE, REFERENCE_LOGPS_FILE
from minitrain.train.dist import DistInfo, print0
from minitrain.train.loop import StepResult
from minitrain.train.preference import (
    REFERENCE_FREE,
    PairTerms,
    pair_terms,
    segment_sums,
    token_weights,
)

# the per-step sums all-reduced once per step, in this order (each divided by the step's pairs when logged)
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True, kw_only=True)
class PreferenceObjective:
    """The objective's settings (`--preference-loss`, `--beta`, `--simpo-gamma`, `--sft-weight`)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


# reference(samples, batch) -> float64 [S]: the reference's summed log-probs of the minibatch's sides
ReferenceSums = Callable[[list[int], PackedMinibatch], Tensor]


def cached_reference(values: np.ndarray) -> ReferenceSums:
    """The reference of a full fine-tuning run: a lookup into the sums computed before training."""

    def lookup(samples: list[int], batch: PackedMinibatch) -> Tensor:
        return torch.from_numpy(values[samples])

    return lookup


def adapter_reference(model: nn.Module, switch: Callable[[], AbstractContextManager]) -> ReferenceSums:
    """The reference of an adapter run: the same model's no-grad forward inside `switch()` (the new adapter
    off, `minitrain.train.adapters.reference_adapters`)."""

    def run(samples: list[int], batch: PackedMinibatch) -> Tensor:
        with switch():
            sums, _ = sequence_logps(model, batch, len(samples))
        return sums

    return run


def sequence_logps(model: nn.Module, batch: PackedMinibatch, num_samples: int) -> tuple[Tensor, Tensor]:
    """(float64 [S] summed log-probs of each sequence's trained tokens, int64 [S] their counts) of a packed
    minibatch, with no gradients and dropout off. Every rank calls it (S = 0: the dummy)."""
    out = torch.zeros(num_samples, dtype=torch.float64)
    counts = torch.zeros(num_samples, dtype=torch.int64)

    def capture(rows: Tensor, ce: Tensor) -> Tensor:
        nonlocal out, counts
        if num_samples:
            segment = _segments(rows, batch.cu_seqlens)
            out = segment_sums(-ce, segment, num_samples)
            counts = torch.bincount(segment, minlength=num_samples)
        return torch.zeros_like(ce)

    was_training = model.training
    model.eval()  # dropout off: the reference is the model as it is
    try:
        with torch.no_grad():
            model(batch, weigh=capture)
    finally:
        model.train(was_training)
    return out, counts


def sides(pairs: list[int]) -> list[int]:
    """Sample ids of the pairs' sides, chosen then rejected: [2p, 2p + 1 for p in pairs]."""
    return [s for p in pairs for s in (2 * p, 2 * p + 1)]


def _segments(rows: Tensor, cu_seqlens: Tensor) -> Tensor:
    """[N] index of the sequence each trained position `rows` [N] lies in (cu_seqlens (S + 1,) from 0)."""
    return torch.searchsorted(cu_seqlens[1:].to(rows.device, torch.int64), rows, right=True)


def preference_step(
    model: nn.Module,
    store: TokenStore,
    pairs: list[int],
    *,
    objective: PreferenceObjective,
    reference: ReferenceSums | None,
    dist: DistInfo,
    max_tokens_per_gpu: int,
) -> StepResult | None:
    """Forward/backward of one global batch of pairs on this rank (None: no pair fits the token budget).

    `reference`: the reference sums of a minibatch's sides (None for SimPO/ORPO), called before its forward.
    """
    rank, world = dist.rank, dist.world_size
    lengths = store.pair_lengths[pairs].tolist()  # [B] tokens of both sides
    plan = plan_minibatches(lengths, max_tokens_per_gpu, world)  # plan[m][r] = positions into `pairs`
    picked = [i for minibatch in plan for ranks in minibatch for i in ranks]
    if not picked:
        return None
    trained = sides([pairs[i] for i in picked])  # sample ids of every trained side, all ranks
    scale = world / len(picked)  # mean over the step's pairs, FSDP2's averaging over ranks undone
    totals = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=dist.device)  # sums over my pairs
    for m, minibatch in enumerate(plan):
        samples = sides([pairs[i] for i in minibatch[rank]])
        batch = collate(store, samples)  # [] -> the zero-loss dummy, keeping FSDP's collectives in step
        ref = None if reference is None else reference(samples, batch).to(dist.device)  # no grad
        weigh = _pair_weigher(objective, batch.cu_seqlens, len(samples), ref, scale, totals)
        weighted = model(batch, weigh=weigh)  # sum_t w_t CE_t, its gradient the minibatch's share of the loss
        model.prepare_backward(last_minibatch=m == len(plan) - 1)
        weighted.backward()
    if world > 1:
        torch_dist.all_reduce(totals)  # the only collective outside FSDP: the step's metrics
    means = (totals / len(picked)).tolist()
    return StepResult(
        loss=means[0],
        units=len(picked),
        sample_lengths=store.lengths[trained].tolist(),
        loss_tokens=int(store.num_trained[trained].sum()),
        minibatches=len(plan),
        metrics=dict(zip(METRIC_NAMES[1:], means[1:], strict=True)),
    )


def _pair_weigher(
    objective: PreferenceObjective,
    cu_seqlens: Tensor,
    num_samples: int,
    ref: Tensor | None,
    scale: float,
    totals: Tensor,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The `weigh` of one minibatch: token CEs -> pair losses (added into `totals`) -> token weights."""

    def weigh(rows: Tensor, ce: Tensor) -> Tensor:
        if num_samples == 0:  # the dummy of a rank with no pair in this minibatch
            return torch.zeros_like(ce)
        segment = _segments(rows, cu_seqlens)  # [N] sequence of each trained token
        counts = torch.bincount(segment, minlength=num_samples)  # [S] trained tokens per sequence
        with torch.enable_grad():
            sums = segment_sums(-ce, segment, num_samples).requires_grad_()  # [S] float64 log p sums
            terms = pair_objective(objective, sums, counts, ref)
            (grad,) = torch.autograd.grad(terms.loss.sum() * scale, sums)
        totals.add_(metric_sums(terms, sums.detach()).to(totals.dtype))
        return token_weights(grad, segment)

    return weigh


def pair_objective(
    objective: PreferenceObjective, sums: Tensor, counts: Tensor, ref: Tensor | None
) -> PairTerms:
    """The objective per pair from the sides' sums [S] and trained-token counts [S] (chosen, rejected ...)."""
    return pair_terms(
        objective.loss,
        chosen=sums[0::2], rejected=sums[1::2],
        chosen_tokens=counts[0::2], rejected_tokens=counts[1::2],
        ref_chosen=None if ref is None else ref[0::2],
        ref_rejected=None if ref is None else ref[1::2],
        beta=objective.beta, simpo_gamma=objective.simpo_gamma, sft_weight=objective.sft_weight,
    )  # fmt: skip


def metric_sums(terms: PairTerms, logps: Tensor) -> Tensor:
    """[len(METRIC_NAMES)] sums over the pairs of `terms` of each metric (`logps` [S]: the sides' sums)."""
    return torch.stack(
        [
            terms.loss.detach().sum(),
            terms.rewards_chosen.sum(),
            terms.rewards_rejected.sum(),
            terms.accuracies.sum(),
            terms.margins.sum(),
            logps[0::2].sum(),
            logps[1::2].sum(),
        ]
    )


def reference_logps(
    model: nn.Module, store: TokenStore, *, dist: DistInfo, max_tokens_per_gpu: int, pairs_per_plan: int
) -> np.ndarray:
    """float64 [2 * num_pairs]: the model's summed log-probability of each side's trained tokens.

    Every rank calls this: the pairs are planned `pairs_per_plan` at a time as training plans them, each
    rank runs its part with no gradients, and one all-reduce gives every rank all sums. Pairs longer than
    the token budget (never trained) are NaN.
    """
    rank, world = dist.rank, dist.world_size
    n = store.num_pairs
    lengths = store.pair_lengths
    out = torch.zeros(2 * n, dtype=torch.float64, device=dist.device)
    for start in range(0, n, pairs_per_plan):
        ids = list(range(start, min(n, start + pairs_per_plan)))
        for minibatch in plan_minibatches(lengths[ids].tolist(), max_tokens_per_gpu, world):
            samples = sides([ids[i] for i in minibatch[rank]])
            sums, _ = sequence_logps(model, collate(store, samples), len(samples))
            if samples:
                out[torch.tensor(samples, device=out.device)] = sums.to(out.device)
    if world > 1:
        torch_dist.all_reduce(out)
    result = out.cpu().numpy()
    too_long = np.repeat(lengths > max_tokens_per_gpu, 2)
    result[too_long] = math.nan
    return result


def reference_key(
    *,
    data_path: Path,
    model_name_or_path: str,
    from_scratch: bool,
    seed: int,
    master_dtype: str,
    base_adapters: tuple[Path, ...] = (),
    max_tokens_per_gpu: int,
    truncate: bool,
) -> dict[str, Any]:
    """What the reference log-probs depend on: the data, the model's weight files (or the from-scratch
    seed), the frozen base adapters under it, the master dtype, and the token budget (which pairs are
    skipped (NaN) and, with --truncate, where each side is cut). A change to any of them recomputes."""
    return {
        "data": fingerprint(Path(data_path)),
        "model": str(model_name_or_path),
        "model_files": _weight_files(Path(model_name_or_path)),
        "from_scratch_seed": seed if from_scratch else None,
        "master_dtype": master_dtype,
        "base_adapters": [[str(a), _weight_files(Path(a))] for a in base_adapters],
        "max_tokens_per_gpu": max_tokens_per_gpu,
        "truncate": truncate,
    }


def _weight_files(folder: Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of a model or adapter folder's weight and config files ([] for a Hub id)."""
    if not folder.is_dir():
        return []
    return [
        [path.name, path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(folder.iterdir())
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file()
    ]


def load_or_compute_reference(
    model: nn.Module,
    store: TokenStore,
    *,
    output_dir: Path,
    key: dict[str, Any],
    dist: DistInfo,
    max_tokens_per_gpu: int,
    pairs_per_plan: int,
    files: tuple[str, str] = (REFERENCE_LOGPS_FILE, REFERENCE_KEY_FILE),
) -> np.ndarray:
    """The reference sums: OUT/reference_logps.npy when its key matches (rank 0 reads, every rank gets it),
    else computed now (`reference_logps`) and saved by rank 0. Call before loading a resumed state.
    `files`: the (sums, key) file names in OUT (the eval set's are `EVAL_REFERENCE_*`)."""
    npy, key_file = Path(output_dir) / files[0], Path(output_dir) / files[1]
    cached: list[Any] = [None]
    if dist.is_main and npy.is_file() and key_file.is_file():
        try:
            if orjson.loads(key_file.read_bytes()) == orjson.loads(orjson.dumps(key)):
                values = np.load(npy)
                if values.shape == (2 * store.num_pairs,):
                    cached[0] = values
        except (OSError, ValueError):
            cached[0] = None  # unreadable: recompute
    if dist.world_size > 1:
        torch_dist.broadcast_object_list(cached, src=0)
    if cached[0] is not None:
        print0(dist, f"reference log-probs of {store.num_pairs:,} pairs read from {npy}")
        return cached[0]
    print0(dist, f"computing the reference log-probs of {store.num_pairs:,} pairs (once, before training)")
    values = reference_logps(
        model, store, dist=dist, max_tokens_per_gpu=max_tokens_per_gpu, pairs_per_plan=pairs_per_plan
    )
    if dist.is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with atomic_write(npy, "wb") as f:
            np.save(f, values)
        with atomic_write(key_file, "wb") as f:
            f.write(orjson.dumps(key, option=orjson.OPT_INDENT_2))
    return values
