"""Shared test fixtures: offline mode, the real fixture tokenizers and data, and tiny models built from a
config."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"
DATA = FIXTURES / "data"
SMOLLM2 = TOKENIZERS / "smollm2-135m-instruct"
TINYLLAMA = TOKENIZERS / "tinyllama-1.1b-chat-v1.0"
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
