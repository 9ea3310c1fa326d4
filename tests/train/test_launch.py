"""minitrain/train/launch.py: the torchrun command line (asserted, not spawned), exit codes, detection of
an outer launcher, and the parent's refusals before anything is spawned. Its signals (forwarding, Ctrl+C at
start-up) are tests/train/test_launch_signals.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from minitrain.config import TrainConfig
from minitrain.errors import UserError
from minitrain.rundir import read_training_params, write_training_params
from minitrain.train.launch import run_command, torchrun_command, torchrun_env
from minitrain.train.preflight import check_inputs, in_launched_env, preflight
from tests.conftest import SMOLLM2, needs_fixtures, outside_any_launch, run_minitrain, tiny_llama_config
from tests.train.test_loop import write_tokenized


def _config(**kw) -> TrainConfig:
    return TrainConfig(
        **{"data_path": Path("/d.jsonl"), "model_name_or_path": "m", "output_dir": Path("/out"), **kw}
    )


def test_one_node_is_standalone():
    assert torchrun_command(_config(nproc=4), python="py") == [
        "py", "-m", "minitrain.train.launch", "--nproc-per-node", "4", "--standalone", "--nnodes", "1",
        "-m", "minitrain.train.worker", "/out",
    ]  # fmt: skip


def test_several_nodes_use_a_c10d_rendezvous():
    config = _config(nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_id="job7")
    assert torchrun_command(config, python="py") == [
        "py", "-m", "minitrain.train.launch", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7",
        "-m", "minitrain.train.worker", "/out",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "launched"),
    [
        ({}, False),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True),
        ({"TORCHELASTIC_RUN_ID": "x"}, True),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False),  # a batch script: we still launch torchrun
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, True),  # srun with one task per GPU
    ],
)
def test_detects_an_outer_launcher(env, launched):
    assert in_launched_env(env) is launched


def test_slurm_tasks_map_to_ranks():
    from minitrain.train.dist import ranks_from_env

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert ranks_from_env(env) == (5, 1, 8, 4)
    assert ranks_from_env({}) == (0, 0, 1, 1)


def test_exit_codes_pass_through():
    assert run_command([sys.executable, "-c", "raise SystemExit(0)"]) == 0
    assert run_command([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_command([sys.executable, "-c", kill]) == 128 + signal.SIGKILL


# --- the parent refuses before spawning ---------------------------------------------------------------


def _model(tmp_path: Path, vocab: int, tokenizer: Path | None = None) -> Path:
    model = tmp_path / "model"
    tiny_llama_config(vocab_size=vocab).save_pretrained(model)
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, model / name)
    return model


def test_refuses_token_ids_outside_the_vocabulary(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=300, seed=0)
    model = str(
        _model(tmp_path, 128)
    )  # a config only: the cheap checks ask for weights without --from-scratch
    config = _config(data_path=data, model_name_or_path=model, output_dir=tmp_path / "o", from_scratch=True)
    with pytest.raises(UserError, match=r"token id \d+ does not fit the vocabulary .* \(128 ids\)"):
        preflight(config)


def test_refuses_when_every_sample_is_too_long(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0, min_len=20)
    config = _config(
        data_path=data,
        model_name_or_path=str(_model(tmp_path, 128)),
        output_dir=tmp_path / "o",
        max_tokens_per_gpu=10,
    )
    with pytest.raises(UserError, match="every sample is longer than --max-tokens-per-gpu 10"):
        preflight(config)


def test_refuses_a_missing_model(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0)
    with pytest.raises(UserError, match="nope: no such folder"):
        preflight(
            _config(data_path=data, model_name_or_path=str(tmp_path / "nope"), output_dir=tmp_path / "o")
        )


@needs_fixtures
def test_refuses_data_tokenized_with_another_tokenizer(tmp_path):
    from minitrain.data.format import sidecar_path

    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0)
    meta = {"format": "minitrain.tokenized", "format_version": 1,
            "tokenizer": {"path": "/elsewhere/tokenizer", "fingerprint": "sha256:" + "0" * 64}}  # fmt: skip
    sidecar_path(data).write_bytes(orjson.dumps(meta))
    model = _model(tmp_path, 49152, tokenizer=SMOLLM2)
    config = _config(
        data_path=data, model_name_or_path=str(model), output_dir=tmp_path / "o", from_scratch=True
    )
    with pytest.raises(UserError, match="was tokenized with /elsewhere/tokenizer"):
        preflight(config)
    # the same file with the model's own fingerprint passes, and checkpoints will copy the model's tokenizer
    from transformers import AutoTokenizer

    from minitrain.data.probe import tokenizer_fingerprint

    meta["tokenizer"]["fingerprint"] = tokenizer_fingerprint(AutoTokenizer.from_pretrained(model))
    sidecar_path(data).write_bytes(orjson.dumps(meta))
    assert preflight(config).tokenizer_source == str(model.resolve())


def test_worker_without_a_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    from minitrain.train.worker import main

    monkeypatch.delenv("MINITRAIN_DEBUG", raising=False)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "training_params.json: no such file" in err
    assert main([]) == 2  # usage


def test_torchrun_gets_the_cores_shared_by_the_ranks_unless_the_user_chose(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert torchrun_env(4, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "4"}
    assert torchrun_env(32, {})["OMP_NUM_THREADS"] == "1"
    assert torchrun_env(4, {"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"  # the user's choice stands


def test_no_omp_banner_on_a_two_process_run(tmp_path):
    """torchrun's banner of asterisks (its OMP_NUM_THREADS default) is not printed when minitrain starts
    it."""
    env = torchrun_env(2, {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    script = tmp_path / "noop.py"
    script.write_text("pass\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OMP_NUM_THREADS" not in done.stderr + done.stdout


# --- user errors before torch: the cheap checks import neither torch nor transformers --------------------

_NO_TORCH_PROBE = textwrap.dedent(
    """
    import json, sys
    from minitrain.cli import app
    results = []
    for args in json.loads(sys.argv[1]):
        try:
            app(args=["train", *args], standalone_mode=False)
            results.append("no error")
        except Exception as err:
            results.append(f"{type(err).__name__}: {err}")
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    print(json.dumps({"results": results, "heavy": heavy}))
    """
)


def test_user_errors_of_train_are_found_without_importing_torch(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0, min_len=20)
    config_only = _model(tmp_path, 128)  # no weights
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "training_metrics_0.jsonl").write_text("{}\n")
    (tmp_path / "afile").write_text("x")

    def args(*extra, data=data, model=config_only, out=tmp_path / "o"):
        return [
            "--data-path",
            str(data),
            "--model-name-or-path",
            str(model),
            "--output-dir",
            str(out),
            *extra,
        ]

    cases = {
        "no such file": args(data=tmp_path / "nope.jsonl"),
        "nomodel: no such folder": args(model=tmp_path / "nomodel"),
        "no weights there": args(),
        "every sample is longer than --max-tokens-per-gpu 10": args(
            "--from-scratch", "--max-tokens-per-gpu", "10"
        ),
        "cannot create it": args("--from-scratch", out=tmp_path / "afile" / "o"),
        "already holds a run": args("--from-scratch", out=tmp_path / "run"),
        "--resume: no complete checkpoint": args(
            "--from-scratch", "--resume", "latest", out=tmp_path / "run"
        ),
        "--batch-size must be a positive integer": args("--batch-size", "0"),
    }
    probe = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_PROBE, orjson.dumps(list(cases.values())).decode()],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    out = orjson.loads(probe.stdout.splitlines()[-1])
    for expected, got in zip(cases, out["results"], strict=True):
        assert got.startswith("UserError") and expected in got, (expected, got)
    assert out["heavy"] == []  # neither torch nor transformers was imported to find any of these


def test_the_cheap_checks_pass_a_good_run_on_to_preflight(tmp_path):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0)
    model = _model(tmp_path, 128)
    config = _config(
        data_path=data, model_name_or_path=str(model), output_dir=tmp_path / "o", from_scratch=True
    )
    inputs = check_inputs(config)
    assert len(inputs.store) == 4 and inputs.num_too_long == 0 and inputs.tokens_truncated == 0
    assert preflight(config, inputs).num_samples == 4


# --- warnings of the parent, once --------------------------------------------------------------------------


def test_more_cpu_processes_than_cores_is_one_warning(tmp_path, capsys, monkeypatch):
    import torch

    import minitrain.train.preflight as preflight_module

    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0)
    config = _config(
        data_path=data, model_name_or_path=str(_model(tmp_path, 128)), output_dir=tmp_path / "o",
        from_scratch=True, nproc=3,
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(preflight_module, "usable_cores", lambda: 2)
    preflight(config)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("minitrain: warning: --nproc 3 CPU processes on 2 usable cores")
    assert "use --nproc 2 or fewer" in err
    preflight(dataclasses.replace(config, nproc=2))
    assert capsys.readouterr().err == ""


def test_a_run_shorter_than_its_warmup_is_one_warning(tmp_path, capsys):
    data = write_tokenized(tmp_path / "d.jsonl", num=4, vocab=100, seed=0)
    base = dict(data_path=data, model_name_or_path=str(_model(tmp_path, 128)), from_scratch=True)
    check_inputs(_config(**base, output_dir=tmp_path / "a", max_steps=3, num_warmup_steps=10))
    err = capsys.readouterr().err
    assert err == (
        "minitrain: warning: the run stops after 3 steps, before the 10 warm-up steps end: the learning rate "
        "never reaches --learning-rate 5e-06 (lower --num-warmup-steps)\n"
    )
    for fine in (
        dict(max_steps=10, num_warmup_steps=10),
        dict(num_warmup_steps=10),
    ):  # peak at step 10; no stop
        check_inputs(_config(**base, output_dir=tmp_path / "b", **fine))
        assert capsys.readouterr().err == ""


def test_truncate_says_what_it_cut(tmp_path, capsys):
    data = write_tokenized(tmp_path / "d.jsonl", num=6, vocab=100, seed=0, min_len=8, max_len=30)
    from minitrain.data.store import TokenStore

    lengths = TokenStore.open(data).lengths
    over = lengths[lengths > 12]
    assert 0 < over.size < 6  # the fixture has both kinds
    base = dict(data_path=data, model_name_or_path=str(_model(tmp_path, 128)), from_scratch=True)
    inputs = check_inputs(_config(**base, output_dir=tmp_path / "o", max_tokens_per_gpu=12, truncate=True))
    assert (inputs.num_too_long, inputs.tokens_truncated) == (over.size, int((over - 12).sum()))
    assert capsys.readouterr().err == (
        f"minitrain: {over.size} of 6 samples are longer than --max-tokens-per-gpu 12: "
        f"--truncate keeps their first 12 tokens ({int((over - 12).sum()):,} tokens cut)\n"
    )
    check_inputs(_config(**base, output_dir=tmp_path / "p", max_tokens_per_gpu=12))
    assert "will be skipped (raise it to train them, or add --truncate)" in capsys.readouterr().err


# --- training_params.json keeps every launch ----------------------------------------------------------------


def _fake_complete_checkpoint(out: Path, samples: int) -> Path:
    path = out / "checkpoints" / f"samples_{samples}"
    (path / "state").mkdir(parents=True)
    for name in ("COMPLETE", "trainer_state.json", "state/.metadata"):
        (path / name).write_text("{}")
    return path


def test_each_launch_is_appended_to_the_params_history(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    first = _config(output_dir=out, learning_rate=1e-5)
    write_training_params(first, world_size=1, data=None)
    params = read_training_params(out)
    assert params["learning_rate"] == 1e-5 and params["resumed_from"] is None
    assert [launch["learning_rate"] for launch in params["launches"]] == [1e-5]

    checkpoint = _fake_complete_checkpoint(out, 8)
    write_training_params(
        _config(output_dir=out, learning_rate=2e-5, resume="latest"), world_size=2, data=None
    )
    params = read_training_params(out)
    assert params["learning_rate"] == 2e-5 and params["world_size"] == 2  # the top level: the latest launch
    assert params["resumed_from"] == str(checkpoint)
    assert params["resume"] is None  # the file replays as a fresh run; the workers resume from resumed_from
    assert TrainConfig.from_dict(params).learning_rate == 2e-5  # what the workers read
    assert [(x["learning_rate"], x["resumed_from"]) for x in params["launches"]] == [
        (1e-5, None), (2e-5, str(checkpoint)),
    ]  # fmt: skip
    assert all(x["created"] for x in params["launches"])

    write_training_params(_config(output_dir=out, overwrite=True), world_size=1, data=None)  # a new run
    assert len(read_training_params(out)["launches"]) == 1


def test_a_params_file_from_before_the_history_becomes_its_first_launch(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    old = _config(output_dir=out).to_dict() | {"created": "2026-01-01T00:00:00+00:00", "world_size": 4}
    (out / "training_params.json").write_bytes(orjson.dumps(old))
    _fake_complete_checkpoint(out, 8)
    write_training_params(_config(output_dir=out, resume="latest"), world_size=1, data=None)
    launches = read_training_params(out)["launches"]
    assert [x["created"] for x in launches][0] == "2026-01-01T00:00:00+00:00" and len(launches) == 2


def test_a_truncated_run_trains_every_sample_cut_to_the_budget(tmp_path):
    """One real step over the whole data with --truncate: every sample is in it, at min(length, budget)
    tokens."""
    from minitrain.data.store import TokenStore

    data = write_tokenized(tmp_path / "d.jsonl", num=8, vocab=100, seed=0, min_len=8, max_len=30)
    store = TokenStore.open(data)
    lengths = store.lengths.tolist()
    assert any(n > 12 for n in lengths) and any(n <= 12 for n in lengths)
    out = tmp_path / "o"
    done = run_minitrain(
        ["train", "--data-path", str(data), "--model-name-or-path",
         str(_model(tmp_path, 128)), "--output-dir", str(out), "--from-scratch", "--nproc", "1",
         "--batch-size", "8", "--max-tokens-per-gpu", "12", "--truncate", "--max-steps", "1",
         "--num-warmup-steps", "0"],
        env=outside_any_launch(),  # --nproc 1: trains in this process, no torchrun needed
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [record] = [orjson.loads(x) for x in (out / "training_metrics_0.jsonl").read_bytes().splitlines()]
    assert record["num_samples"] == 8 and record["num_total_tokens"] == sum(min(n, 12) for n in lengths)
    assert record["num_loss_counted_tokens"] == int(store.truncated(12).num_trained.sum())
    params = read_training_params(out)
    over = [n - 12 for n in lengths if n > 12]
    assert (params["num_samples_truncated"], params["num_tokens_truncated"]) == (len(over), sum(over))
    assert params["truncate"] is True and "will be skipped" not in done.stderr
