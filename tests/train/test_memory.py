"""The memory model against what can be counted by hand and published figures (measured peaks on the CPU:
benchmarks/bench_memory.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from minitrain.errors import UserError
from minitrain.train.memory import GIB, RankPlan, estimate_peak, fit, fits, model_shape

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


# --- before spawning on GPUs: fit the plan to the device, or refuse with the flags that would fit


def test_a_plan_that_fits_is_left_alone_and_one_that_does_not_is_fitted():
    shape = model_shape(LLAMA_8B)
    plan = RankPlan(tokens=16384, shards=8)
    gpu = 80 * 10**9
    assert fit(shape, replace(plan, checkpointing=True), gpu, min_tokens=4096) == (
        replace(plan, checkpointing=True),
        None,
    )
    chosen, line = fit(shape, plan, gpu, min_tokens=4096)  # 120 GiB: checkpointing brings it to 25
    assert chosen == replace(plan, checkpointing=True)
    assert line.startswith(
        "minitrain: the plan needs ~120.3 GiB per GPU of 74.5 GiB; turning on --activation-"
    )


def test_the_budget_is_lowered_only_down_to_the_longest_sample():
    shape = model_shape(LLAMA_8B)
    plan = RankPlan(tokens=65536, shards=8, checkpointing=True)
    gpu = 40 * 10**9  # a 40 GB GPU: 65k tokens do not fit, 16k do
    chosen, line = fit(shape, plan, gpu, min_tokens=2000)
    assert (
        chosen.tokens == 16384
        and fits(shape, chosen, gpu)
        and not fits(shape, replace(chosen, tokens=32768), gpu)
    )
    assert "lowering --max-tokens-per-gpu from 65,536 to 16,384" in line
    with pytest.raises(
        UserError, match=r"still ~\d+\.\d GiB with .* longest sample's 40,000 tokens; it would fit with"
    ):
        fit(shape, plan, gpu, min_tokens=40000)


def test_a_plan_that_cannot_fit_is_refused_with_the_flags_that_would():
    shape = model_shape(LLAMA_70B)
    with pytest.raises(UserError, match="it would fit with --activation-checkpointing --cpu-offload"):
        fit(shape, RankPlan(tokens=4096, shards=8), 80 * 10**9, min_tokens=4096)
    with pytest.raises(UserError, match=r"add GPUs \(--nproc, --nnodes\) or use LoRA/QLoRA"):
        fit(shape, RankPlan(tokens=4096, shards=1), 8 * 10**9, min_tokens=4096)


def test_the_launcher_fits_a_training_config_to_a_faked_gpu(tmp_path, capsys):
    from minitrain.config import TrainConfig
    from minitrain.train.preflight import fit_to_gpus
    from tests.conftest import tiny_llama_config
    from tests.data.test_store import make_samples, write_tokenized

    tiny_llama_config(vocab_size=4096).save_pretrained(tmp_path / "model")
    data = write_tokenized(tmp_path / "train.jsonl", make_samples(20, seed=1, max_len=150))
    config = TrainConfig(
        data_path=data, model_name_or_path=str(tmp_path / "model"), output_dir=tmp_path / "out",
        max_tokens_per_gpu=65536,
    )  # fmt: skip
    assert fit_to_gpus(config, device_bytes=10 * 2**30) == config  # plenty: nothing changes
    assert capsys.readouterr().err == ""
    fitted = fit_to_gpus(config, device_bytes=60 * 2**20)  # a 60 MiB "GPU"
    assert (fitted.activation_checkpointing, fitted.max_tokens_per_gpu) != (False, 65536)
    err = capsys.readouterr().err
    assert err.startswith("minitrain: the plan needs ~") and err.count("\n") == 1
    with pytest.raises(UserError, match="MiB per GPU of 1.0 MiB"):
        fit_to_gpus(config, device_bytes=2**20)
