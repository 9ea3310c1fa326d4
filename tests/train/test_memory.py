"""The memory model against what can be counted by hand and published figures (measured peaks on the CPU:
benchmarks/bench_memory.py)."""

from __future__ import annotations

import pytest

from minitrain.data.dryrun import model_shape
from minitrain.train.memory import GIB, RankPlan, estimate_peak, fits

LLAMA_8B = {  # meta-llama/Llama-3.1-8B config.json
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "model_type": "llama",
}  # fmt: skip
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64}  # fmt: skip


def test_llama_8b_shape_and_activations_per_token_and_layer():
    shape = model_shape(LLAMA_8B)
    assert shape.num_params == pytest.approx(8.03e9, rel=1e-3)  # the published parameter count
    # measured on the CPU at Llama-3.1-8B sizes in bf16 with the packed attention (issue 17): ~197 KiB
    assert shape.activation_bytes_per_token_layer(2) / 1024 == pytest.approx(197, rel=0.05)


def test_sharded_state_is_16_bytes_a_parameter_with_fp32_master_weights():
    # ZeRO (Rajbhandari et al. 2020, sec. 3.1): mixed-precision Adam holds 16 bytes a parameter; FSDP2 with
    # fp32 master weights holds the same (4 weights + 4 grads + 8 AdamW), divided by the ranks
    shape = model_shape(LLAMA_8B)
    est = estimate_peak(shape, RankPlan(tokens=1, shards=8, checkpointing=True))
    state = est.parts["weights"] + est.parts["optimizer"] + shape.num_params * 4 // 8
    assert state == pytest.approx(16 * shape.num_params / 8, rel=1e-6)


def test_the_default_plan_does_not_fit_an_80_gb_gpu_and_checkpointing_does():
    shape = model_shape(LLAMA_8B)
    plain = estimate_peak(shape, RankPlan(tokens=16384, shards=8))
    assert plain.parts["activations"] / GIB == pytest.approx(102, rel=0.02)  # 204 KiB x 32 layers x 16k
    assert not fits(shape, RankPlan(tokens=16384, shards=8), 80 * 10**9)
    assert fits(shape, RankPlan(tokens=16384, shards=8, checkpointing=True), 80 * 10**9)


def test_70b_on_one_8x80_gb_node_needs_cpu_offload():
    shape = model_shape(LLAMA_70B)
    gpu = 80 * 10**9
    assert not fits(shape, RankPlan(tokens=4096, shards=8, checkpointing=True), gpu)  # 16 B/param / 8 > 80 GB
    assert fits(shape, RankPlan(tokens=16384, shards=8, checkpointing=True, cpu_offload=True), gpu)
    # bf16 master weights halve the state (8 B/param: 66 GiB a rank) but leave no room to train in
    assert not fits(shape, RankPlan(tokens=4096, shards=8, checkpointing=True, master_bytes=2), gpu)


def test_offload_moves_the_sharded_state_to_host_memory():
    shape = model_shape(LLAMA_70B)
    on_gpu = estimate_peak(shape, RankPlan(tokens=4096, shards=8, checkpointing=True))
    offloaded = estimate_peak(shape, RankPlan(tokens=4096, shards=8, checkpointing=True, cpu_offload=True))
    assert offloaded.parts["host_optimizer"] == on_gpu.parts["optimizer"]
    assert "optimizer" not in offloaded.parts and offloaded.total < on_gpu.total / 4
    assert offloaded.peak_at != "optimizer step"  # the step runs on the host's copies


def test_activations_grow_with_tokens_and_checkpointing_keeps_only_block_inputs():
    shape = model_shape(LLAMA_8B)
    a = [estimate_peak(shape, RankPlan(tokens=t, shards=8)).parts["activations"] for t in (4096, 8192)]
    assert a[1] == 2 * a[0]
    ac = estimate_peak(shape, RankPlan(tokens=8192, shards=8, checkpointing=True)).parts["activations"]
    assert ac < a[1] / 8


def test_lora_trains_and_stores_only_the_adapter():
    shape = model_shape(LLAMA_8B)
    est = estimate_peak(shape, RankPlan(tokens=4096, shards=8, checkpointing=True, trainable_params=10**7))
    assert est.parts["optimizer"] == 2 * 4 * 10**7 // 8
    assert est.parts["weights"] == (shape.num_params + 10**7) * 4 // 8  # the frozen base + the adapter
