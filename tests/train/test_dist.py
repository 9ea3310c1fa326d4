"""The distributed helpers: the process group's backend, SLURM's layout, the GPU of a process, agreeing on a
failure, and recognising a lost peer (2 real ranks: test_adapter_runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from minitrain.errors import UserError
from minitrain.train.dist import (
    DistInfo,
    cuda_index,
    is_peer_loss,
    process_group_backend,
    ranks_from_env,
    stop_if_any_rank_failed,
)

ONE = DistInfo(0, 0, 1, 1, torch.device("cpu"), "gloo")


def test_a_lone_rank_re_raises_its_own_failure_and_passes_otherwise():
    stop_if_any_rank_failed(ONE, None, stage="loading")
    with pytest.raises(UserError, match="bad weights"):
        stop_if_any_rank_failed(ONE, UserError("bad weights"), stage="loading")
    with pytest.raises(KeyError):  # not only user errors: a bug keeps its own type and traceback
        stop_if_any_rank_failed(ONE, KeyError("x"), stage="loading")


@pytest.mark.parametrize(
    "err, lost",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2957"), True),
        (RuntimeError("[gloo] Connection reset by peer"), True),
        (torch_dist.DistBackendError("NCCL communicator was aborted"), True),
        (RuntimeError("size mismatch for weight"), False),
        (ValueError("Connection closed by peer"), False),
    ],
)
def test_peer_loss_is_told_from_other_errors(err, lost):
    assert is_peer_loss(err) is lost


def _all_reduce_cpu_tensor_in(backend: str, store: Path) -> None:
    """Start a world of one with `backend`, all-reduce a CPU tensor (what clip_grad_norm_ does under
    --cpu-offload), and leave the group."""
    torch_dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        t = torch.ones(2)
        torch_dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    finally:
        torch_dist.destroy_process_group()


def test_a_group_without_a_cpu_backend_cannot_reduce_cpu_tensors(tmp_path: Path):
    # the --cpu-offload crash of an NCCL-only group, reproduced on the CPU: gloo registered for CUDA only
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        _all_reduce_cpu_tensor_in("cuda:gloo", tmp_path / "store")


def test_the_gpu_group_also_reduces_cpu_tensors(tmp_path: Path):
    backend = process_group_backend("cuda")
    assert backend == "cpu:gloo,cuda:nccl"
    # NCCL cannot start without a GPU: the same composite group with gloo standing in for NCCL on CUDA
    _all_reduce_cpu_tensor_in(backend.replace("cuda:nccl", "cuda:gloo"), tmp_path / "store")
    assert process_group_backend("cpu") == "gloo"
    _all_reduce_cpu_tensor_in("gloo", tmp_path / "store2")


@pytest.mark.parametrize(
    "env, local_world",
    [
        ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 4),
        ({"SLURM_TASKS_PER_NODE": "4(x2)"}, 4),  # no --ntasks-per-node: the job's layout
        ({"SLURM_STEP_TASKS_PER_NODE": "4,4", "SLURM_TASKS_PER_NODE": "8(x2)"}, 4),  # the step's layout wins
        ({"SLURM_TASKS_PER_NODE": "3(x2),2"}, None),  # uneven nodes: no per-node size to shard in
        ({}, None),  # nothing said, several nodes possible
        ({"SLURM_NNODES": "1"}, 8),  # one node: every task is on it
    ],
)
def test_slurm_processes_per_node(env, local_world):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", **env}
    assert ranks_from_env(env) == (5, 1, 8, local_world)


def test_hybrid_shard_refuses_an_unknown_node_size():
    from minitrain.train.model import _mesh

    dist = DistInfo(0, 0, 8, None, torch.device("cpu"), "gloo")
    with pytest.raises(UserError, match="HYBRID_SHARD needs the processes per node.*--ntasks-per-node"):
        _mesh(dist, "HYBRID_SHARD")


def test_one_gpu_per_task_is_cuda_0_whatever_the_local_rank():
    assert cuda_index(5, 1) == 0  # srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds one GPU
    assert cuda_index(5, 8) == 5  # torchrun: every process sees the node's GPUs
    with pytest.raises(UserError, match="local rank 8 has no GPU: this process sees 4 GPUs"):
        cuda_index(8, 4)
