"""The training loop, top to bottom: one function, one optimizer step per global batch.

One step, on every rank at once:

    sampler.next_batch(B)              B sample indices, the same on every rank (the global batch)
    run_step(indices) = sft_step:      (`--objective dpo`: minitrain.train.dpo.preference_step, on pairs)
      -> plan_minibatches(lengths)     plan[m][r]: the samples rank r packs into minibatch m (<= token budget)
      -> count_loss_tokens(all)        trained tokens of the whole global batch: the loss normaliser
      -> for each minibatch m:         every rank runs len(plan) minibatches (an empty list packs a dummy
           model(collate(plan[m][r]))    with no trained token, keeping FSDP's collectives in step)
           (sum / global tokens * world).backward()
      -> clip, optimizer step, scheduler step, metrics line, maybe a checkpoint

Because the normaliser is the global count and FSDP2's gradient averaging is undone, the gradient of a step
is the gradient of the mean token loss of the global batch, whatever the number of ranks or the token budget:
`--nproc` and `--max-tokens-per-gpu` change speed and memory, never the numbers (tests/train/test_loop.py).
There is no gradient-accumulation setting to tune. Trade-off: the plan is computed redundantly on every rank
(about a millisecond of CPU for a few hundred samples, benchmarks/results/packing.json) instead of once and
broadcast, which keeps the loop free of data collectives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from minitrain.data.batch import collate, count_loss_tokens
from minitrain.data.packing import plan_minibatches
from minitrain.data.sampler import InfiniteSampler, StopRule
from minitrain.data.store import TokenStore
from minitrain.train.dist import DistInfo
from minitrain.train.faults import StopFlag, check_finite
from minitrain.train.loss import scale_for_fsdp
from minitrain.train.metrics import MetricsWriter, ProgressDisplay, peak_memory_gb


@dataclass
class TrainState:
    """Counters that survive a step (and, later, a resume)."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # samples trained (over-long ones excluded): checkpoint names use it
    tokens_seen: int = 0
    last_checkpoint_samples: int = 0
    last_eval_samples: int = 0  # only to skip a final eval right after a periodic one
    stop_signal: int = 0  # the signal that stopped the run early (0: it ran to its end)


def train_loop(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    store: TokenStore,
    sampler: InfiniteSampler,
    dist: DistInfo,
    batch_size: int,
    max_tokens_per_gpu: int,
    max_grad_norm: float,
    stop: StopRule,
    min_samples_per_checkpoint: int | None,
    save_checkpoint: Callable[[int], Path],
    metrics: MetricsWriter,
    display: ProgressDisplay,
    mfu: Callable[[Sequence[int], float], float] | None = None,
    state: TrainState | None = None,
    stop_flag: StopFlag | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every_samples: int | None = None,
    run_step: Callable[[list[int]], StepResult | None] | None = None,
    checkpoint_at_epoch: bool = False,
) -> TrainState:
    """Train until `stop` is reached; save every `min_samples_per_checkpoint` samples and at the end.

    `model(batch)` returns the SUM of token cross-entropy over the minibatch's trained tokens. `mfu(lengths,
    seconds)` turns a step's real sample lengths and duration into model FLOPs utilisation (GPU only).
    `evaluate()` returns the eval metrics ({"eval_loss": ...}, more for dpo); it runs each time the samples
    seen pass a multiple of `eval_every_samples`, and at the end. `run_step(indices)` does the
    forward/backward of a global batch (default: `sft_step`; `--objective dpo`:
    `minitrain.train.dpo.preference_step` on pair indices). `checkpoint_at_epoch` also saves after the step
    that finishes each pass over the data (`--checkpoint-at-epoch`).
    """
    state = state or TrainState()
    device = dist.device
    if run_step is None:
        run_step = functools.partial(sft_step, model, store, dist=dist, max_tokens_per_gpu=max_tokens_per_gpu)
    model.train()
    epochs_saved = int(sampler.epochs_consumed)  # whole passes done when the last epoch checkpoint was taken
    while not stop.reached(
        steps=state.step,
        samples_seen=state.samples_seen,
        epochs=sampler.epochs_consumed,
        tokens_seen=state.tokens_seen,
    ):
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # --- the global batch (sample ids, or pair ids for --objective dpo), the same on every rank; its
        #     forward/backward accumulates the step's gradient in the (sharded) grads
        indices = sampler.next_batch(batch_size)
        result = run_step(indices)
        if result is None:  # nothing to learn in this batch (all masked or too long): no step
            display.print(f"skipping a batch of {len(indices)} samples with no trained token")
            continue

        # --- the optimizer step
        grad_norm = _clip_grad_norm(model, max_grad_norm)  # global norm, before clipping
        lr = scheduler.get_last_lr()[0]  # the rate this step is taken with
        loss = result.loss
        check_finite(loss, grad_norm, state.step + 1)  # before the step: no NaN reaches the weights
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start

        # --- bookkeeping, metrics, checkpoint
        trained_lengths = result.sample_lengths
        num_tokens = sum(trained_lengths)
        state.step += 1
        state.samples_seen += result.units
        state.tokens_seen += num_tokens
        record = {
            "step": state.step,
            "lr": lr,
            "grad_norm": grad_norm,
            "loss": loss,
            "num_samples": result.units,
            "num_loss_counted_tokens": result.loss_tokens,
            "num_total_tokens": num_tokens,
            "grad_accum": result.minibatches,
            "time_per_batch": seconds,
            "tokens_per_second": num_tokens / seconds,
            "samples_per_second": result.units / seconds,
            "total_samples_accumulated": state.samples_seen,
            "peak_memory_usage_GB": peak_memory_gb(device),
            "epoch": sampler.epochs_consumed,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        }
        record.update(result.metrics)
        if mfu is not None:
            record["mfu"] = mfu(trained_lengths, seconds)
        metrics.write(record)
        display.update(record)
        if (
            min_samples_per_checkpoint is not None
            and state.samples_seen - state.last_checkpoint_samples >= min_samples_per_checkpoint
        ):
            path = save_checkpoint(state.samples_seen)
            state.last_checkpoint_samples = state.samples_seen
            display.print(f"saved {path}")
        if checkpoint_at_epoch and int(sampler.epochs_consumed) > epochs_saved:  # a pass ended in this step
            epochs_saved = int(sampler.epochs_consumed)
            if state.last_checkpoint_samples != state.samples_seen:  # unless just saved above
                path = save_checkpoint(state.samples_seen)
                state.last_checkpoint_samples = state.samples_seen
                display.print(f"saved {path} (end of epoch {epochs_saved})")
        if (
            evaluate is not None
            and eval_every_samples is not None
            # each time samples seen crosses a multiple of N: a function of the counters alone, so a resumed
            # run evaluates at the same points as an uninterrupted one
            and state.samples_seen // eval_every_samples
            > (state.samples_seen - result.units) // eval_every_samples
        ):
            _log_eval(evaluate, state, sampler, metrics, display)
        if stop_flag is not None and stop_flag.should_stop(dist):  # every rank agrees, at this step
            state.stop_signal = stop_flag.agreed
            display.print(f"{stop_flag.signal_name}: stopping after step {state.step}")
            break

    if evaluate is not None and state.stop_signal == 0 and state.last_eval_samples != state.samples_seen:
        _log_eval(evaluate, state, sampler, metrics, display)  # the final eval loss, unless just measured
    if state.samples_seen != state.last_checkpoint_samples:  # the final weights, unless just saved
        path = save_checkpoint(state.samples_seen)
        state.last_checkpoint_samples = state.samples_seen
        display.print(f"saved {path}")
    return state


