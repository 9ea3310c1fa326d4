"""Resume, interruption and refusal through the real CLI (`python -m minitrain train`, torchrun, gloo, CPU).

Issue 6 end to end; the unit-level proofs of minitrain/train/checkpoint.py and faults.py are in tests/train/.
All runs train the same tiny Llama from scratch (seed 7) on 16 samples, 4 per step (an epoch is 4 steps), and
are shared by the tests below through module-scoped fixtures:

    diverged    --learning-rate 1e30 on 2 ranks: step 1 blows the weights up to ~1e30, step 2's loss is NaN
    full        a copy of `diverged` trained again: without flags (refused), then with --overwrite as the
                reference: 6 steps on 2 ranks, a checkpoint every 3 steps
    half        3 steps on 2 ranks, then `--resume --max-steps 6` on 1 rank       resumed mid-epoch, resharded
    stopped     no stop rule on 2 ranks, SIGTERM to the parent after 2 steps,
                then `--resume OUT/checkpoints/<latest> --max-steps K+2 --learning-rate 5e-3` on 2 ranks

Every launch costs seconds of imports on 2 cores, so runs serve several tests: the overwritten run is the
reference of the resume test (a leftover of the diverged run in it would show there too).
Warm-up is 4 steps, so the resumed step 4 runs at lr 0.0075 only if the scheduler state came back.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import outside_any_launch, run_minitrain
from tests.train.test_loop import write_run_files

pytestmark = pytest.mark.slow

VOCAB = 128
NUM_SAMPLES = 16
BATCH = 4
STEPS = 6
HALF = STEPS // 2
STOP_AFTER = 2  # metric lines to wait for before the SIGTERM
EXIT_BOUND_S = 60  # SIGTERM -> the parent has exited (measured: about 4 s with 2 busy cores)
LR, WARMUP = 1e-2, 4
RESUME_LR = 5e-3  # the run resumed after SIGTERM lowers --learning-rate: the new rate must be the one used


def _cli(args: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m minitrain ARGS` outside any launcher, run in this process (`run_minitrain`; `--nproc 1`
    trains here, no torchrun); with `ok`, assert it exited 0."""
    done = run_minitrain(args, cwd=cwd, env=_env())
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _env() -> dict[str, str]:
    return outside_any_launch(HF_HUB_OFFLINE="1")


def _args(root: Path, out: Path, *extra: str | int | float) -> list[str]:
    return [
        "train", "--data-path", str(root / "data.jsonl"), "--model-name-or-path", str(root / "model"),
        "--output-dir", str(out), "--from-scratch", "--batch-size", str(BATCH),
        "--max-tokens-per-gpu", "4096", "--learning-rate", str(LR), "--num-warmup-steps", str(WARMUP),
        "--seed", "7", *map(str, extra),
    ]  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run / "training_metrics_0.jsonl").read_bytes().splitlines()]


def _weights(run: Path, samples: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "hf_format" / f"samples_{samples}" / "model.safetensors")


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_run_files(tmp_path_factory.mktemp("resume"), num=NUM_SAMPLES, vocab=VOCAB, seed=3)


@pytest.fixture(scope="module")
def resumed(root, diverged) -> dict:
    every = ["--min-samples-per-checkpoint", HALF * BATCH]
    full, half = root / "full", root / "half"
    shutil.copytree(diverged["out"], full)  # an output dir that already holds a run
    held = (full / "training_metrics_0.jsonl").read_bytes()
    refused = _cli(_args(root, full, "--nproc", 2, "--max-steps", STEPS, *every), root, ok=False)
    untouched = (full / "training_metrics_0.jsonl").read_bytes() == held
    _cli(_args(root, full, "--nproc", 2, "--max-steps", STEPS, *every, "--overwrite"), root)
    _cli(_args(root, half, "--nproc", 2, "--max-steps", HALF, *every), root)
    after_half = _metrics(half)
    second = _cli(_args(root, half, "--nproc", 1, "--max-steps", STEPS, "--resume", *every), root)
    return {
        "full": full, "half": half, "after_half": after_half, "second": second, "held": held,
        "refused": refused, "untouched": untouched,
    }  # fmt: skip


