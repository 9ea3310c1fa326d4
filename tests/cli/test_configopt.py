"""minitrain/cli/configopt.py: `--config` on train and tokenize (file, override, round trip of a run)."""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest
from typer.testing import CliRunner

from minitrain.cli import app
from minitrain.cli.configopt import config_keys
from minitrain.cli.tokenize import tokenize
from minitrain.cli.train import CONFIG_ALIASES, train
from minitrain.config import TrainConfig
from minitrain.configfile import TRAINING_PARAMS_EXTRAS
from minitrain.errors import UserError
from minitrain.rundir import read_metrics
from tests.conftest import DATA, SMOLLM2, needs_fixtures, run_minitrain, tiny_llama_config
from tests.train.test_loop import write_tokenized


@pytest.fixture
def launched(monkeypatch):
    """Record the config the CLI built instead of checking files and launching."""
    seen: dict = {}
    monkeypatch.setattr("minitrain.train.preflight.check_inputs", lambda config: None)
    monkeypatch.setattr(
        "minitrain.train.launch.run_training", lambda config, inputs=None: seen.update(c=config)
    )
    return seen


def test_every_train_config_field_is_a_config_key():
    """training_params.json holds every field: each must be a key, or the round trip would refuse it."""
    keys = config_keys(train, CONFIG_ALIASES)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields - set(keys) == set()
    assert not TRAINING_PARAMS_EXTRAS & set(keys)  # an ignored key never hides a flag


def test_keys_are_the_flags_in_both_spellings():
    keys = config_keys(tokenize)
    assert keys["output"] == keys["output_file"] and keys["output"].param == "output"
    assert keys["user_role"].multiple and keys["max_sample_num_tokens"].kind == "integer"
    assert "input_path" not in keys and "config_file" not in keys and "config" not in keys
    train_keys = config_keys(train, CONFIG_ALIASES)
    assert train_keys["lr_scheduler_kwargs"].kind == "json"
    assert train_keys["base_adapters"].param == "base_adapter" and train_keys[
        "activation_checkpointing"
    ].kind == ("boolean")


def test_the_file_sets_the_flags_and_the_command_line_wins(launched, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(
        "data-path: d.jsonl\nmodel_name_or_path: org/model\noutput_dir: out\nbatch_size: 16\n"
        "learning_rate: 2.0e-5\nuse_liger_kernels: true\nreport_to: [none]\nnproc: 2\n"
    )
    result = CliRunner().invoke(
        app, ["train", "--config", "run.yaml", "--batch-size", "4", "--no-use-liger-kernels"]
    )
    assert result.exit_code == 0, result.output
    config = launched["c"]
    assert config.data_path == tmp_path / "d.jsonl" and config.output_dir == tmp_path / "out"
    assert (config.batch_size, config.learning_rate, config.nproc) == (4, 2e-5, 2)
    assert not config.use_liger_kernels and config.report_to == ("none",)
    result = CliRunner().invoke(app, ["train", "--batch-size", "4", "--config", "run.yaml"])  # order free
    assert result.exit_code == 0 and launched["c"].batch_size == 4


def test_a_bad_key_in_the_file_is_one_line_before_anything_runs(launched, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"data_path": "d", "max_tokens_per_gpus": 8}))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "run.json")])
    assert isinstance(result.exception, UserError)
    assert "unknown key 'max_tokens_per_gpus'; did you mean max_tokens_per_gpu?" in str(result.exception)
    assert "c" not in launched


def _train(*args: str) -> None:
    """`minitrain train ARGS`; with --nproc 1 in its own process, no torchrun (not the point here)."""
    done = run_minitrain(["train", *args])
    assert done.returncode == 0, done.stderr


def test_training_params_of_a_run_reproduce_it(tmp_path):
    """`train --config OUT/training_params.json --output-dir OUT2` trains the same losses, step by step."""
    data = write_tokenized(tmp_path / "d.jsonl", num=12, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    first, second = tmp_path / "out", tmp_path / "out2"
    _train("--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
           "--output-dir", str(first), "--nproc", "1", "--from-scratch", "--batch-size", "4",
           "--max-tokens-per-gpu", "64", "--max-steps", "3", "--learning-rate", "1e-2",
           "--num-warmup-steps", "1", "--lr-scheduler", "cosine", "--seed", "3",
           "--weight-decay", "0.1")  # fmt: skip
    _train("--config", str(first / "training_params.json"), "--output-dir", str(second))
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run / "training_metrics_0.jsonl") if "loss" in r]
              for run in (first, second)]  # fmt: skip
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    params = [orjson.loads((run / "training_params.json").read_bytes()) for run in (first, second)]
    assert params[1]["output_dir"] == str(second)
    same = {k for k in params[0] if k not in TRAINING_PARAMS_EXTRAS and k != "output_dir"}
    assert {k: params[0][k] for k in same} == {k: params[1][k] for k in same}


@needs_fixtures
def test_tokenize_reads_its_flags_from_a_config_file(tmp_path):
    source = DATA / "alpaca_en_demo.messages.jsonl"
    lines = source.read_text().splitlines()[:5]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    flags = ["--input-file", str(tmp_path / "in.jsonl"), "--model-name-or-path", str(SMOLLM2),
             "--num-workers", "1", "--train-on", "last"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, ["tokenize", *flags, "-o", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 0, result.output
    (tmp_path / "t.yaml").write_text(
        f"input_file: {tmp_path / 'in.jsonl'}\nmodel-name-or-path: {SMOLLM2}\nnum_workers: 1\n"
        f"train_on: all\noutput_file: {tmp_path / 'wrong.jsonl'}\n"
    )
    result = runner.invoke(
        app,
        [
            "tokenize",
            "--config",
            str(tmp_path / "t.yaml"),
            "--train-on",
            "last",
            "-o",
            str(tmp_path / "b.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert not (tmp_path / "wrong.jsonl").exists()  # -o on the command line won over output_file
