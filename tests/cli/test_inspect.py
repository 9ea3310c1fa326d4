"""minitrain/cli/inspect.py: the real command on tokenized files built from the fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minitrain.cli import app
from minitrain.errors import UserError
from tests.conftest import FIXTURES, SMOLLM2
from tests.inspect.test_inspect import (
    FASTCHAT,
    corrupt_eot_masked,
    reference_rows,
    tokenizer,
    write_tokenized,
)

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures folder {FIXTURES} is absent")


@pytest.fixture(scope="module")
def rows():
    return reference_rows("smollm2", FASTCHAT, limit=6)


@pytest.fixture
def clean(tmp_path: Path, rows) -> Path:
    return write_tokenized(tmp_path / "out.jsonl", rows, "smollm2")


def invoke(*args: str):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_default_view_is_the_first_three_samples_in_plain_text(clean: Path) -> None:
    result = invoke(clean)
    assert result.exit_code == 0, result.output
    headers = [line for line in result.output.splitlines() if line.startswith("=== sample")]
    assert [h.split(" | ")[0] for h in headers] == ["=== sample 0", "=== sample 1", "=== sample 2"]
    first = result.output.split("\n\n")[0]  # header + text of sample 0, not a terminal: delimiters, no ANSI
    assert first == (
        "=== sample 0 | source line 1 | 76 tokens | 26 trained (34.2%) ===\n"
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
        "⟦I am Vicuna, a language model trained by researchers from Large Model Systems Organization "
        "(LMSYS).<|im_end|>⟧\n"
        "<|im_start|>user\nHave a nice day!<|im_end|>\n<|im_start|>assistant\n⟦You too!<|im_end|>⟧"
    )
    assert "\x1b[" not in result.output


def test_index_tokens_grep_and_random(clean: Path, rows) -> None:
    result = invoke(clean, "--index", 4, "--index", 1, "--tokens")
    assert result.exit_code == 0, result.output
    assert [line.split(" | ")[0] for line in result.output.splitlines() if line.startswith("===")] == [
        "=== sample 1",
        "=== sample 4",
    ]
    assert "1:<|im_start|> 9690:system 198:Ċ" in result.output and "2:<|im_end|>⟧" in result.output
    tok = tokenizer("smollm2")
    matching = [i for i, r in enumerate(rows) if "Have a nice day" in tok.decode(r["input_ids"])]
    assert 1 <= len(matching) < len(rows)
    result = invoke(clean, "--grep", "Have a nice day", "-n", 5)
    assert [
        int(h.split(" | ")[0].split()[-1]) for h in result.output.splitlines() if h.startswith("===")
    ] == matching
    assert (
        "no sample matches --grep '[red]no such text'" in invoke(clean, "--grep", "[red]no such text").output
    )
    result = invoke(clean, "--random", 2, "--seed", 5)
    assert result.exit_code == 0 and result.output.count("=== sample") == 2


def test_stats_with_packing(clean: Path) -> None:
    result = invoke(clean, "--stats", "--max-tokens-per-gpu", 256, "--batch-size", 4, "--nproc", 2)
    assert result.exit_code == 0, result.output
    for needle in (
        "samples",
        "trained fraction",
        "length p99",
        "length histogram",
        "longest samples",
        "steps per epoch",
    ):
        assert needle in result.output, needle
    assert "=== sample" not in result.output  # --stats alone shows no samples


def test_audit_exit_codes(tmp_path: Path, clean: Path, rows) -> None:
    result = invoke(clean, "--audit", "--source", FASTCHAT)
    assert result.exit_code == 0, result.output
    assert "OK: 6 samples, no findings" in result.output and "6 samples compared" in result.output

    broken = [dict(r, labels=list(r["labels"])) for r in rows]
    corrupt_eot_masked(broken[2], tokenizer("smollm2"))
    bad = write_tokenized(tmp_path / "bad.jsonl", broken, "smollm2")
    result = invoke(bad, "--audit", "--stats")
    assert result.exit_code == 1
    assert "eot_not_trained" in result.output and "2: 1 span(s)" in result.output
    assert "FAIL: 1 error finding(s)" in result.output and "trained fraction" in result.output

    zero = [dict(r) for r in rows]
    zero[0] = dict(zero[0], labels=[-100] * zero[0]["len"], num_loss_counted_tokens=0)
    result = invoke(write_tokenized(tmp_path / "zero.jsonl", zero, "smollm2"), "--audit")
    assert (
        result.exit_code == 0 and "zero_trained" in result.output and "OK with 1 warning(s)" in result.output
    )


def test_help_documents_every_check() -> None:
    from minitrain.inspect.audit import CHECKS

    result = CliRunner().invoke(app, ["inspect", "--help"], terminal_width=200)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for kind, check in CHECKS.items():  # one line per check, with its severity as the library has it
        assert any(kind in line and f"({check.severity})" in line for line in lines), kind
    assert "⟦" in result.output


def test_user_mistakes_are_one_line_errors(tmp_path: Path, clean: Path) -> None:
    for args in (
        [tmp_path / "missing.jsonl"],
        [FASTCHAT],
        [clean, "-n", 2, "--random", 3],
        [clean, "--source", FASTCHAT],
        [clean, "--model-name-or-path", tmp_path / "no-tokenizer"],
    ):
        result = invoke(*args)
        assert isinstance(result.exception, UserError), (args, result.output)
        assert "\n" not in str(result.exception)


def test_the_console_script_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "minitrain", "inspect", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


def test_tokenizer_override(tmp_path: Path, rows) -> None:
    bare = tmp_path / "bare.jsonl"
    write_tokenized(bare, rows, None)
    assert "--model-name-or-path" in str(invoke(bare).exception)
    result = invoke(bare, "--model-name-or-path", SMOLLM2, "-n", 1)
    assert result.exit_code == 0 and "⟦I am Vicuna" in result.output
