"""The committed shell completion scripts are what scripts/gen_completions.py generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
