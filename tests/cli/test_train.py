"""minitrain/cli/train.py: the flag set (frozen), mini_trainer's command, one-line errors, exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minitrain.cli import app
from tests.conftest import run_minitrain, tiny_llama_config
from tests.train.test_loop import write_tokenized

FLAGS = {
    "--data-path", "--model-name-or-path", "--output-dir", "--nproc", "--nnodes", "--node-rank",
    "--rdzv-endpoint", "--rdzv-id", "--batch-size", "--max-tokens-per-gpu", "--truncate", "--no-truncate",
    "--learning-rate", "--num-warmup-steps", "--lr-scheduler", "--weight-decay", "--max-grad-norm",
    "--max-steps", "--max-samples", "--max-epochs", "--min-samples-per-checkpoint", "--seed",
    "--use-liger-kernels", "--no-use-liger-kernels", "--fsdp-sharding-strategy", "--activation-checkpointing",
    "--no-activation-checkpointing", "--from-scratch", "--no-from-scratch", "--master-dtype", "--cpu-offload",
    "--no-cpu-offload", "--dry-run", "--no-dry-run", "--dry-run-report", "--logging-level", "--resume",
    "--overwrite", "--no-overwrite", "--keep-last", "--lora-rank", "--lora-alpha", "--lora-dropout",
    "--lora-target-modules", "--merge-lora", "--no-merge-lora", "--base-adapter", "--load-in-4bit",
    "--no-load-in-4bit", "--eval-data-path", "--eval-every-samples", "--report-to", "--objective",
    "--preference-loss", "--beta", "--simpo-gamma", "--sft-weight", "--config",
    "--beta1", "--beta2", "--eps", "--lr-scheduler-kwargs", "--max-tokens", "--save-dtype",
    "--trust-remote-code", "--no-trust-remote-code",
    "--validation-split", "--save-best-val-loss", "--no-save-best-val-loss", "--checkpoint-at-epoch",
    "--no-checkpoint-at-epoch", "--save-final-checkpoint",
    "--compile", "--no-compile",
}  # fmt: skip

MINI_TRAINER = [
    "--output-dir",
    "./ckpts",
    "--data-path",
    "./tokenized_data.jsonl",
    "--model-name-or-path",
    "Qwen/Qwen2.5-1.5B-instruct",
    "--min-samples-per-checkpoint",
    "10000",
    "--num-warmup-steps",
    "20",
    "--max-tokens-per-gpu",
    "60000",
    "--batch-size",
    "128",
    "--use-liger-kernels",
    "--seed",
    "893",
    "--fsdp-sharding-strategy",
    "FULL_SHARD",
    "--learning-rate",
    "6e-6",
]


def test_flag_set_is_frozen():
    """Adding or renaming a flag is a user-visible change: update this set, the README and the CHANGELOG."""
    from typer.main import get_command

    command = get_command(app).commands["train"]
    flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    assert flags == FLAGS


@pytest.fixture
def launched(monkeypatch):
    """Replace the launcher and the file checks: record the config the CLI built, return a chosen exit
    code."""
    seen: dict = {"code": 0}

    def fake(config, inputs=None):
        seen["config"] = config
        return seen["code"]

    monkeypatch.setattr(
        "minitrain.train.preflight.check_inputs", lambda config: None
    )  # the files do not exist
    monkeypatch.setattr("minitrain.train.launch.run_training", fake)
    return seen


def test_mini_trainers_command_works_as_written(launched, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--nproc", "8", *MINI_TRAINER])
    assert result.exit_code == 0, result.output
    config = launched["config"]
    assert config.output_dir == tmp_path / "ckpts" and config.data_path == tmp_path / "tokenized_data.jsonl"
    assert config.model_name_or_path == "Qwen/Qwen2.5-1.5B-instruct"  # not a local path: kept as a Hub id
    assert (config.nproc, config.batch_size, config.max_tokens_per_gpu, config.seed) == (8, 128, 60000, 893)
    assert (config.min_samples_per_checkpoint, config.num_warmup_steps, config.learning_rate) == (
        10000,
        20,
        6e-6,
    )
    assert config.use_liger_kernels and config.fsdp_sharding_strategy == "FULL_SHARD"


def test_nproc_defaults_to_the_visible_gpus_or_one(launched):
    import torch

    result = CliRunner().invoke(app, ["train", *MINI_TRAINER])
    assert result.exit_code == 0, result.output
    assert launched["config"].nproc == (torch.cuda.device_count() if torch.cuda.is_available() else 1)


def test_the_training_exit_code_is_the_commands(launched):
    launched["code"] = 143
    result = CliRunner().invoke(app, ["train", "--nproc", "1", *MINI_TRAINER])
    assert result.exit_code == 143


def _minitrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minitrain", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--lr-scheduler", "wsd"], "--lr-scheduler must be one of"),
        (["--max-steps", "3", "--max-samples", "9"], "give at most one stop criterion"),
    ],
)
def test_bad_flags_are_one_line_and_exit_1(extra, message):
    done = _minitrain(
        "train", "--data-path", "x.jsonl", "--model-name-or-path", "m", "--output-dir", "o", *extra
    )
    assert done.returncode == 1
    assert done.stderr.startswith("minitrain: error: ") and message in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # no traceback


def _invoke_expecting_user_error(args: list[str]) -> str:
    """Run in-process (torch is already imported here); the UserError is what `main` prints as one line."""
    from minitrain.errors import UserError

    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    return str(result.exception)


def test_data_that_does_not_fit_the_model_is_refused_before_spawning(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=500, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # weights are checked (cheaply) first
    message = _invoke_expecting_user_error(
        ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
         "--output-dir", str(tmp_path / "out"), "--nproc", "2"]
    )  # fmt: skip
    assert "does not fit the vocabulary" in message and "\n" not in message
    assert not (tmp_path / "out" / "training_params.json").exists()  # nothing was started


def test_missing_data_file_is_refused(tmp_path):
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    message = _invoke_expecting_user_error(
        ["train", "--data-path", str(tmp_path / "nope.jsonl"),
         "--model-name-or-path", str(tmp_path / "model"),
         "--output-dir", str(tmp_path / "out"), "--nproc", "1"]
    )  # fmt: skip
    assert "nope.jsonl" in message and "\n" not in message


def test_dry_run_plans_without_training(tmp_path):
    pytest.importorskip("minitrain.train.dryrun", reason="the dry-run planner (data engine) is not built yet")
    data = write_tokenized(tmp_path / "d.jsonl", num=20, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    report = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app,
        ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"), "--output-dir",
         str(tmp_path / "out"), "--nproc", "2", "--batch-size", "8", "--max-steps", "3", "--dry-run",
         "--dry-run-report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert report.is_file() and not (tmp_path / "out" / "training_metrics_0.jsonl").exists()


@pytest.mark.parametrize("sidecar", [True, False], ids=["with sidecar", "without sidecar"])
def test_a_preference_file_is_refused_by_sft_training_naming_the_flag(tmp_path, sidecar):
    """A file tokenized from prompt/chosen/rejected lines, given to `train` (and its --dry-run): one line."""
    from minitrain.data.format import sidecar_path
    from tests.conftest import SMOLLM2

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}\n'
        '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], '
        '"rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]}\n'
    )
    data = tmp_path / "d.jsonl"
    done = CliRunner().invoke(
        app,
        ["tokenize", str(pairs), "-o", str(data), "--model-name-or-path", str(SMOLLM2), "--num-workers", "1"],
    )
    assert done.exit_code == 0, done.output
    if not sidecar:
        sidecar_path(data).unlink()
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    base = ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
            "--output-dir", str(tmp_path / "out"), "--nproc", "1"]  # fmt: skip
    for args in (base, [*base, "--dry-run"]):
        message = _invoke_expecting_user_error(args)
        assert "tokenized as preference pairs; train it with --objective dpo" in message, message
        assert str(data) in message and "\n" not in message
    assert not (data.with_suffix(".mtcache") / "store.bin").exists()  # no cache of a pair file


def test_dry_run_report_needs_dry_run(launched):
    result = CliRunner().invoke(
        app, ["train", "--nproc", "1", *MINI_TRAINER, "--dry-run-report", str(Path("r.json"))]
    )
    assert result.exit_code != 0 and "--dry-run-report needs --dry-run" in str(result.exception)


def test_bare_resume_means_latest_and_a_path_is_made_absolute(launched, tmp_path, monkeypatch):
    from minitrain.cli.train import expand_bare_resume

    monkeypatch.chdir(tmp_path)
    assert expand_bare_resume(["train", "--resume", "--seed", "1"]) == [
        "train",
        "--resume",
        "latest",
        "--seed",
        "1",
    ]
    assert expand_bare_resume(["train", "--seed", "1", "--resume"]) == [
        "train",
        "--seed",
        "1",
        "--resume",
        "latest",
    ]
    assert expand_bare_resume(["train", "--resume", "ckpt"]) == ["train", "--resume", "ckpt"]
    assert expand_bare_resume(["plot", "--resume"]) == ["plot", "--resume"]
    result = CliRunner().invoke(app, ["train", *MINI_TRAINER, "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert launched["config"].resume == "latest"
    result = CliRunner().invoke(app, ["train", *MINI_TRAINER, "--resume", "ckpts/checkpoints/samples_8"])
    assert result.exit_code == 0, result.output
    assert launched["config"].resume == str(tmp_path / "ckpts" / "checkpoints" / "samples_8")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", "latest", "--overwrite"], "give one"),
        (["--merge-lora"], "--lora-rank"),
        (["--lora-rank", "0"], "--lora-rank must be positive"),
        (["--lora-rank", "4", "--base-adapter", "nowhere"], "not a PEFT adapter"),
        (["--eval-every-samples", "10"], "--eval-data-path"),
        (["--keep-last", "0"], "--keep-last"),
    ],
)
def test_adapter_eval_and_resume_flag_errors_are_one_line(launched, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    from minitrain.errors import UserError

    result = CliRunner().invoke(app, ["train", *MINI_TRAINER, *extra])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert "config" not in launched  # refused before anything was launched


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    (out / "hf_format" / "samples_4").mkdir(parents=True)
    (out / "training_metrics_0.jsonl").write_text('{"step": 1}\n')
    args = ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
            "--output-dir", str(out), "--nproc", "1", "--from-scratch"]  # fmt: skip
    message = _invoke_expecting_user_error(args)
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    message = _invoke_expecting_user_error([*args, "--resume", "latest"])  # what a bare --resume becomes
    assert "no complete checkpoint" in message
    done = subprocess.run(
        [sys.executable, "-m", "minitrain", *args, "--resume"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "no complete checkpoint" in done.stderr, done.stderr
    seen = {}
    monkeypatch.setattr(
        "minitrain.train.launch.run_command", lambda cmd, env=None: seen.setdefault("cmd", cmd) and 0
    )
    result = CliRunner().invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "cmd" in seen
    assert not (out / "hf_format").exists() and not (out / "training_metrics_0.jsonl").exists()


def test_qlora_without_a_gpu_is_refused_before_spawning(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # weights are checked (cheaply) first
    message = _invoke_expecting_user_error(
        ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
         "--output-dir", str(tmp_path / "out"), "--nproc", "1", "--lora-rank", "4", "--load-in-4bit"]
    )  # fmt: skip
    assert "CUDA GPU" in message and "\n" not in message


def _run(*args: str) -> list[dict]:
    """The step lines of `minitrain train ARGS`, run in its own process (--nproc 1: no torchrun needed)."""
    done = run_minitrain(["train", *args])
    assert done.returncode == 0, done.stderr
    from minitrain.rundir import read_metrics

    out = Path(args[args.index("--output-dir") + 1])
    return [r for r in read_metrics(out / "training_metrics_0.jsonl") if "loss" in r]


def test_mini_trainers_newer_flags_take_effect(tmp_path):
    """--max-tokens stops at the step that reaches it, --save-dtype sets the export's dtype,
    --lr-scheduler-kwargs shapes the schedule (given in a config file), --beta2 changes Adam from step 3."""
    import torch
    from safetensors import safe_open

    data = write_tokenized(tmp_path / "d.jsonl", num=16, vocab=64, seed=1)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    base = ["--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"), "--nproc", "1",
            "--from-scratch", "--batch-size", "4", "--max-tokens-per-gpu", "64", "--learning-rate", "1e-2",
            "--num-warmup-steps", "0"]  # fmt: skip
    rows = _run(*base, "--output-dir", str(tmp_path / "a"), "--max-tokens", "200", "--save-dtype", "bf16")
    seen = [sum(r["num_total_tokens"] for r in rows[: i + 1]) for i in range(len(rows))]
    assert len(rows) >= 2 and seen[-2] < 200 <= seen[-1]
    (export,) = (tmp_path / "a" / "hf_format").glob("samples_*/model.safetensors")
    with safe_open(str(export), "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}  # the CPU default is fp32

    (tmp_path / "run.yaml").write_text(
        "lr_scheduler: cosine\nmax_steps: 4\nlr_scheduler_kwargs: {num_cycles: 1.0}\n"
    )
    cosine = ["--config", str(tmp_path / "run.yaml"), *base]
    rows = _run(*cosine, "--output-dir", str(tmp_path / "b"))
    reference = [1e-2 * 0.5 * (1 + math.cos(2 * math.pi * k / 4)) for k in range(4)]
    assert [r["lr"] for r in rows] == pytest.approx(reference, abs=1e-12)
    other = _run(*cosine, "--output-dir", str(tmp_path / "c"), "--beta2", "0.5")
    losses, other_losses = [r["loss"] for r in rows], [r["loss"] for r in other]
    assert losses[:2] == pytest.approx(other_losses[:2], rel=1e-6)  # Adam's first update ignores the betas
    assert losses[2] != pytest.approx(other_losses[2], rel=1e-6)


def test_dry_run_says_compile(tmp_path):
    """`--dry-run --compile` names the compile in its table and its JSON report; without it, nothing."""
    data = write_tokenized(tmp_path / "d.jsonl", num=20, vocab=64, seed=0)
    tiny_llama_config(vocab_size=64).save_pretrained(tmp_path / "model")
    base = ["train", "--data-path", str(data), "--model-name-or-path", str(tmp_path / "model"),
            "--output-dir", str(tmp_path / "out"), "--nproc", "1", "--batch-size", "8", "--max-steps", "3",
            "--dry-run", "--dry-run-report"]  # fmt: skip
    for extra, said in (([], False), (["--compile"], True)):
        report = tmp_path / f"plan{len(extra)}.json"
        result = CliRunner().invoke(app, [*base, str(report), *extra], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert ("--compile" in result.output) is said
        assert json.loads(report.read_text())["summary"]["compile"] is said
