"""minitrain/train/optim.py: the warm-up's first step trains (lr/W, not 0); after it, the Trainer's shapes."""

from __future__ import annotations

import math

import pytest
import torch

from minitrain.train.optim import build_optimizer, build_scheduler, trainer_factor


def _rates(name: str, warmup: int, total: int | None, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, name=name, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step is taken with
        assert scheduler.get_last_lr()[0] == rates[-1]
        optimizer.step()
        scheduler.step()
    return rates


def _reference(name: str, warmup: int, total: int, step: int) -> float:
    """Step `step` (1-based), written out by hand: s/W during the warm-up, then the usual decay from the
    peak."""
    if name != "constant" and step <= warmup:
        return step / warmup
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - 1 - warmup) / (total - warmup)
    return max(0.0, 1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_rates_match_the_schedule_written_by_hand(name: str, warmup: int):
    total = 10
    assert _rates(name, warmup, total, total) == pytest.approx(
        [_reference(name, warmup, total, s) for s in range(1, total + 1)], abs=1e-12
    )


def test_no_step_trains_at_rate_zero():
    for name in ("constant_with_warmup", "cosine", "linear"):
        rates = _rates(name, 4, 10, 10)
        assert rates[0] == pytest.approx(0.25) and min(rates) > 0, name
        assert rates[3] == pytest.approx(1.0), name  # the peak at step W


def test_betas_and_eps_are_adams_written_by_hand():
    """Three steps of build_optimizer(betas, eps) against Adam's update written out (no weight decay)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = param
    b1, b2, eps, lr = 0.5, 0.7, 1e-2, 0.1
    optimizer = build_optimizer(
        model, learning_rate=lr, weight_decay=0.0, device=torch.device("cpu"), betas=(b1, b2), eps=eps
    )
    ref, m, v = param.detach().clone(), torch.zeros_like(param), torch.zeros_like(param)
    for t in range(1, 4):
        grad = torch.randn_like(param)
        param.grad = grad.clone()
        optimizer.step()
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        ref = ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        assert torch.allclose(param.detach(), ref, atol=1e-12), t


def test_scheduler_kwargs_reach_the_schedule():
    """cosine with num_cycles=1: a full cosine period over the run (down to 0 half-way, back up)."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(
        optimizer,
        name="cosine",
        num_warmup_steps=0,
        num_training_steps=8,
        scheduler_kwargs={"num_cycles": 1.0},
    )
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    reference = [max(0.0, 0.5 * (1 + math.cos(2 * math.pi * k / 8))) for k in range(8)]
    assert rates == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("name", ["constant_with_warmup", "cosine", "linear", "constant"])
def test_the_factors_are_the_trainers_exactly(name: str):
    """trainer_factor against transformers' own get_scheduler, at every index past the end: == not approx."""
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(2))
    for warmup, total, cycles in [
        (0, 10, 0.5),
        (1, 10, 0.5),
        (4, 10, 0.5),
        (3, 7, 1.0),
        (5, 5, 0.25),
        (7, 97, 2.5),
    ]:
        kwargs = {} if name == "constant" else {"num_warmup_steps": warmup}
        if name in ("cosine", "linear"):
            kwargs["num_training_steps"] = total
        specific = {"num_cycles": cycles} if name == "cosine" else None
        optimizer = torch.optim.AdamW([param], lr=1.0)
        trainer = get_scheduler(name, optimizer, scheduler_specific_kwargs=specific, **kwargs).lr_lambdas[0]
        ours = trainer_factor(name, warmup, total, **(specific or {}))
        assert [ours(k) for k in range(total + 3)] == [float(trainer(k)) for k in range(total + 3)], (
            warmup,
            total,
            cycles,
        )


def test_building_a_schedule_imports_neither_peft_nor_bitsandbytes():
    """The schedule is built without transformers.optimization (it imports PEFT and bitsandbytes: 2.7 CPU-s
    per rank); a subprocess, since this test process may have imported them already."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from minitrain.train.optim import build_scheduler\n"
        "opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)\n"
        "build_scheduler(opt, name='cosine', num_warmup_steps=2, num_training_steps=5)\n"
        "names = ('peft', 'bitsandbytes', 'transformers.optimization')\n"
        "print(sorted(m for m in names if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
