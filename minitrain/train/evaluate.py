"""Evaluation loss: the mean token cross-entropy over a whole held-out tokenized file, without gradients.

Normalised exactly like training: the sum of token losses over every trained token (labels shifted within
each sample) divided by the number of those tokens in the whole eval set, so `eval_loss` and `loss` are
the same quantity on different data. The eval set is split across ranks by the training planner once
(`plan_eval`), under the same `--max-tokens-per-gpu` budget; every rank runs the same number of packed
minibatches (an empty slot is the zero-loss dummy) because each forward gathers FSDP shards collectively.
One all-reduce sums the ranks' losses at the end. Samples longer than the budget are skipped and counted.

`--objective dpo` (`plan_pair_eval`, `evaluate_pairs`): the eval set is pairs, planned as training plans them
(both sides in one minibatch on one rank), and the eval metrics are the training ones (`eval_loss`,
`eval_rewards/chosen|rejected|accuracies|margins`, `eval_logps/chosen|rejected`), each the mean over all
planned eval pairs, with the same objective and the same kind of reference: the eval pairs' sums of the
initial model, cached beside the run (full fine-tuning), or the model with the new adapter off, per
minibatch (adapter runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from minitrain.data.batch import collate, count_loss_tokens
from minitrain.data.packing import plan_minibatches
from minitrain.data.store import TokenStore
from minitrain.train.dist import DistInfo, print0
from minitrain.train.dpo import (
    METRIC_NAMES,
    PreferenceObjective,
    ReferenceSums,
    metric_sums,
    pair_objective,
    sequence_logps,
    sides,
)


@dataclass(frozen=True)
class EvalPlan:
    """Which eval samples each rank packs into each minibatch, and the normaliser."""

    store: TokenStore
    plan: list[list[list[int]]]  # plan[m][r] = sample indices of rank r in minibatch m
    loss_tokens: int  # trained tokens (after the shift) of every planned sample
    samples: int  # samples planned
    skipped: int  # samples longer than the token budget


def plan_eval(
    store: TokenStore, *, max_tokens_per_gpu: int, world_size: int, indices: Sequence[int] | None = None
) -> EvalPlan:
    """Split the eval set into balanced packed minibatches over `world_size` ranks: the whole store, or
    only the samples `indices` names (`--validation-split`: the held-out part of the training file)."""
    ids = list(range(len(store))) if indices is None else [int(i) for i in indices]
    plan = plan_minibatches(store.lengths[ids].tolist(), max_tokens_per_gpu, world_size)
    plan = [[[ids[p] for p in ranks] for ranks in minibatch] for minibatch in plan]  # positions -> ids
    planned = [i for minibatch in plan for ranks in minibatch for i in ranks]
    return EvalPlan(
        store=store,
        plan=plan,
        loss_tokens=count_loss_tokens(store, planned),
        samples=len(planned),
        skipped=len(ids) - len(planned),
    )


def evaluate(model: nn.Module, plan: EvalPlan, *, dist: DistInfo) -> float:
    """Mean token loss of the eval set (NaN when it has no trained token); every rank must call this.

    `model(batch)` returns the sum of token CE over a packed minibatch, as in training.
    """
    was_training = model.training
    model.eval()  # dropout (e.g. LoRA's) off
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)
    with torch.no_grad():
        for minibatch in plan.plan:
            loss_sum += model(collate(plan.store, minibatch[dist.rank])).float()
    if dist.world_size > 1:
        torch_dist.all_reduce(loss_sum)
    model.train(was_training)
    return loss_sum.item() / plan.loss_tokens if plan.loss_tokens else float("nan")


@dataclass(frozen=True)
class PairEvalPlan:
    """`--objective dpo`: which eval pairs each rank packs into each minibatch (both sides together)."""

    store: TokenStore  # opened as pairs: pair p is samples 2p, 2p + 1
    plan: list[list[list[int]]]  # plan[m][r] = pair indices of rank r in minibatch m
    pairs: int  # pairs planned: the normaliser of every eval metric
    skipped: int  # pairs longer than the token budget (both sides together)


def plan_pair_eval(store: TokenStore, *, max_tokens_per_gpu: int, world_size: int) -> PairEvalPlan:
    """Split the whole eval set of pairs into balanced packed minibatches, as training plans pairs."""
    plan = plan_minibatches(store.pair_lengths.tolist(), max_tokens_per_gpu, world_size)
    planned = sum(len(ranks) for minibatch in plan for ranks in minibatch)
    return PairEvalPlan(store=store, plan=plan, pairs=planned, skipped=store.num_pairs - planned)


def evaluate_pairs(
    model: nn.Module,
    plan: PairEvalPlan,
    *,
    objective: PreferenceObjective,
    reference: ReferenceSums | None,
    dist: DistInfo,
) -> dict[str, float]:
    """`eval_loss`, `eval_rewards/...`, `eval_logps/...`: the training metrics of `--objective dpo`, as means
    over every planned eval pair (`reference`: None for SimPO/ORPO). Every rank must call this."""
    totals = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=dist.device)
    for minibatch in plan.plan:
        samples = sides(minibatch[dist.rank])
        batch = collate(plan.store, samples)  # [] -> the dummy: every rank runs every forward
        ref = None if reference is None else reference(samples, batch).to(dist.device)
        sums, counts = sequence_logps(model, batch, len(samples))
        if samples:
            terms = pair_objective(objective, sums.to(dist.device), counts.to(dist.device), ref)
            totals += metric_sums(terms, sums.to(dist.device))
    if dist.world_size > 1:
        torch_dist.all_reduce(totals)
    means = (totals / plan.pairs).tolist() if plan.pairs else [float("nan")] * len(METRIC_NAMES)
    return {f"eval_{name}": value for name, value in zip(METRIC_NAMES, means, strict=True)}


def held_out_evaluator(
    model: nn.Module,
    store: TokenStore,
    held_out: Sequence[int],
    *,
    max_tokens_per_gpu: int,
    validation_split: float,
    dist: DistInfo,
):
    """`--validation-split`: `evaluate()` -> the eval_loss of the held-out samples of the training file (read
    as training reads them, so `--truncate` cuts them too), with their count in each eval line."""
    plan = plan_eval(
        store, max_tokens_per_gpu=max_tokens_per_gpu, world_size=dist.world_size, indices=held_out
    )
    skipped = f" ({plan.skipped} longer than --max-tokens-per-gpu skipped)" if plan.skipped else ""
    print0(
        dist,
        f"eval set: {plan.samples:,} samples held out of {len(store):,} by --validation-split "
        f"{validation_split:g}, {plan.loss_tokens:,} trained tokens{skipped}",
    )
    return lambda: {"eval_loss": evaluate(model, plan, dist=dist), "eval_samples_held_out": len(held_out)}
