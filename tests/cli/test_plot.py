"""minitrain/cli/plot.py: `minitrain plot` end to end: terminal, image, errors, --watch, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minitrain import plot as lib
from minitrain.cli import app
from minitrain.errors import UserError
from tests.plot.test_plot import metrics_rows, run_dir, write_metrics

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(app, ["plot", *map(str, args)], terminal_width=100)


def test_terminal_plot_and_image_hint(tmp_path):
    a = run_dir(tmp_path, "run-a", metrics_rows(40, eval_every=10))
    b = run_dir(tmp_path, "run-b", metrics_rows(40, lr=3e-4))
    result = invoke(a, b, "--smooth", "0.5")
    assert result.exit_code == 0, result.output
    for text in ("run-a", "run-b", "loss", "grad_norm", "tokens_per_second", "step", "hint: -o"):
        assert text in result.output


def test_image_with_chosen_metrics_and_axis(tmp_path):
    path = write_metrics(tmp_path / "metrics.jsonl", metrics_rows(20))
    out = tmp_path / "curves.png"
    result = invoke(path, "-m", "loss", "--metric", "grad_norm", "--x", "tokens", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in result.output.replace("\n", "")
    assert "hint" not in result.output and "┌" not in result.output  # no terminal plot without --terminal
    both = invoke(path, "-m", "loss", "-o", out, "--terminal")
    assert both.exit_code == 0 and "┌" in both.output and "tokens" not in both.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "does not exist"),
        (["empty.jsonl"], "is empty"),
        (["m.jsonl", "-m", "acc"], "unknown metric 'acc'; available:"),
        (["m.jsonl", "--smooth", "1.5"], "out of range"),
        (["m.jsonl", "-o", "c.gif"], "unknown image type"),
        (["broken.jsonl"], "broken.jsonl:2: not a JSON line"),
    ],
)
def test_user_errors(tmp_path, args, message):
    write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "broken.jsonl").write_bytes(b'{"step": 1, "loss": 1}\n{"step": 2,\n{"step": 3, "loss": 1}\n')
    args = [str(tmp_path / args[0]), *[str(tmp_path / a) if a.endswith(".gif") else a for a in args[1:]]]
    result = invoke(*args)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


def test_user_error_is_one_line_and_exit_1(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(3))
    proc = subprocess.run(
        [sys.executable, "-m", "minitrain", "plot", str(path), "--x", "samples", "-m", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("minitrain: error: unknown metric 'nope'; available:")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_watch_exits_cleanly_on_ctrl_c(tmp_path, monkeypatch):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(5))
    real_watch = lib.watch

    def interrupted(*a, **kw):
        def ctrl_c(seconds: float) -> None:
            raise KeyboardInterrupt

        return real_watch(*a, **kw, sleep=ctrl_c)

    monkeypatch.setattr(lib, "watch", interrupted)
    result = invoke(path, "--watch", "--interval", "0.1", "-m", "loss")
    assert result.exit_code == 0, result.output
    assert "loss" in result.output and "stopped watching" in result.output


WRAPPER = """
import runpy, sys
sys.argv = ["minitrain", "plot", *sys.argv[1:]]
try:
    runpy.run_module("minitrain", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
print("IMPORTED:" + ",".join(heavy))
"""


@pytest.mark.parametrize("image", [False, True])
def test_plot_never_imports_torch(tmp_path, image):
    path = write_metrics(tmp_path / "m.jsonl", metrics_rows(10))
    args = [str(path), "-o", str(tmp_path / "c.png")] if image else [str(path)]
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.strip().splitlines()[-1]
    assert imported == ("IMPORTED:matplotlib" if image else "IMPORTED:")
