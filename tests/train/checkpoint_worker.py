"""torchrun worker for tests/train/test_checkpoint.py and test_faults.py: the real engine pieces, a loop step
like minitrain.train.loop's, and `save_training_state` / `load_training_state` / `StopFlag` around them.

Usage: torchrun --standalone --nproc-per-node N tests/train/checkpoint_worker.py MODE RUN_DIR
RUN_DIR holds model/ (a tiny Llama config) and data.jsonl (tokenized), written by the test.

  train   6 steps from scratch (seed 0); training state saved after steps 1, 2, 3 with keep_last=2; after step
          3 the full model/optimizer state and RNG draws go to ref/ (rank 0: ref.pt; each rank: rng_<r>.json);
          losses of all 6 steps to losses_train.json.
  resume  a model initialised differently (seed 7), then `load_training_state(find_latest_checkpoint)`; the
          full state must equal ref.pt exactly, RNG draws equal ref/ (same world size); steps 4-6 to
          losses_resume_w<N>.json. With `crash` as a third argument, a last save dies (os._exit(17)) after the
          shards are written and before the folder is sealed and renamed.
  stop    train until SIGINT/SIGTERM (StopFlag), then save and exit with 128+signal; rank 0 writes the step
          to progress.txt after every step, every rank writes stopped_<r>.json.
  hang    no model: all_reduce in a loop (StopFlag installed, as in a real worker); each rank writes its pid
          to pid_<r>.txt. The test SIGKILLs one rank.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from minitrain.errors import signal_exit_code
from minitrain.rundir import find_latest_checkpoint
from minitrain.train.checkpoint import load_training_state, save_training_state
from minitrain.train.dist import DistInfo, close_distributed, init_distributed
from minitrain.train.faults import StopFlag, check_finite, die_with_parent

BATCH_SIZE = 4  # global batch (samples per optimizer step)
MAX_TOKENS = 48  # per rank per minibatch: several minibatches per step, packed differently on 1 and 2 ranks
STEPS = 6
SAVE_STEPS = (1, 2, 3)
KEEP_LAST = 2


def build(run_dir: Path, dist: DistInfo, init_seed: int):
    """Store, sharded model, optimizer, schedule and sampler, as minitrain.train.worker builds them."""
    from minitrain.data.sampler import InfiniteSampler
    from minitrain.data.store import TokenStore
    from minitrain.train.model import CausalLMWithLoss, load_model, shard_model
    from minitrain.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(init_seed)
    store = TokenStore.open(run_dir / "data.jsonl")
    lm = load_model(run_dir / "model", from_scratch=True, dtype=torch.float32, dist=dist)
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False, chunk_size=16),
        dist=dist,
        strategy="FULL_SHARD",
        mixed_precision=False,
        master_dtype=torch.float32,
        cpu_offload=False,
        activation_checkpointing=False,
    )
    optimizer = build_optimizer(model, learning_rate=3e-3, weight_decay=0.1, device=dist.device)
    scheduler = build_scheduler(optimizer, name="cosine", num_warmup_steps=2, num_training_steps=STEPS)
    sampler = InfiniteSampler(num_samples=len(store), seed=5)
    return store, model, optimizer, scheduler, sampler


def train_step(model, optimizer, scheduler, store, sampler, dist: DistInfo, step: int) -> dict:
    """One optimizer step over a global batch (the loop's recipe); returns the global mean token loss."""
    from minitrain.data.batch import collate, count_loss_tokens
    from minitrain.data.packing import plan_minibatches
    from minitrain.train.loss import scale_for_fsdp

    indices = sampler.next_batch(BATCH_SIZE)
    lengths = store.lengths[indices].tolist()
    plan = plan_minibatches(lengths, MAX_TOKENS, dist.world_size)
    trained = [indices[i] for minibatch in plan for ranks in minibatch for i in ranks]
    global_tokens = count_loss_tokens(store, trained)
    loss_sum = torch.zeros(())
    for minibatch in plan:
        loss = model(collate(store, [indices[i] for i in minibatch[dist.rank]]))
        scale_for_fsdp(loss, global_tokens, dist.world_size).backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if dist.world_size > 1:
        torch_dist.all_reduce(loss_sum)
    loss = loss_sum.item() / global_tokens
    check_finite(loss, norm, step)  # before the optimizer step: no NaN reaches the weights
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "samples": len(trained), "tokens": int(sum(lengths))}


def advance(counters: dict, step: int, out: dict) -> dict:
    """The counters after `step`, whose `train_step` returned `out`."""
    return {
        "step": step,
        "samples_seen": counters["samples_seen"] + out["samples"],
        "tokens_seen": counters["tokens_seen"] + out["tokens"],
    }


