"""Shell completion: the committed scripts are what scripts/gen_completions.py generates now, and every
option with fixed values completes them in bash, zsh and fish (asked of the real `python -m minitrain`)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minitrain.config import LOGGING_LEVELS, LR_SCHEDULERS, MASTER_DTYPES, SHARDING_STRATEGIES

REPO = Path(__file__).resolve().parents[2]


def test_completion_scripts_are_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_completions", REPO / "scripts" / "gen_completions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for shell, text in module.completion_scripts().items():
        committed = (REPO / "completions" / f"minitrain.{shell}").read_text()
        assert committed == text, (
            f"completions/minitrain.{shell} is stale: run python scripts/gen_completions.py"
        )


FIXED_VALUES = {  # every option whose values are a fixed set, and the set (the config's own tuples)
    ("train", "--lr-scheduler"): LR_SCHEDULERS,
    ("train", "--fsdp-sharding-strategy"): SHARDING_STRATEGIES,
    ("train", "--master-dtype"): MASTER_DTYPES,
    ("train", "--logging-level"): LOGGING_LEVELS,
    ("plot", "--x"): ("step", "samples", "tokens", "time"),
}


def _complete(shell: str, words: list[str]) -> list[str]:
    """What `minitrain` answers the shell's completion request for the last (empty) word of `words`."""
    line = " ".join(["minitrain", *words, ""])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "_TYPER"))}
    env |= {"_MINITRAIN_COMPLETE": f"complete_{shell}", "_TYPER_COMPLETE_ARGS": line}
    env |= {"COMP_WORDS": line, "COMP_CWORD": str(len(words) + 1), "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    done = subprocess.run(
        [sys.executable, "-m", "minitrain"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return re.findall(r"[A-Za-z_0-9]+", done.stdout.replace("_arguments", ""))


@pytest.mark.parametrize(("command", "option"), list(FIXED_VALUES), ids=" ".join)
def test_fixed_values_complete_in_bash(command: str, option: str):
    words = [command, *(["run"] if command == "plot" else []), option]
    assert _complete("bash", words) == list(FIXED_VALUES[command, option])


@pytest.mark.parametrize("shell", ["zsh", "fish"])
@pytest.mark.parametrize("option", ["--lr-scheduler", "--fsdp-sharding-strategy"])
def test_fixed_values_complete_in_zsh_and_fish(shell: str, option: str):
    assert _complete(shell, ["train", option]) == list(FIXED_VALUES["train", option])
