"""The distributed helpers: agreeing on a failure, and recognising a lost peer (2 real ranks: test_adapter_runs)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist

from minitrain.errors import UserError
from minitrain.train.dist import DistInfo, is_peer_loss, stop_if_any_rank_failed

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
