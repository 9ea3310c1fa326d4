"""The optimizer and the learning-rate schedule.

AdamW with betas (0.9, 0.95) and eps 1e-8 by default (`--beta1`, `--beta2`, `--eps`; the pretraining/SFT
standard for LLMs, and mini_trainer's choice), fused on GPU. Weight decay applies to matrices only (norm
scales and biases, the 1-D parameters, are not decayed); the default decay is 0. Schedules come from
`transformers.get_scheduler`, so their shapes are the ones users know from the Trainer, with one change: the
warm-up is shifted by one step, so step s of W warm-up steps trains at s/W of the peak rate (step 1 at 1/W,
step W at the peak), as torchtitan's warm-up does. The Trainer's own schedule gives step 1 a rate of exactly
0: a step that moves no weight. A schedule's own arguments (cosine's `num_cycles`) come from
`--lr-scheduler-kwargs`. Trade-off: no per-layer learning rates or optimizer choice; one value each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


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


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    num_warmup_steps: int,
    num_training_steps: int | None,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> LRScheduler:
    """`transformers.get_scheduler(name, ...)` with its warm-up shifted by one step (the module docstring).

    Decaying schedules need the number of training steps. Scheduler index k (0-based) is step k + 1: during
    the warm-up (k < W) it takes the Trainer's factor of k + 1, so (k + 1) / W, never 0; after it, the
    Trainer's factor of k unchanged (the decay still ends at `num_training_steps`).
    """
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    kwargs = {} if name == "constant" else {"num_warmup_steps": num_warmup_steps}
    if name in ("cosine", "linear"):
        kwargs["num_training_steps"] = num_training_steps
    trainer = get_scheduler(name, optimizer, scheduler_specific_kwargs=scheduler_kwargs or None, **kwargs)
    if name == "constant" or num_warmup_steps == 0:
        return trainer
    factor = trainer.lr_lambdas[0]
    warmup = num_warmup_steps
    for group in optimizer.param_groups:  # undo the Trainer's step-0 rate: LambdaLR starts from initial_lr
        group["lr"] = group["initial_lr"]
    return LambdaLR(optimizer, lambda k: factor(k + 1) if k < warmup else factor(k))
