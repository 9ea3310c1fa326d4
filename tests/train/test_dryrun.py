"""Dry run: the report agrees with a direct replay of sampler + planner; stop rules, drops, JSON, memory,
errors.

The adapter memory estimate is checked against PEFT (trainable parameters of a real LoRA model), against
bitsandbytes (what an NF4 load quantizes and stores) and against hand arithmetic (bytes per rank).
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from rich.console import Console

from minitrain.data.packing import plan_minibatches
from minitrain.data.sampler import InfiniteSampler
from minitrain.errors import UserError
from minitrain.train.dryrun import dry_run, render_dry_run
from minitrain.train.memory import (
    NF4_BYTES_PER_WEIGHT,
    block_linear_weights,
    count_parameters,
    lora_parameters,
)
from tests.conftest import tiny_llama_config
from tests.data.test_store import make_samples, write_tokenized

REPO = Path(__file__).resolve().parents[2]


def run(path: Path, **overrides):
    kwargs = dict(
        data_path=path,
        batch_size=16,
        max_tokens_per_gpu=128,
        world_size=2,
        seed=7,
        max_steps=None,
        max_samples=None,
        max_epochs=None,
        model_name_or_path=None,
        report_path=None,
    )
    kwargs.update(overrides)
    return dry_run(**kwargs)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, list[dict]]:
    samples = make_samples(100, seed=11, max_len=150)
    return write_tokenized(tmp_path / "train.jsonl", samples), samples


def test_one_epoch_plan_matches_direct_replay(data: tuple[Path, list[dict]], tmp_path: Path) -> None:
    path, samples = data
    report = run(path, report_path=tmp_path / "plan.json")
    assert report.steps == report.steps_per_epoch == math.ceil(100 / 16)
    lengths = np.array([s["len"] for s in samples])
    sampler = InfiniteSampler(num_samples=100, seed=7)
    plan = orjson.loads((tmp_path / "plan.json").read_bytes())
    assert plan["summary"]["steps"] == report.steps
    minibatches = []
    for step in plan["steps"]:
        batch = sampler.next_batch(16)
        assert step["samples"] == batch
        expected = plan_minibatches(lengths[batch].tolist(), 128, 2)
        assert step["minibatches"] == [[[batch[i] for i in r] for r in mb] for mb in expected]
        assert step["trained_tokens"] == sum(
            sum(x != -100 for x in samples[i]["labels"][1:]) for i in batch if lengths[i] <= 128
        )
        minibatches.append(len(expected))
    assert report.minibatches_total == sum(minibatches)
    assert report.minibatches_per_step.max == max(minibatches)
    too_long = [i for i in range(100) if lengths[i] > 128]
    assert report.dropped_samples == len(too_long)
    assert [d["index"] for d in report.dropped] == too_long
    assert [d["source_line"] for d in report.dropped] == [i + 1 for i in too_long]
    assert 0 < report.utilization <= 1 and report.tokens_per_rank.max <= 128
    assert report.imbalance.min >= 1.0 and 0 < report.balance <= 1.0


def test_validation_split_plans_only_the_trained_samples(data: tuple[Path, list[dict]], tmp_path: Path):
    from minitrain.data.sampler import split_validation

    path, _ = data
    report = run(path, validation_split=0.2, max_epochs=2.0, report_path=tmp_path / "plan.json")
    trained, held_out = split_validation(100, 0.2, 7)
    assert report.steps_per_epoch == math.ceil(80 / 16) and report.steps == 10
    drawn = [
        i for step in orjson.loads((tmp_path / "plan.json").read_bytes())["steps"] for i in step["samples"]
    ]
    assert sorted(drawn) == sorted(trained.tolist() * 2)  # each trained sample once per epoch, none held out


def test_stop_rules(data: tuple[Path, list[dict]]) -> None:
    path, samples = data
    assert run(path, max_steps=3).steps == 3
    assert run(path, max_epochs=2.5).epochs >= 2.5
    assert run(path, max_epochs=2.5).steps == math.ceil(2.5 * 100 / 16)
    report = run(path, max_samples=40)
    fits = sum(s["len"] <= 128 for s in samples) / 100
    assert report.steps == pytest.approx(math.ceil(40 / (16 * fits)), abs=1)


def test_max_tokens_stops_at_the_step_that_reaches_them(data: tuple[Path, list[dict]], tmp_path: Path):
    path, _ = data
    long = run(path, max_steps=30, report_path=tmp_path / "plan.json")
    per_step = [
        sum(map(sum, step["tokens"])) for step in orjson.loads((tmp_path / "plan.json").read_bytes())["steps"]
    ]
    budget = sum(per_step[:7]) - 1  # reached during step 7
    assert run(path, max_tokens=budget).steps == 7
    assert run(path, max_tokens=sum(per_step[:7])).steps == 7  # reached exactly at the end of step 7
    assert run(path, max_tokens=sum(per_step[:6]) + 1).steps == 7
    assert long.steps == 30


def test_memory_estimate_counts_parameters_like_the_model(
    data: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    for tied in (False, True):
        config = tiny_llama_config(tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_config(config)
        assert count_parameters(config.to_dict()) == sum(p.numel() for p in model.parameters())
    model_dir = tmp_path / "model"
    tiny_llama_config().save_pretrained(model_dir)
    report = run(data[0], model_name_or_path=str(model_dir), world_size=4)
    rows = {(r["master_dtype"], r["strategy"]): r for r in report.memory["rows"]}
    n = report.memory["num_params"]
    assert rows["fp32", "NO_SHARD"]["total_gib"] == pytest.approx(16 * n / 1024**3)
    assert rows["bf16", "FULL_SHARD"]["total_gib"] == pytest.approx(8 * n / 4 / 1024**3)
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=120))
    assert "FULL_SHARD" in out.getvalue() and "dropped as too long" in out.getvalue()
    assert "full fine-tuning of" in out.getvalue()
    assert report.memory["mode"] == "full" and report.memory["trainable_params"] == n
    assert run(data[0], model_name_or_path=str(tmp_path / "nowhere")).memory is None


GIB = 1024**3
# tiny_llama_config(): h 64, 4 heads of 16, 2 KV heads, MLP 128, 2 blocks, vocab 512, untied
TINY_PARAMS = 2 * 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + (2 * 2 + 1) * 64  # 139,584
TINY_BLOCK_LINEARS = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # 73,728: what QLoRA holds in NF4
# rank 8: 8 x (in + out) per layer: q, o 64+64; k, v 64+32; gate, up, down 64+128; two blocks
TINY_LORA_R8 = 2 * 8 * (2 * 128 + 2 * 96 + 3 * 192)  # 16,384
TINY_LORA_R8_QV = 2 * 8 * (128 + 96)  # 3,584


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj", "self_attn.o_proj,down_proj"])
@pytest.mark.parametrize("overrides", [{}, {"head_dim": 32, "tie_word_embeddings": True}])
def test_adapter_estimate_counts_what_peft_trains(targets: str, overrides: dict) -> None:
    from transformers import AutoModelForCausalLM

    from minitrain.config import LoraSettings, parse_target_modules
    from minitrain.train.adapters import add_adapters

    config = tiny_llama_config(**overrides)
    settings = LoraSettings(rank=8, target_modules=parse_target_modules(targets))
    model = add_adapters(AutoModelForCausalLM.from_config(config), settings)
    trained = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    count, layers, unknown = lora_parameters(config.to_dict(), 8, targets)
    assert count == sum(trained.values()) and not unknown
    assert set(layers) == {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained}
    assert count_parameters(config.to_dict()) == frozen  # the base, all of it frozen


def test_lora_memory_per_rank_by_hand(data: tuple[Path, list[dict]], tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    report = run(data[0], model_name_or_path=model, world_size=4, lora_rank=8)
    memory = report.memory
    assert (memory["mode"], memory["num_params"]) == ("lora", TINY_PARAMS)
    assert (memory["trainable_params"], memory["frozen_params"], memory["nf4_params"]) == (
        TINY_LORA_R8,
        TINY_PARAMS,
        0,
    )
    assert memory["lora_targets"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    for row in memory["rows"]:
        nbytes = {"fp32": 4, "bf16": 2}[row["master_dtype"]]
        shards = {"FULL_SHARD": 4, "NO_SHARD": 1}[row["strategy"]]
        # frozen base + adapter, the adapter's gradient and its two AdamW states, all sharded alike
        assert row["params_gib"] * GIB == pytest.approx(nbytes * (TINY_PARAMS + TINY_LORA_R8) / shards)
        assert row["grads_gib"] * GIB == pytest.approx(nbytes * TINY_LORA_R8 / shards)
        assert row["optimizer_gib"] * GIB == pytest.approx(2 * nbytes * TINY_LORA_R8 / shards)
        assert row["total_gib"] * GIB == pytest.approx(nbytes * (TINY_PARAMS + 4 * TINY_LORA_R8) / shards)
        assert row["nf4_gib"] == 0
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=160))
    assert "LoRA r8 on all-linear: 16,384 trainable of 0.1M parameters" in out.getvalue()
    assert "frozen base" in out.getvalue() and "adapter" in out.getvalue()

    listed = run(
        data[0], model_name_or_path=model, world_size=4, lora_rank=8, lora_target_modules="q_proj,v_proj"
    )
    assert listed.memory["trainable_params"] == TINY_LORA_R8_QV
    partly = run(data[0], model_name_or_path=model, lora_rank=8, lora_target_modules="q_proj,wq")
    assert partly.memory["trainable_params"] == 2 * 8 * (64 + 64)  # q_proj only
    assert "no decoder-block linear layer named wq" in partly.memory_note
    nothing = run(data[0], model_name_or_path=model, lora_rank=8, lora_target_modules="lm_head,wq")
    assert nothing.memory["trainable_params"] == 0
    assert "names no linear layer of a decoder block" in nothing.memory_note


def test_qlora_memory_keeps_the_nf4_base_whole_on_every_rank(
    data: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    tiny_llama_config().save_pretrained(tmp_path / "model")
    reports = {
        ranks: run(
            data[0],
            model_name_or_path=str(tmp_path / "model"),
            world_size=ranks,
            lora_rank=8,
            load_in_4bit=True,
        )
        for ranks in (1, 4)
    }
    memory = reports[4].memory
    assert memory["mode"] == "qlora" and memory["trainable_params"] == TINY_LORA_R8
    assert (memory["nf4_params"], memory["frozen_params"]) == (
        TINY_BLOCK_LINEARS,
        TINY_PARAMS - TINY_BLOCK_LINEARS,
    )
    assert round(NF4_BYTES_PER_WEIGHT, 3) == 0.516
    one = {(r["master_dtype"], r["strategy"]): r for r in reports[1].memory["rows"]}
    for row in memory["rows"]:
        nbytes = {"fp32": 4, "bf16": 2}[row["master_dtype"]]
        shards = {"FULL_SHARD": 4, "NO_SHARD": 1}[row["strategy"]]
        alone = one[row["master_dtype"], row["strategy"]]
        assert (
            row["nf4_gib"]
            == alone["nf4_gib"]
            == pytest.approx(TINY_BLOCK_LINEARS * NF4_BYTES_PER_WEIGHT / GIB)
        )
        assert row["frozen_gib"] == pytest.approx(alone["frozen_gib"] / shards)
        assert row["frozen_gib"] * GIB == pytest.approx(nbytes * (TINY_PARAMS - TINY_BLOCK_LINEARS) / shards)
        nf4_bytes = TINY_BLOCK_LINEARS * NF4_BYTES_PER_WEIGHT
        sharded = nbytes * (TINY_PARAMS - TINY_BLOCK_LINEARS + 4 * TINY_LORA_R8) / shards
        assert row["total_gib"] * GIB == pytest.approx(nf4_bytes + sharded)
    out = io.StringIO()
    render_dry_run(reports[4], Console(file=out, width=160))
    assert "QLoRA r8 on all-linear" in out.getvalue() and "NF4 base" in out.getvalue()
    assert "NF4 at 0.516 bytes a weight" in reports[4].memory_note


def test_nf4_part_is_what_bitsandbytes_quantizes_and_stores(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="needs the qlora extra")
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from minitrain.train.adapters import nf4_config

    config = tiny_llama_config()
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    lm = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=nf4_config(torch.float32), device_map={"": "cpu"}
    )
    states = [m.weight.quant_state for m in lm.modules() if isinstance(m, Linear4bit)]
    weights = sum(state.shape.numel() for state in states)
    assert weights == block_linear_weights(config.to_dict()) == TINY_BLOCK_LINEARS
    stored = sum(
        m.weight.numel() + s.absmax.numel() * s.absmax.element_size() + s.state2.absmax.numel() * 4
        for m, s in ((m, m.weight.quant_state) for m in lm.modules() if isinstance(m, Linear4bit))
    )  # packed 4-bit pairs, 8-bit absmax per 64 weights, fp32 scale per 256 absmax (rounded up per layer)
    assert stored == pytest.approx(weights * NF4_BYTES_PER_WEIGHT, rel=0.01)


def test_every_sample_too_long_is_a_user_error(tmp_path: Path) -> None:
    samples = [s for s in make_samples(40, seed=2) if s["len"] > 4]
    path = write_tokenized(tmp_path / "long.jsonl", samples)
    with pytest.raises(UserError, match="every sample is longer than --max-tokens-per-gpu 4"):
        run(path, max_tokens_per_gpu=4)


def test_plan_modules_do_not_import_torch() -> None:
    code = (
        "import sys, minitrain.train.dryrun, minitrain.data.packing, minitrain.data.sampler, "
        "minitrain.data.store; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_truncate_plans_what_training_trains(data: tuple[Path, list[dict]]) -> None:
    path, samples = data
    from minitrain.data.store import TokenStore

    report = run(path, truncate=True, max_steps=3)
    over = [s["len"] - 128 for s in samples if s["len"] > 128]
    assert over and report.dropped_samples == 0 and report.dropped_occurrences == 0
    assert (report.truncated_samples, report.truncated_tokens) == (len(over), sum(over))
    # the same plan as a run without --truncate over the store training uses (`TokenStore.truncated`)
    store = TokenStore.open(path).truncated(128)
    sampler = InfiniteSampler(num_samples=100, seed=7)
    trained = []
    for _ in range(3):
        batch = sampler.next_batch(16)
        plan = plan_minibatches(store.lengths[batch].tolist(), 128, 2)
        assert sorted(i for mb in plan for r in mb for i in r) == list(range(16))  # every sample placed
        trained.append(int(store.num_trained[batch].sum()))
    assert report.steps == 3
    assert (report.trained_tokens_per_step.min, report.trained_tokens_per_step.max) == (
        min(trained),
        max(trained),
    )
    assert report.trained_tokens_per_step.mean == pytest.approx(sum(trained) / 3)


def test_the_peak_per_gpu_is_the_memory_model_of_the_largest_minibatch(
    data: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    from minitrain.train.memory import RankPlan, estimate_peak, model_shape

    config = tiny_llama_config()
    config.save_pretrained(tmp_path / "model")
    report = run(data[0], model_name_or_path=str(tmp_path / "model"), world_size=2)
    peak = report.memory["peak"]
    assert {(r["master_dtype"], r["activation_checkpointing"], r["cpu_offload"]) for r in peak} == {
        (m, ac, off) for m in ("fp32", "bf16") for ac, off in ((False, False), (True, False), (True, True))
    }
    largest = int(report.tokens_per_rank.max)
    assert all(r["tokens"] == largest for r in peak)
    plan = RankPlan(tokens=largest, shards=2, master_bytes=4, compute_bytes=2, checkpointing=True)
    want = estimate_peak(model_shape(config.to_dict()), plan).total_gib
    row = next(
        r
        for r in peak
        if r["master_dtype"] == "fp32" and r["activation_checkpointing"] and not r["cpu_offload"]
    )
    assert row["peak_gib"] == pytest.approx(want)
    out = io.StringIO()
    render_dry_run(report, Console(file=out, width=160))
    assert (
        f"predicted peak per GPU, bf16 compute, FULL_SHARD over 2 ranks, largest minibatch {largest:,}"
        in (out.getvalue())
    )


def test_dpo_plan_counts_and_packs_pairs(tmp_path: Path) -> None:
    """--objective dpo: the unit is the pair (both sides' tokens), as `train --objective dpo` plans it."""
    from minitrain.data.store import TokenStore
    from tests.train.test_dpo import write_pairs

    path = write_pairs(tmp_path / "pairs.jsonl", num=20, vocab=64, seed=3)
    store = TokenStore.open(path, "dpo")
    pair_lengths = store.pair_lengths
    budget = int(np.sort(pair_lengths)[-3])  # the two longest pairs do not fit
    report = run(
        path, objective="dpo", batch_size=6, max_tokens_per_gpu=budget, report_path=tmp_path / "p.json"
    )
    assert report.unit == "pairs" and report.num_samples == 20
    assert report.steps == math.ceil(20 / 6)
    sampler = InfiniteSampler(num_samples=20, seed=7)
    plan = orjson.loads((tmp_path / "p.json").read_bytes())
    for step in plan["steps"]:
        batch = sampler.next_batch(6)
        expected = plan_minibatches(pair_lengths[batch].tolist(), budget, 2)
        assert step["minibatches"] == [[[batch[i] for i in r] for r in mb] for mb in expected]
        placed = [batch[i] for mb in expected for r in mb for i in r]
        assert step["trained_tokens"] == int(
            sum(store.num_trained[2 * p] + store.num_trained[2 * p + 1] for p in placed)
        )
    assert report.dropped_samples == int((pair_lengths > budget).sum()) == 2
    assert [d["source_line"] for d in report.dropped] == [
        int(i) + 1 for i in np.flatnonzero(pair_lengths > budget)
    ]


def test_dpo_truncate_plans_the_cut_pairs(tmp_path: Path) -> None:
    """--objective dpo --truncate: the plan is over the pairs as training cuts them (`truncated_pairs`)."""
    from minitrain.data.store import TokenStore, truncate
    from tests.train.test_dpo import write_pairs

    path = write_pairs(tmp_path / "pairs.jsonl", num=20, vocab=64, seed=3)
    store = TokenStore.open(path, "dpo")
    budget = int(np.sort(store.pair_lengths)[10])  # about half the pairs are cut
    cut_store, cut = truncate(store, budget, "dpo")
    report = run(path, objective="dpo", batch_size=6, max_tokens_per_gpu=budget, truncate=True,
                 report_path=tmp_path / "p.json")  # fmt: skip
    assert cut.cut > 0
    assert (report.truncated_samples, report.truncated_tokens) == (cut.cut, cut.tokens_cut)
    assert report.dropped_samples == cut.skipped
    sampler = InfiniteSampler(num_samples=20, seed=7)
    for step in orjson.loads((tmp_path / "p.json").read_bytes())["steps"]:
        batch = sampler.next_batch(6)
        expected = plan_minibatches(cut_store.pair_lengths[batch].tolist(), budget, 2)
        assert step["minibatches"] == [[[batch[i] for i in r] for r in mb] for mb in expected]
