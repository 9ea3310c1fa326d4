"""The optimizer and the learning-rate schedule.

AdamW with betas (0.9, 0.95) and eps 1e-8 by default (`--beta1`, `--beta2`, `--eps`; the pretraining/SFT
standard for LLMs, and mini_trainer's choice), fused on GPU. Weight decay applies to matrices only (norm
scales and biases, the 1-D parameters, are not decayed); the default decay is 0. The schedules are the
Trainer's (`transformers.get_scheduler`: constant, constant_with_warmup, linear, cosine with `num_cycles`),
so their shapes are the ones users know, with one change: the warm-up is shifted by one step, so step s of
W warm-up steps trains at s/W of the peak rate (step 1 at 1/W, step W at the peak), as torchtitan's warm-up
does. The Trainer's own schedule gives step 1 a rate of exactly 0: a step that moves no weight. A
schedule's own arguments (cosine's `num_cycles`) come from `--lr-scheduler-kwargs`.

Trade-off: the four factors are written here, term for term as `transformers.optimization` writes them
(tests/train/test_optim.py compares them with `get_scheduler` at every step, exactly), and not imported:
that module imports `transformers.trainer_utils`, which imports PEFT, which imports bitsandbytes where the
qlora extra is installed, which starts torch's compiler at import: 1.5-2.7 CPU-s per rank of every run
for four one-line formulas. No per-layer learning rates or optimizer choice; one value each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def build_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    device: torch.device,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D parameters get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=learning_rate,
        betas=betas,
        eps=eps,
        fused=device.type == "cuda",
    )


def trainer_factor(
    name: str, num_warmup_steps: int, num_training_steps: int | None, num_cycles: float = 0.5
) -> Callable[[int], float]:
    """The Trainer's factor of the peak rate at scheduler index k (`get_scheduler(name, ...)`'s lr_lambda),
    unshifted: a linear warm-up from 0 over `num_warmup_steps`, then constant, linear or cosine decay to 0 at
    `num_training_steps`."""
    warmup = num_warmup_steps

    def warming(k: int) -> float:
        return float(k) / float(max(1, warmup))

    if name == "constant":
        return lambda k: 1.0
    if name == "constant_with_warmup":
        return lambda k: warming(k) if k < warmup else 1.0
    assert num_training_steps is not None, f"{name} decays to 0, so it needs the number of training steps"
    total = num_training_steps
    if name == "linear":
        return lambda k: (
            warming(k) if k < warmup else max(0.0, float(total - k) / float(max(1, total - warmup)))
        )
    if name == "cosine":

        def cosine(k: int) -> float:
            if k < warmup:
                return warming(k)
            progress = float(k - warmup) / float(max(1, total - warmup))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

        return cosine
    raise ValueError(f"unknown learning-rate schedule {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    num_warmup_steps: int,
    num_training_steps: int | None,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> LRScheduler:
    """The Trainer's schedule `name` with its warm-up shifted by one step (the module docstring).

    Decaying schedules need the number of training steps. Scheduler index k (0-based) is step k + 1: during
    the warm-up (k < W) it takes the Trainer's factor of k + 1, so (k + 1) / W, never 0; after it, the
    Trainer's factor of k unchanged (the decay still ends at `num_training_steps`).
    """
    factor = trainer_factor(name, num_warmup_steps, num_training_steps, **(scheduler_kwargs or {}))
    warmup = num_warmup_steps if name != "constant" else 0
    return LambdaLR(optimizer, lambda k: factor(k + 1) if k < warmup else factor(k))
