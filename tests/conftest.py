"""Shared test fixtures: offline mode, the real fixture tokenizers and data, and tiny models built from a
config."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --compile's tests build inductor's kernels in the compiling process instead of a pool of compile workers
# (each one imports torch): on a fresh machine's empty cache, 148 CPU-s for tests/train/test_compile.py
# instead of 169, on 2 cores
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"
DATA = FIXTURES / "data"
SMOLLM2 = TOKENIZERS / "smollm2-135m-instruct"
TINYLLAMA = TOKENIZERS / "tinyllama-1.1b-chat-v1.0"
QWEN3 = TOKENIZERS / "qwen3"
MESSAGES_FILES = sorted(DATA.glob("*.messages.jsonl"))

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures folder {FIXTURES} is absent")


# The modules that train models, longest first (`--durations` on 2 workers). `--dist loadfile` hands whole
# modules to the xdist workers in collection order; collected alphabetically, the longest (tests/train/...)
# came last and one worker ran them alone at the end. Longest first, the short modules fill in around them.
LONGEST_FIRST = (
    "tests/train/test_dpo.py",
    "tests/test_resume.py",
    "tests/train/test_qlora_runs.py",
    "tests/train/test_adapter_runs.py",
    "tests/train/test_compile.py",
    "tests/train/test_loop.py",
    "tests/cli/test_train.py",
    "tests/train/test_checkpoint.py",
    "tests/train/test_launch_signals.py",
    "tests/train/test_eval_runs.py",
    "tests/test_e2e.py",
    "tests/train/test_faults.py",
    "tests/test_demo.py",
    "tests/cli/test_configopt.py",
    "tests/test_bad_input.py",
    "tests/train/test_trackers.py",
    "tests/train/test_launch.py",
    "tests/train/test_sharding.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the LONGEST_FIRST modules first, in that order; every module's tests stay together and in order."""
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}

    def module_rank(item: pytest.Item) -> int:
        return rank.get(Path(item.path).relative_to(REPO).as_posix(), len(rank))

    items.sort(key=module_rank)  # stable: the rest keep their collection order


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"fixtures folder {FIXTURES} is absent")
    return FIXTURES


# What a launcher (torchrun, srun) or a debugging user may have set: a test's `minitrain` starts without them.
OUTER_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MINITRAIN_DEBUG")


def outside_any_launch(**extra: str) -> dict[str, str]:
    """This process's environment as a shell outside any launcher would give it to `minitrain`: no rank
    variables, no MINITRAIN_DEBUG (errors stay one line), one OpenMP thread per process (2 cores shared by
    the two pytest workers), then `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_LAUNCH}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def in_process_if_one_rank(args: Sequence[str | Path], env: Mapping[str, str]) -> dict[str, str]:
    """`env` for `python -m minitrain ARGS`; with `--nproc 1`, that of rank 0 of 1 of an outer launch.

    `minitrain train` then trains in its own process (the launched-env path srun uses) instead of starting
    torchrun's process and one rank: two imports of torch fewer (user CPU 11.4 s against 20.0 s for a 2-step
    run here) and the same per-step losses, byte for byte. For tests whose point is not the launch itself.
    """
    words = [str(a) for a in args]
    if not any(words[i : i + 2] == ["--nproc", "1"] for i in range(len(words) - 1)):
        return dict(env)
    with socket.socket() as s:  # a free port for the one-process group, as torchrun --standalone picks one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    return {**env, **rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_minitrain(
    args: Sequence[str | Path], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m minitrain ARGS` with `minitrain` itself running in this test process: its exit code,
    stdout and stderr, as `subprocess.run(..., capture_output=True, text=True)` returns them.

    For tests of what a run computes, not of how a process starts or stops. The CLI (and with `--nproc 1`
    the one rank, see `in_process_if_one_rank`) runs where torch and transformers are imported already:
    a 2-step 1-rank run measured 0.3 CPU-s here against 8 in a fresh process, a 2-rank run's parent 0.1
    against 3-5 (its torchrun and ranks are real processes as before). What a run changes in the process
    is put back: environment (`env` replaces it for the call), working folder, torch's thread count
    (OMP_NUM_THREADS, as a fresh process reads it) and random state, sys.argv. Both streams go to files
    through fds 1 and 2, so what the ranks print is captured with the CLI's own lines, in order.
    Not for a run a test signals or kills, nor one that must not import torch: use a subprocess there.
    While a test holds a process group of its own here, the run is a subprocess (a run in this process
    would join that group and destroy it at its end).
    """
    import torch
    import torch.distributed as dist

    from minitrain.cli import main

    words = [str(a) for a in args]
    env = in_process_if_one_rank(words, os.environ if env is None else env)
    if dist.is_available() and dist.is_initialized():
        return subprocess.run(
            [sys.executable, "-m", "minitrain", *words], cwd=cwd, env=env, capture_output=True, text=True
        )
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_threads, saved_rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd or saved_cwd)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        sys.argv = ["minitrain", *words]
        with _captured_streams() as captured:
            try:
                main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        gc.unfreeze()  # main() freezes the heap for its process's exit; this process goes on
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(saved_rng)
    return subprocess.CompletedProcess(["minitrain", *words], code, *captured)


@contextmanager
def _captured_streams() -> Iterator[list[str]]:
    """fds 1 and 2 (and sys.stdout, sys.stderr over them) into two files while inside; the list yielded
    holds their texts (stdout, stderr) once outside."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp) / "stdout", Path(tmp) / "stderr"
        captured: list[str] = []
        streams = sys.stdout, sys.stderr
        for stream in streams:
            stream.flush()
        saved = os.dup(1), os.dup(2)
        try:
            with paths[0].open("wb") as out, paths[1].open("wb") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                with (
                    open(1, "w", encoding="utf-8", buffering=1, closefd=False) as sys.stdout,
                    open(2, "w", encoding="utf-8", buffering=1, closefd=False) as sys.stderr,
                ):
                    yield captured
        finally:
            sys.stdout, sys.stderr = streams
            for fd, kept in zip((1, 2), saved, strict=True):
                os.dup2(kept, fd)
                os.close(kept)
            captured[:] = [path.read_bytes().decode("utf-8", "replace") for path in paths]


def tiny_llama_config(vocab_size: int = 512, **overrides):
    """A 2-layer Llama config small enough to train on a CPU in seconds."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_softcapped_config():
    """A 1-layer Gemma 2 config: its head soft-caps the logits (final_logit_softcapping=30 by default)."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=16,
    )


@pytest.fixture
def tiny_llama():
    """A freshly initialised, seeded tiny Llama in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa").eval()