@pytest.fixture(scope="module")
def stopped(root) -> dict:
    from minitrain.train.faults import kill_process_tree

    out = root / "stopped"
    metrics = out / "training_metrics_0.jsonl"
    with (root / "stopped.log").open("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "minitrain", *_args(root, out, "--nproc", 2)],
            cwd=root, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while not metrics.exists() or metrics.read_bytes().count(b"\n") < STOP_AFTER:
                assert proc.poll() is None, f"exited early ({proc.returncode})"
                assert time.monotonic() < deadline, "no step logged in 240 s"
                time.sleep(0.1)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=EXIT_BOUND_S)
            seconds = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                kill_process_tree(proc.pid)
                proc.wait()
        log.seek(0)
        output = log.read()
    checkpoint = _latest(out)
    state = orjson.loads((checkpoint / "trainer_state.json").read_bytes())
    before = _metrics(out)
    target = state["counters"]["step"] + 2
    again = ["--nproc", 1, "--max-steps", target, "--learning-rate", RESUME_LR, "--resume", checkpoint]
    second = _cli(_args(root, out, *again), root)
    return {
        "out": out, "code": code, "seconds": seconds, "output": output, "checkpoint": checkpoint,
        "state": state, "before": before, "target": target, "second": second,
    }  # fmt: skip


@pytest.fixture(scope="module")
def diverged(root) -> dict:
    out = root / "diverged"
    done = _cli(
        _args(root, out, "--nproc", 2, "--max-steps", 4, "--learning-rate", "1e30", "--num-warmup-steps", 0,
              "--min-samples-per-checkpoint", BATCH),
        root, ok=False,
    )  # fmt: skip
    return {"out": out, "done": done}


def test_resume_on_another_nproc_continues_the_uninterrupted_run(resumed):
    full, half = _metrics(resumed["full"]), _metrics(resumed["half"])
    assert [r["step"] for r in resumed["after_half"]] == list(range(1, HALF + 1))
    assert [r["step"] for r in half] == list(range(1, STEPS + 1))  # the same JSONL, each step once
    assert "resumed from" in resumed["second"].stdout and f"at step {HALF}" in resumed["second"].stdout
    params = orjson.loads((resumed["half"] / "training_params.json").read_bytes())
    assert params["world_size"] == 1  # really resumed on another number of ranks
    for a, b in zip(full, half, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), a["step"]  # the scheduler came back
        assert b["total_samples_accumulated"] == a["total_samples_accumulated"]
        assert b["epoch"] == pytest.approx(a["epoch"], abs=1e-12)
        assert b["num_loss_counted_tokens"] == a["num_loss_counted_tokens"]  # the same samples (sampler)
    assert full[HALF]["lr"] == pytest.approx(0.01)  # step 4 is the warm-up's last (4/4 of the peak)
    assert full[HALF - 1]["lr"] == pytest.approx(0.0075)  # and step 3 trained at 3/4 of it
    assert full[HALF]["epoch"] == pytest.approx(1.0)  # and the resumed steps cross an epoch boundary


def test_resumed_weights_equal_the_uninterrupted_ones(resumed):
    import torch

    ref = _weights(resumed["full"], STEPS * BATCH)
    other = _weights(resumed["half"], STEPS * BATCH)
    assert other.keys() == ref.keys()
    diff = torch.cat([(other[k] - ref[k]).flatten() for k in ref]).norm()
    assert (diff / torch.cat([t.flatten() for t in ref.values()]).norm()).item() < 1e-5
    for key, tensor in ref.items():
        assert ((other[key] - tensor).norm() / tensor.norm()).item() < 1e-5, key  # measured: < 1e-7
    assert sorted(p.name for p in (resumed["half"] / "checkpoints").iterdir()) == [
        "latest",
        f"samples_{HALF * BATCH}",
        f"samples_{STEPS * BATCH}",
    ]


