"""Dry run: the report agrees with a direct replay of sampler + planner; stop rules, drops, JSON, memory, errors."""

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

from minitrain.data.dryrun import count_parameters, dry_run, render_dry_run
from minitrain.data.packing import plan_minibatches
from minitrain.data.sampler import InfiniteSampler
from minitrain.errors import UserError
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


def test_stop_rules(data: tuple[Path, list[dict]]) -> None:
    path, samples = data
    assert run(path, max_steps=3).steps == 3
    assert run(path, max_epochs=2.5).epochs >= 2.5
    assert run(path, max_epochs=2.5).steps == math.ceil(2.5 * 100 / 16)
    report = run(path, max_samples=40)
    fits = sum(s["len"] <= 128 for s in samples) / 100
    assert report.steps == pytest.approx(math.ceil(40 / (16 * fits)), abs=1)


def test_memory_estimate_counts_parameters_like_the_model(
    data: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_llama_config

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
    assert run(data[0], model_name_or_path=str(tmp_path / "nowhere")).memory is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"max_tokens_per_gpu": 0}, "--max-tokens-per-gpu"),
    ],
)
def test_user_errors(data: tuple[Path, list[dict]], overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(data[0], **overrides)


def test_every_sample_too_long_is_a_user_error(tmp_path: Path) -> None:
    samples = [s for s in make_samples(40, seed=2) if s["len"] > 4]
    path = write_tokenized(tmp_path / "long.jsonl", samples)
    with pytest.raises(UserError, match="every sample is longer than --max-tokens-per-gpu 4"):
        run(path, max_tokens_per_gpu=4)


def test_plan_modules_do_not_import_torch() -> None:
    code = (
        "import sys, minitrain.data.dryrun, minitrain.data.packing, minitrain.data.sampler, "
        "minitrain.data.store; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
