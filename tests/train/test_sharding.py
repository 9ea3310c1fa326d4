"""FSDP2 under a real `torchrun --nproc-per-node 2` (gloo, CPU) against one unsharded process.

The worker (tests/train/sharding_worker.py) checks, for FULL_SHARD, SHARD_GRAD_OP (+ activation
checkpointing), NO_SHARD and HYBRID_SHARD: rank 0 loads / rank 1 builds on meta and the broadcast gives the
saved weights exactly; the world-size-scaled loss and the gathered gradients equal a single-process run.
Untied embedding and lm_head are FSDP2 units of their own. Then NO_SHARD over two minibatches per rank: no
all-reduce before the last one (FSDP2's `set_requires_all_reduce(False)`), the same gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_config

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharding_worker.py")


@pytest.mark.slow
def test_two_ranks_match_one_process_tied_and_untied(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    models = {"untied": False, "tied": True}  # one torchrun launch checks both (imports dominate its cost)
    for name, tied in models.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=tied)).save_pretrained(
            tmp_path / name
        )
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), *(str(tmp_path / name) for name in models)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name in models:
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HSDP accumulation"):
            assert f"OK {name} {strategy} " in proc.stdout, out[-6000:]
