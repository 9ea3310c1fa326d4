"""The assembled `minitrain` app: help surface, version, import cost, completion answers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from minitrain import __version__
from minitrain.cli import app

COMMANDS = ("tokenize", "inspect", "train", "plot", "demo")


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_every_command_has_help():
    for command in COMMANDS:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"minitrain {__version__}"


def test_importing_the_cli_imports_no_heavy_library():
    code = (
        "import sys, minitrain.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'numpy', 'tokenizers') if m in "
        "sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_help_through_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "minitrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "tokenize" in out.stdout


def test_completion_request_answers_subcommands():
    env = dict(os.environ, _MINITRAIN_COMPLETE="complete_bash", COMP_WORDS="minitrain tr", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-m", "minitrain"], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["train"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
        (["train"], "Missing option '--data-path'; see 'minitrain train --help'"),
        (["trian"], "No such command 'trian'. Did you mean 'train'?; see 'minitrain --help'"),
        (["plot"], "Missing argument 'RUN'; see 'minitrain plot --help'"),
        (["inspect", "x.jsonl", "extra"], "unexpected extra argument"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(args, message):
    out = subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minitrain: error: ") and message in lines[0], out.stderr
    assert out.stdout == ""


def test_bare_minitrain_prints_the_help():
    out = subprocess.run([sys.executable, "-m", "minitrain"], capture_output=True, text=True)
    assert out.returncode == 2 and "Usage" in out.stdout and "train" in out.stdout, out.stderr


def test_a_finished_command_freezes_the_heap_and_run_minitrain_thaws_it():
    """`main()` freezes the garbage collector's heap once the command is done (the interpreter's last
    collections would walk every imported object for nothing); an error exit does not need it. In the test
    process, `run_minitrain` puts it back."""
    import gc

    from tests.conftest import run_minitrain

    code = (
        "import gc, sys\n"
        "from minitrain.cli import main\n"
        "sys.argv = ['minitrain', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "plot", "--help"], capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["0", "True"], done.stderr
    done = subprocess.run([sys.executable, "-c", code, "plot", "--nope"], capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["2", "False"], done.stderr
    assert run_minitrain(["plot", "--help"]).returncode == 0
    assert gc.get_freeze_count() == 0
