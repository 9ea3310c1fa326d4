"""minitrain/demo.py and minitrain/assets/demo: the dataset, the shipped assets, and a short demo run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from minitrain.demo import (
    DEMO_MARKER,
    arithmetic_conversations,
    assets_dir,
    default_output_dir,
    prepare_output_dir,
    run_demo,
)
from minitrain.errors import UserError

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

    # A second run into the same folder: refused without --overwrite, before any work ...
    with pytest.raises(UserError) as err:
        run_demo(tmp_path, nproc=1, num_samples=64, max_steps=2, console=console)
    assert str(err.value) == (
        f"--output-dir {tmp_path} already holds a demo run; add --overwrite to replace it, or choose another "
        "--output-dir"
    )
    assert result.checkpoint.is_dir()
    # ... and with it, a fresh run replaces the first one's data and run, and leaves the user's files alone.
    (tmp_path / "notes.txt").write_text("mine")
    again = run_demo(tmp_path, overwrite=True, nproc=1, num_samples=64, max_steps=2, console=console)
    assert again.steps == 2 and not result.checkpoint.exists()  # the first run's samples_1280 export is gone
    assert len(again.tokenized.read_text().splitlines()) == 64
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_default_output_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_output_dir() == tmp_path / "xdg" / "minitrain" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_output_dir() == tmp_path / "home" / ".cache" / "minitrain" / "demo"


def test_overwrite_replaces_only_a_previous_demo(tmp_path):
    prepare_output_dir(tmp_path / "new", overwrite=False)  # created, and marked as the demo's
    assert (tmp_path / "new" / DEMO_MARKER).is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run").mkdir()
    (mine / "run" / "keep.txt").write_text("not the demo's")
    with pytest.raises(UserError, match="is not empty and holds no demo run"):
        prepare_output_dir(mine, overwrite=True)  # no marker: never touched, even with --overwrite
    assert (mine / "run" / "keep.txt").is_file()
    demo = tmp_path / "new"
    for part in ("data", "run"):
        (demo / part).mkdir()
        (demo / part / "x").write_text("old")
    (demo / "other.txt").write_text("kept")
    prepare_output_dir(demo, overwrite=True)
    assert sorted(p.name for p in demo.iterdir()) == [DEMO_MARKER, "other.txt"]