def full_state(model, optimizer) -> dict:
    """Full model and optimizer state on rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def rng_draws() -> list[float]:
    return [*torch.rand(3).tolist(), random.random(), float(np.random.rand())]


def assert_same(a, b, where: str) -> None:
    """Exact equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def run_train(run_dir: Path, dist: DistInfo) -> None:
    store, model, optimizer, scheduler, sampler = build(run_dir, dist, init_seed=0)
    counters = {"step": 0, "samples_seen": 0, "tokens_seen": 0}
    losses = []
    for step in range(1, STEPS + 1):
        out = train_step(model, optimizer, scheduler, store, sampler, dist, step)
        losses.append(out["loss"])
        counters = advance(counters, step, out)
        if step in SAVE_STEPS:
            save_training_state(
                run_dir, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                counters=counters, dist=dist, keep_last=KEEP_LAST,
            )  # fmt: skip
        if step == SAVE_STEPS[-1]:
            ref = full_state(model, optimizer)
            (run_dir / "ref").mkdir(exist_ok=True)
            if dist.is_main:
                extra = {
                    "scheduler": scheduler.state_dict(),
                    "sampler": sampler.state_dict(),
                    "counters": counters,
                }
                torch.save({**ref, **extra}, run_dir / "ref" / "ref.pt")
            write_json(run_dir / "ref" / f"rng_{dist.rank}.json", rng_draws())
    if dist.is_main:
        write_json(run_dir / "losses_train.json", losses)


def run_resume(run_dir: Path, dist: DistInfo, crash: bool) -> None:
    store, model, optimizer, scheduler, sampler = build(run_dir, dist, init_seed=7)
    checkpoint = find_latest_checkpoint(run_dir)
    assert checkpoint is not None
    sampler_state, counters = load_training_state(
        checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist
    )
    draws = rng_draws()
    sampler = type(sampler).from_state_dict(sampler_state)
    state = full_state(model, optimizer)
    if dist.is_main:
        ref = torch.load(run_dir / "ref" / "ref.pt", weights_only=False)
        assert_same(ref["model"], state["model"], "model")
        assert_same(ref["optim"], state["optim"], "optim")
        assert_same(ref["scheduler"], scheduler.state_dict(), "scheduler")
        assert_same(ref["sampler"], sampler.state_dict(), "sampler")
        assert_same(ref["counters"], counters, "counters")
    losses = []
    for step in range(counters["step"] + 1, STEPS + 1):
        out = train_step(model, optimizer, scheduler, store, sampler, dist, step)
        losses.append(out["loss"])
        counters = advance(counters, step, out)
    result = {"checkpoint": checkpoint.name, "losses": losses, "state_equal": True}
    write_json(run_dir / f"resume_w{dist.world_size}_rank{dist.rank}.json", {**result, "rng": draws})
    if crash:
        import minitrain.train.checkpoint as state_module

        def die(*_args: object) -> None:  # the machine goes down after the shards, before seal + rename
            os._exit(17)

        state_module._publish = die
        save_training_state(
            run_dir, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
            counters=counters, dist=dist,
        )  # fmt: skip


def run_stop(run_dir: Path, dist: DistInfo) -> int:
    die_with_parent()
    store, model, optimizer, scheduler, sampler = build(run_dir, dist, init_seed=0)
    counters = {"step": 0, "samples_seen": 0}
    with StopFlag(announce=dist.is_main) as stop:
        for step in range(1, 10_000):
            out = train_step(model, optimizer, scheduler, store, sampler, dist, step)
            counters = {"step": step, "samples_seen": counters["samples_seen"] + out["samples"]}
            if dist.is_main:
                (run_dir / "progress.txt").write_text(str(step))
            if stop.should_stop(dist):
                path = save_training_state(
                    run_dir, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                    counters=counters, dist=dist,
                )  # fmt: skip
                write_json(
                    run_dir / f"stopped_{dist.rank}.json",
                    {
                        "step": step,
                        "exit_code": signal_exit_code(stop.agreed) if stop.agreed else 0,
                        "received": stop.received,
                        "checkpoint": path.name,
                    },
                )
                return signal_exit_code(stop.agreed) if stop.agreed else 0
    return 1


def run_hang(run_dir: Path, dist: DistInfo) -> int:
    die_with_parent()
    (run_dir / f"pid_{dist.rank}.txt").write_text(str(os.getpid()))
    with StopFlag(announce=False) as stop:
        x = torch.ones(4)
        while not stop.should_stop(dist):
            torch_dist.all_reduce(x)
            time.sleep(0.01)
    return signal_exit_code(stop.agreed) if stop.agreed else 0


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode, run_dir = argv[0], Path(argv[1])
    dist = init_distributed()
    finished = False
    try:
        if mode == "train":
            run_train(run_dir, dist)
        elif mode == "resume":
            run_resume(run_dir, dist, crash="crash" in argv[2:])
        elif mode == "stop":
            return run_stop(run_dir, dist)
        elif mode == "hang":
            return run_hang(run_dir, dist)
        else:
            raise SystemExit(f"unknown mode {mode}")
        finished = True
    finally:
        # as the real worker does: on success every rank waits for the others before tearing down gloo (a
        # rank that leaves while a peer still finishes the last collective can abort it: "terminate called
        # without an active exception", seen in CI in the 2-rank resume)
        close_distributed(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