def test_the_params_of_a_resumed_run_replay_as_a_fresh_run(resumed, root):
    """`--config OUT/training_params.json --output-dir OUT2` of a resumed run trains from step 1 (no `resume:
    latest` carried into OUT2, where there is no checkpoint) and gives the uninterrupted run's losses."""
    params = orjson.loads((resumed["half"] / "training_params.json").read_bytes())
    assert params["resume"] is None and params["resumed_from"] == str(
        resumed["half"] / "checkpoints" / f"samples_{HALF * BATCH}"
    )
    replay = root / "replay"
    done = _cli(["train", "--config", str(resumed["half"] / "training_params.json"), "--output-dir",
                 str(replay), "--nproc", "1"], root)  # fmt: skip
    assert "resumed from" not in done.stdout
    full, again = _metrics(resumed["full"]), _metrics(replay)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for a, b in zip(full, again, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    assert orjson.loads((replay / "training_params.json").read_bytes())["resumed_from"] is None


def test_sigterm_stops_at_a_step_saves_and_exits_143(stopped):
    from minitrain.rundir import is_complete

    assert stopped["code"] == 143, stopped["output"][-3000:]
    assert stopped["seconds"] < EXIT_BOUND_S
    assert "training interrupted (exit 143)" in stopped["output"] and "Traceback" not in stopped["output"]
    # a run without --max-*: said once at the start, with the real checkpoint setting; the epoch in each line
    assert stopped["output"].count("no stop rule (--max-steps, --max-samples or --max-epochs): infinite") == 1
    assert (
        "runs until Ctrl+C; one checkpoint when stopped (--min-samples-per-checkpoint N" in stopped["output"]
    )
    assert "step 1  epoch " in stopped["output"]
    # the log is a file: torchrun's own warnings and transformers' progress bars stay out of it
    assert "closing signal" not in stopped["output"] and "Loading weights" not in stopped["output"]
    assert "\r" not in stopped["output"]
    step = stopped["state"]["counters"]["step"]
    before = [r["step"] for r in stopped["before"]]
    assert before == list(range(1, step + 1))  # the checkpoint is of the last logged step, nothing lost
    assert step >= STOP_AFTER
    checkpoint = stopped["checkpoint"]
    assert is_complete(checkpoint) and checkpoint.name == f"samples_{step * BATCH}"
    assert {p.name for p in (checkpoint / "rng").iterdir()} == {"rank_0.json", "rank_1.json"}
    assert (stopped["out"] / "hf_format" / checkpoint.name / "model.safetensors").is_file()


def test_resume_after_sigterm_continues_without_repeating_a_step(stopped):
    step = stopped["state"]["counters"]["step"]
    assert f"at step {step}" in stopped["second"].stdout
    after = _metrics(stopped["out"])
    steps = [r["step"] for r in after]
    assert steps == list(range(1, stopped["target"] + 1))  # strictly increasing, each step once
    assert after[:step] == stopped["before"]  # the lines before the stop are untouched
    samples = [r["total_samples_accumulated"] for r in after]
    assert samples == [BATCH * s for s in steps]
    for record in after:  # warm-up continues where it stopped, at the rate given to each run
        rate = LR if record["step"] <= step else RESUME_LR
        assert record["lr"] == pytest.approx(rate * min(1.0, record["step"] / WARMUP), rel=1e-12)
    params = orjson.loads((stopped["out"] / "training_params.json").read_bytes())
    assert params["learning_rate"] == RESUME_LR  # the top level: the latest launch, what the workers read
    launches = params["launches"]  # the first launch's settings are kept, not replaced
    assert [(x["learning_rate"], x["resumed_from"]) for x in launches] == [
        (LR, None), (RESUME_LR, str(stopped["checkpoint"])),
    ]  # fmt: skip


def test_a_diverging_run_stops_at_the_step_and_saves_no_nan(diverged, tmp_path):
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    done, out = diverged["done"], diverged["out"]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    good = _metrics(out)  # the steps taken before the divergence
    assert good and all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in good)
    bad_step = len(good) + 1
    messages = re.findall(r"^minitrain: error \(rank \d\): (.*)$", done.stderr, re.MULTILINE)
    assert messages, done.stderr[-3000:]
    for message in messages:  # one line per rank, each naming the step it stopped at
        assert message.startswith(f"step {bad_step}: the loss") and "non-finite" in message, message
        assert "--learning-rate" in message
    assert done.stderr.rstrip().splitlines()[-1].startswith("minitrain: error: training failed (exit 1)")
    assert "Traceback" not in done.stderr

    exports = sorted((out / "hf_format").iterdir())
    assert [p.name for p in exports] == [f"samples_{BATCH * s}" for s in range(1, bad_step)]
    for export in exports:
        for key, tensor in load_file(export / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (export.name, key)
    latest = _latest(out)
    assert latest.name == f"samples_{BATCH * (bad_step - 1)}"  # resumable from the last good step
    dcp_to_torch_save(latest / "state", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    tensors = [t for t in _leaves(state) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)  # weights and both AdamW moments


def test_an_existing_run_is_refused_then_overwritten(resumed):
    refused, full = resumed["refused"], resumed["full"]
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert lines[0].startswith(f"minitrain: error: --output-dir {full} already holds a run")
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert resumed["untouched"]  # the refused command changed nothing

    metrics = _metrics(full)  # after --overwrite
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))  # from step 1 again, no old line
    first = orjson.loads(resumed["held"].splitlines()[0])
    assert metrics[0]["loss"] == pytest.approx(
        first["loss"], rel=1e-6
    )  # fresh weights, not the diverged ones
    exports = sorted(p.name for p in (full / "hf_format").iterdir())
    assert exports == [f"samples_{HALF * BATCH}", f"samples_{STEPS * BATCH}"]  # the diverged run's are gone
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["latest", *exports]


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)
    else:
        yield value
