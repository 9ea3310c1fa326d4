"""The optimizer and the learning-rate schedule.

AdamW with betas (0.9, 0.95) - the pretraining/SFT standard for LLMs, and mini_trainer's choice - fused on
GPU. Weight decay applies to matrices only (norm scales and biases, the 1-D parameters, are not decayed);
the default decay is 0. Schedules come from `transformers.get_scheduler`, so their shapes are the ones users
know from the Trainer. Trade-off: no per-layer learning rates or optimizer choice; one value each.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

BETAS = (0.9, 0.95)


def build_optimizer(
    model: nn.Module, *, learning_rate: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; 1-D parameters get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=learning_rate,
        betas=BETAS,
        eps=1e-8,
        fused=device.type == "cuda",
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, num_warmup_steps: int, num_training_steps: int | None
) -> LRScheduler:
    """`transformers.get_scheduler(name, ...)`; decaying schedules need the number of training steps."""
    from transformers import get_scheduler

    kwargs = {} if name == "constant" else {"num_warmup_steps": num_warmup_steps}
    if name in ("cosine", "linear"):
        kwargs["num_training_steps"] = num_training_steps
    return get_scheduler(name, optimizer, **kwargs)
