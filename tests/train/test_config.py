"""minitrain/config.py (TrainConfig): validation messages, derived values, the JSON round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import orjson
import pytest

from minitrain.config import TrainConfig
from minitrain.errors import UserError

BASE = {"data_path": "d.jsonl", "model_name_or_path": "m", "output_dir": "out"}


def test_defaults_are_mini_trainers_where_it_has_them():
    config = TrainConfig(**BASE)
    assert (config.batch_size, config.max_tokens_per_gpu, config.learning_rate) == (128, 16384, 5e-6)
    assert (config.num_warmup_steps, config.lr_scheduler, config.seed) == (10, "constant_with_warmup", 42)
    assert config.fsdp_sharding_strategy == "FULL_SHARD" and config.master_dtype == "fp32"
    assert isinstance(config.data_path, Path) and config.world_size() == 1


def test_json_round_trip_through_training_params():
    config = TrainConfig(
        **BASE, nproc=2, max_epochs=1.5, min_samples_per_checkpoint=100, lr_scheduler="COSINE"
    )
    data = orjson.loads(orjson.dumps(config.to_dict()))
    assert TrainConfig.from_dict(data | {"world_size": 2, "torch_version": "x"}) == config
    assert config.lr_scheduler == "cosine"  # normalised once, saved normalised


def test_frozen_and_keyword_only():
    config = TrainConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig("d", "m", "o")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
        ({"max_tokens_per_gpu": -5}, "--max-tokens-per-gpu must be a positive integer"),
        ({"learning_rate": 0.0}, "--learning-rate must be a positive number"),
        ({"lr_scheduler": "warmup_stable"}, "--lr-scheduler must be one of"),
        ({"fsdp_sharding_strategy": "ZERO3"}, "--fsdp-sharding-strategy must be one of"),
        ({"master_dtype": "fp16"}, "--master-dtype must be fp32 or bf16"),
        (
            {"max_steps": 5, "max_epochs": 1.0},
            "give at most one stop criterion, not --max-steps and --max-epochs",
        ),
        ({"lr_scheduler": "cosine"}, "needs --max-steps, --max-samples or --max-epochs"),
        ({"nnodes": 2}, "--nnodes > 1 needs --rdzv-endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "node0"}, "--rdzv-endpoint must be HOST:PORT"),
        ({"node_rank": 1}, "--node-rank must be in 0..0"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be > 0"),
        ({"num_warmup_steps": -1}, "--num-warmup-steps must be >= 0"),
        ({"min_samples_per_checkpoint": 0}, "--min-samples-per-checkpoint must be a positive integer"),
        ({"logging_level": "LOUD"}, "--logging-level must be one of"),
        ({"nproc": 0}, "--nproc must be a positive integer"),
        ({"beta1": 1.0}, "--beta1 must be in [0, 1), got 1.0"),
        ({"beta2": -0.1}, "--beta2 must be in [0, 1), got -0.1"),
        ({"eps": 0.0}, "--eps must be a positive number, got 0.0"),
        ({"save_dtype": "fp8"}, "--save-dtype must be one of fp32, bf16, fp16; got 'fp8'"),
        ({"max_tokens": 0}, "--max-tokens must be a positive integer, got 0"),
        ({"max_tokens": 10, "max_steps": 2}, "not --max-steps and --max-tokens"),
        ({"max_tokens": 10, "lr_scheduler": "cosine"}, "--max-tokens gives no step count in advance"),
        ({"lr_scheduler_kwargs": "{num_cycles: 1}"}, "--lr-scheduler-kwargs is not valid JSON"),
        ({"lr_scheduler_kwargs": "[0.5]"}, "--lr-scheduler-kwargs must be a JSON object"),
        (
            {"lr_scheduler_kwargs": '{"num_cycle": 1}', "lr_scheduler": "cosine", "max_steps": 3},
            "--lr-scheduler-kwargs: cosine has no argument 'num_cycle'; it takes num_cycles",
        ),
        (
            {"lr_scheduler_kwargs": '{"num_cycles": 1}'},
            "constant_with_warmup has no argument 'num_cycles'; it takes no extra arguments",
        ),
    ],
)
def test_bad_values_name_the_flag(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig(**BASE | overrides)


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({}, None),
        ({"max_steps": 7}, 7),
        ({"max_samples": 300, "batch_size": 128}, 3),
        ({"max_epochs": 2.0, "batch_size": 64}, 32),
    ],
)
def test_total_steps_follow_the_stop_criterion(overrides, steps):
    assert TrainConfig(**BASE | overrides).total_steps(num_samples=1000) == steps


def test_new_optimizer_and_stop_fields_default_to_todays_behaviour():
    config = TrainConfig(**BASE)
    assert (config.beta1, config.beta2, config.eps) == (0.9, 0.95, 1e-8)
    assert config.save_dtype is None and config.max_tokens is None and not config.trust_remote_code
    assert config.scheduler_kwargs() == {}
    cosine = TrainConfig(**BASE, lr_scheduler="cosine", max_steps=3, lr_scheduler_kwargs='{"num_cycles": 1}')
    assert cosine.scheduler_kwargs() == {"num_cycles": 1}
    assert TrainConfig(**BASE, save_dtype="BF16").save_dtype == "bf16"


def test_the_schedule_arguments_table_is_transformers_own():
    """LR_SCHEDULER_KWARGS lists each schedule's arguments beyond the optimizer, warm-up, length and epoch."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    from minitrain.config import LR_SCHEDULER_KWARGS

    common = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, allowed in LR_SCHEDULER_KWARGS.items():
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        assert set(inspect.signature(function).parameters) - common == set(allowed), name
