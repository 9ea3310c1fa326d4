"""The distributed facts of one training process (rank, world size, device) as one small frozen value.

Owns starting and ending the process group and rank-0 printing. Everything else receives a `DistInfo`
instead of reading environment variables or global state. The rule is fixed, not configurable: with a GPU
visible, CUDA tensors go through NCCL and CPU tensors through gloo, in one group (`cpu:gloo,cuda:nccl`:
`--cpu-offload` keeps gradients on the CPU, so `clip_grad_norm_` all-reduces CPU tensors, which an NCCL-only
group refuses with "No backend type associated with device type cpu"); without one, CPU + gloo. A process
started by torchrun reads torchrun's variables; one started by SLURM's `srun` reads SLURM's and needs
MASTER_ADDR/MASTER_PORT; a plain process with neither is a world of one. Under `srun --gpus-per-task=1` a
task sees one GPU, which is cuda:0 whatever its SLURM_LOCALID.
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
    local_world_size: int | None  # processes on this node; None: SLURM did not say (HYBRID_SHARD refuses)
    device: torch.device
    backend: str  # "cpu:gloo,cuda:nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str]) -> tuple[int, int, int, int | None]:
    """(rank, local_rank, world_size, local_world_size) from torchrun's or SLURM's variables; (0, 0, 1, 1)
    alone.

    Under SLURM the processes on this node come from the step's layout (SLURM_STEP_TASKS_PER_NODE, else
    SLURM_TASKS_PER_NODE, e.g. "8(x2)"; SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node). None when
    the layout is missing or uneven across nodes: there is then no honest "node" for HYBRID_SHARD.
    """
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
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, _slurm_tasks_per_node(env)
    return 0, 0, 1, 1


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int | None:
    """The tasks on every node when SLURM's layout says they are the same on all nodes, else None."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if name in env:
            # "4(x2),3" = 4 on each of two nodes, 3 on the third
            counts = {int(part.partition("(")[0]) for part in env[name].split(",")}
            return counts.pop() if len(counts) == 1 else None
    nodes = env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES"))
    return int(env["SLURM_NTASKS"]) if nodes == "1" else None


def cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of a process: its local rank among the visible GPUs, or the only one it sees.

    `srun --gpus-per-task=1` gives each task one GPU through CUDA_VISIBLE_DEVICES, so it is cuda:0 even when
    SLURM_LOCALID is 5.
    """
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise UserError(
            f"local rank {local_rank} has no GPU: this process sees {device_count} GPUs; "
            "start one process per GPU (torchrun --nproc-per-node, "
            "or srun --ntasks-per-node equal to the GPUs per node)"
        )
    return local_rank


def process_group_backend(device_type: str) -> str:
    """The process group's backend: NCCL for CUDA tensors plus gloo for CPU ones on a GPU, gloo on the CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed() -> DistInfo:
    """Join the process group described by the environment (see the module docstring for the backend rule)."""
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
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = process_group_backend(device.type)
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
