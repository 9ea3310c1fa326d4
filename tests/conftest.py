"""Shared test fixtures: offline mode, the real fixture tokenizers and data, and tiny models built from a
config."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"fixtures folder {FIXTURES} is absent")
    return FIXTURES


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