@dataclass(frozen=True)
class StepResult:
    """What a step's forward/backward reports: the global loss (all-reduced) and the counts of its metrics."""

    loss: float  # the global batch's loss (SFT: mean token CE; dpo: mean pair loss)
    units: int  # samples (pairs for dpo) trained: the sampler's unit, counted in samples_seen
    sample_lengths: list[int]  # tokens of every trained sequence (both sides of a pair)
    loss_tokens: int  # trained tokens of the global batch
    minibatches: int  # packed minibatches per rank (grad_accum)
    metrics: dict[str, float] = field(default_factory=dict)  # objective-specific keys of the metrics line


def sft_step(
    model: nn.Module, store: TokenStore, indices: list[int], *, dist: DistInfo, max_tokens_per_gpu: int
) -> StepResult | None:
    """Forward/backward of one global batch of SFT samples on this rank (None: nothing trained in it)."""
    rank, world = dist.rank, dist.world_size
    lengths = store.lengths[indices].tolist()  # [B] tokens per sample
    plan = plan_minibatches(lengths, max_tokens_per_gpu, world)  # plan[m][r] = positions into `indices`
    picked = [i for minibatch in plan for ranks in minibatch for i in ranks]  # over-long ones are absent
    trained = [indices[i] for i in picked]  # sample ids trained this step, all ranks
    global_loss_tokens = count_loss_tokens(store, trained)  # the normaliser of every rank's loss
    if global_loss_tokens == 0:
        return None
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)  # this rank's sum of token losses
    for m, minibatch in enumerate(plan):
        batch = collate(store, [indices[i] for i in minibatch[rank]])  # (1, T) tensors, [] -> a dummy
        minibatch_loss = model(batch)  # scalar: sum of CE over labels != -100 (model moves the batch)
        model.prepare_backward(last_minibatch=m == len(plan) - 1)  # HSDP: all-reduce across nodes once
        scale_for_fsdp(minibatch_loss, global_loss_tokens, world).backward()
        loss_sum += minibatch_loss.detach().float()
    if world > 1:
        torch_dist.all_reduce(loss_sum)  # the only collective outside FSDP: the loss to report
    return StepResult(
        loss=loss_sum.item() / global_loss_tokens,  # mean token CE of the global batch
        units=len(trained),
        sample_lengths=[lengths[i] for i in picked],
        loss_tokens=global_loss_tokens,
        minibatches=len(plan),
    )


def _log_eval(
    evaluate: Callable[[], dict[str, float]],
    state: TrainState,
    sampler: InfiniteSampler,
    metrics: MetricsWriter,
    display: ProgressDisplay,
) -> None:
    """Measure the eval metrics and log them as their own metrics line (step and samples seen say when)."""
    values = evaluate()
    state.last_eval_samples = state.samples_seen
    metrics.write(
        {
            "step": state.step,
            **values,
            "total_samples_accumulated": state.samples_seen,
            "epoch": sampler.epochs_consumed,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        }
    )
    shown = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    display.print(f"step {state.step}: " + ", ".join(f"{k} {values[k]:.4f}" for k in shown if k in values))


def _clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` and return the global norm before clipping (DTensor-aware: FSDP2 shards are
    summed)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor when the parameters are FSDP2 shards
        norm = norm.full_tensor()
    return norm.item()
