"""The distributed facts of one training process (rank, world size, device) as one small frozen value.

Owns starting and ending the process group and rank-0 printing. Everything else receives a `DistInfo`
instead of reading environment variables or global state. The rule is fixed, not configurable: CUDA + NCCL
when a GPU is visible, CPU + gloo otherwise. A process started by torchrun reads torchrun's variables; one
started by SLURM's `srun` (one task per GPU) reads SLURM's and needs MASTER_ADDR/MASTER_PORT; a plain
process with neither is a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from minitrain.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun's or SLURM's variables; (0, 0, 1, 1) alone."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            world,
            int(env.get("LOCAL_WORLD_SIZE", world)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = int(env["SLURM_NTASKS"])
        # SLURM_NTASKS_PER_NODE may read "8(x2)"; the tasks on this node are what SLURM_STEP_TASKS_PER_NODE says
        per_node = env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0]
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, int(per_node)
    return 0, 0, 1, 1


def init_distributed() -> DistInfo:
    """Join the process group described by the environment; gloo + CPU without CUDA, NCCL + CUDA with it."""
    rank, local_rank, world, local_world = ranks_from_env(os.environ)
    if "RANK" not in os.environ:  # SLURM or a lone process: give torch.distributed the variables it reads
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise UserError(
                "running under srun with several tasks but MASTER_ADDR is not set; export "
                "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and MASTER_PORT=29500"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if world == 1 else "29500")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30)
        )
    return DistInfo(rank, local_rank, world, local_world, device, backend)


def close_distributed(*, synchronize: bool = False) -> None:
    """Leave the process group (safe to call when none was started, or twice).

    `synchronize` waits for every rank first: a rank that tears down its gloo context while a peer still
    finishes the last collective can abort the peer ("terminate called without an active exception",
    seen once in four 2-rank runs). Only on the success path: after a failure a barrier could hang.
    """
    if torch_dist.is_initialized():
        if synchronize and torch_dist.get_world_size() > 1:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


class PeerFailed(UserError):
    """This rank stopped because another one failed; that rank's own message says why."""


def stop_if_any_rank_failed(dist: DistInfo, error: BaseException | None, *, stage: str) -> None:
    """Collective: every rank says whether its part of `stage` failed; a failure anywhere stops them all.

    The failing rank re-raises its own error (a `UserError` is its one line, anything else its traceback);
    the others raise `PeerFailed` (one line) instead of blocking in the next collective until the dead
    peer's connection drops and gloo/NCCL print a traceback of their own.
    """
    failed = int(error is not None)
    if dist.world_size > 1:
        flag = torch.tensor([failed], dtype=torch.int64, device=dist.device)
        torch_dist.all_reduce(flag)
        failed = int(flag.item())
    if error is not None:
        raise error
    if failed:
        raise PeerFailed(f"stopped while {stage}: {failed} other rank(s) failed; their message says why")


def is_peer_loss(err: BaseException) -> bool:
    """True for the errors a collective raises when a peer process died: NCCL's and the network's error
    types, and gloo's plain RuntimeError about its connection."""
    if isinstance(err, (torch_dist.DistBackendError, torch_dist.DistNetworkError)):
        return True
    gloo = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in gloo)


def print0(dist: DistInfo, *args: object) -> None:
    """`print` on rank 0 only, flushed (torchrun pipes may buffer)."""
    if dist.is_main:
        print(*args, flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
