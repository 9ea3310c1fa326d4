"""torchrun worker for tests/train/test_sharding.py: FSDP2 on 2 CPU ranks (gloo) against one unsharded
process.

Usage: torchrun --standalone --nproc-per-node 2 tests/train/sharding_worker.py MODEL_DIR [MODEL_DIR ...]
Each MODEL_DIR holds a tiny Llama saved by the test (tied embeddings or not); one launch checks them all
(a torchrun launch costs far more than the checks). For every model and sharding configuration:
rank 0 loads the weights, rank 1 builds on meta, `shard_model` broadcasts; the gathered weights must equal
the saved ones exactly; each rank trains its own packed minibatch; the summed scaled loss and the gathered
gradients must equal a single-process run of the unsharded model on both minibatches. Prints "OK <model
folder name> <strategy> ..." per model and configuration and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from minitrain.train.attention import register_packed_attention  # noqa: E402
from minitrain.train.dist import close_distributed, init_distributed  # noqa: E402
from minitrain.train.loss import scale_for_fsdp  # noqa: E402
from minitrain.train.model import CausalLMWithLoss, load_model, shard_model  # noqa: E402
from tests.train.test_model import grads, make_samples, pack  # noqa: E402

CONFIGS = [  # (strategy, activation checkpointing)
    ("FULL_SHARD", False),
    ("SHARD_GRAD_OP", True),
    ("NO_SHARD", False),
    ("HYBRID_SHARD", False),
]


def main(model_dirs: list[str]) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    assert dist.world_size == 2 and dist.backend == "gloo"
    register_packed_attention()
    for model_dir in model_dirs:
        check_model(model_dir, dist)
    close_distributed(synchronize=True)  # both ranks done before gloo is torn down (else a peer can abort)


def check_model(model_dir: str, dist) -> None:
    """Every sharding configuration of one saved model against its single-process reference."""
    # two minibatches of different sizes (one per rank); the global normaliser counts both
    samples = [make_samples([9, 4, 11], seed=1), make_samples([6, 14], seed=2)]
    batches = [pack(s) for s in samples]
    global_tokens = sum(b.num_loss_tokens for b in batches)

    # the single-process reference, computed identically on every rank
    ref_lm = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="minitrain_packed")
    ref = CausalLMWithLoss(ref_lm, use_liger=False, chunk_size=8)
    ref_loss = sum(ref(b) for b in batches) / global_tokens
    ref_loss.backward()
    want = grads(ref_lm)
    want_state = ref_lm.state_dict()

    for strategy, ac in CONFIGS:
        lm = load_model(model_dir, from_scratch=False, dtype=torch.float32, dist=dist)
        assert all(p.is_meta for p in lm.parameters()) == (not dist.is_main)
        model = shard_model(
            CausalLMWithLoss(lm, use_liger=False, chunk_size=8),
            dist=dist,
            strategy=strategy,
            mixed_precision=False,
            master_dtype=torch.float32,
            cpu_offload=False,
            activation_checkpointing=ac,
        )
        # untied embedding and lm_head are FSDP2 units of their own; a tied one is the root's
        from torch.distributed.fsdp import FSDPModule

        untied = not lm.config.tie_word_embeddings
        assert isinstance(lm.get_output_embeddings(), FSDPModule) is untied, strategy
        assert isinstance(lm.get_input_embeddings(), FSDPModule) is untied, strategy
        # weights: rank 0's checkpoint, exactly, gathered back from the shards
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main:
            full = {k.removeprefix("lm."): v for k, v in full.items()}
            assert full.keys() == want_state.keys(), (strategy, set(full) ^ set(want_state))
            for k, v in want_state.items():
                assert torch.equal(full[k], v), (strategy, "weights", k)
        for (name, a), (_, b) in zip(ref_lm.named_buffers(), lm.named_buffers(), strict=True):
            assert torch.equal(a, b), (strategy, "buffer", name)

        # one minibatch per rank; the loss scaled to undo FSDP2's gradient averaging
        loss_sum = model(batches[dist.rank])
        scale_for_fsdp(loss_sum, global_tokens, dist.world_size).backward()
        total = loss_sum.detach().clone()
        torch_dist.all_reduce(total)
        got = grads(model)  # full_tensor(): gathered over ranks
        mean = (total / global_tokens).item()
        assert abs(mean - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()), (strategy, mean, ref_loss.item())
        assert got.keys() == want.keys(), (strategy, set(got) ^ set(want))
        worst = max(
            ((got[n] - want[n]).abs().max().item() / max(want[n].abs().max().item(), 1e-12), n) for n in want
        )
        assert worst[0] <= 1e-5, (strategy, "grad", worst)
        if dist.is_main:
            name = os.path.basename(model_dir.rstrip("/"))
            print(f"OK {name} {strategy} ac={ac} loss={mean:.6f} worst_grad_rel={worst[0]:.1e}", flush=True)
    check_hsdp_accumulation(dist, model_dir, samples, global_tokens, want)


def check_hsdp_accumulation(dist, model_dir: str, samples, global_tokens: int, want) -> None:
    """NO_SHARD (HSDP with shards of one rank) over 2 minibatches per rank: the first backward keeps its
    gradient in FSDP2's partial reduction (no all-reduce, no .grad yet), the last all-reduces the sum once;
    the gradients equal the single-process reference all the same."""
    lm = load_model(model_dir, from_scratch=False, dtype=torch.float32, dist=dist)
    model = shard_model(
        CausalLMWithLoss(lm, use_liger=False, chunk_size=8), dist=dist, strategy="NO_SHARD",
        mixed_precision=False, master_dtype=torch.float32, cpu_offload=False, activation_checkpointing=False,
    )  # fmt: skip
    assert model.hsdp
    mine = samples[dist.rank]
    halves = [pack(mine[:1]), pack(mine[1:])]
    for m, batch in enumerate(halves):
        loss_sum = model(batch)
        model.prepare_backward(last_minibatch=m == len(halves) - 1)
        scale_for_fsdp(loss_sum, global_tokens, dist.world_size).backward()
        if m == 0:
            assert all(p.grad is None for p in model.parameters()), "all-reduced before the last minibatch"
    got = grads(model)
    worst = max(
        ((got[n] - want[n]).abs().max().item() / max(want[n].abs().max().item(), 1e-12), n) for n in want
    )
    assert worst[0] <= 1e-5, ("NO_SHARD accumulation", "grad", worst)
    if dist.is_main:
        print(
            f"OK {os.path.basename(model_dir.rstrip('/'))} HSDP accumulation worst_grad_rel={worst[0]:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
