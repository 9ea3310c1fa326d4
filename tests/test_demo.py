"""minitrain/demo.py and minitrain/assets/demo: the dataset, the shipped assets, and a short demo run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from minitrain.demo import arithmetic_conversations, assets_dir, run_demo

REPO = Path(__file__).resolve().parents[1]


def test_the_dataset_is_seeded_and_its_answers_are_right():
    first = list(arithmetic_conversations(200, seed=3))
    assert first == list(arithmetic_conversations(200, seed=3))
    assert first != list(arithmetic_conversations(200, seed=4))
    for record in first:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.", assistant["content"]).groups()
        assert a in user["content"] and b in user["content"]
        assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_shipped_tokenizer_matches_the_model_config_and_splits_digits():
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets_dir())
    config = AutoConfig.from_pretrained(assets_dir())
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(next(arithmetic_conversations(1))["messages"], tokenize=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_build_script_reproduces_the_committed_assets(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "build_demo_assets", REPO / "scripts" / "build_demo_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path / "demo")
    committed = sorted(p.name for p in assets_dir().iterdir())
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == committed
    for name in committed:
        assert (tmp_path / "demo" / name).read_bytes() == (assets_dir() / name).read_bytes(), name


@pytest.mark.slow
def test_a_short_demo_trains_and_the_loss_falls(tmp_path):
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    console = Console(record=True, width=100)
    result = run_demo(tmp_path, nproc=2, num_samples=400, max_steps=40, console=console)
    assert result.steps == 40
    assert result.last_loss < 0.5 * result.first_loss, (result.first_loss, result.last_loss)
    assert result.tokenized.is_file() and result.dataset.is_file()
    assert result.checkpoint == result.run_dir / "hf_format" / "samples_1280"
    AutoModelForCausalLM.from_pretrained(result.checkpoint)
    shown = console.export_text()
    assert "trained" in shown and "loss" in shown  # the inspected sample and the loss curve were printed
