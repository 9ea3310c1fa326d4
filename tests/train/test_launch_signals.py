"""minitrain/train/launch.py's signals: forwarding to torchrun, and Ctrl+C at any moment of start-up.

Split from tests/train/test_launch.py so that the two modules, each a few minutes of torchrun launches on
2 cores, run on the two pytest-xdist workers side by side (`--dist loadfile` keeps a module on one worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.train.test_launch import _model
from tests.train.test_loop import write_tokenized


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_the_child(tmp_path, signum):
    child = textwrap.dedent(f"""
        from minitrain.train.faults import start_quietly
        start_quietly()  # as torchrun's process does first: run_command starts it with the signals blocked
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(tmp_path / "got")!r}).write_text(str(signum))
            sys.exit(1)  # as torchrun does when interrupted
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        pathlib.Path({str(tmp_path / "ready")!r}).touch()
        time.sleep(60)
    """)
    parent = (
        "import sys; from minitrain.train.launch import run_command; "
        f"sys.exit(run_command([sys.executable, '-c', {child!r}]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum  # 130 for Ctrl+C, 143 for SIGTERM, whatever the child said
    assert (tmp_path / "got").read_text() == str(int(signum))


# --- Ctrl+C at any moment of start-up: our one line, exit 130, no traceback ---------------------------------


def _at(pid: int, module: str, stage: str) -> bool:
    """True when process `pid` runs `python [-u] -m module` (its own module, not an argument of torchrun's
    command line) and is at `stage`: "starting" (Python's start-up, before torch: SIGINT handled by Python or
    blocked by its launcher, libtorch not mapped) or "importing-torch" (libtorch mapped)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if module.encode() != argv[argv.index(b"-m") + 1]:
            return False
        torch_mapped = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError, IndexError):
        return False
    sigint = 1 << (signal.SIGINT - 1)
    caught_or_blocked = (int(status["SigCgt"], 16) | int(status["SigBlk"], 16)) & sigint
    return torch_mapped if stage == "importing-torch" else bool(caught_or_blocked) and not torch_mapped


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the child processes in /proc (Linux)")
@pytest.mark.parametrize(
    "moment",
    ["torchrun-starting", "torchrun-importing-torch", "rank-starting", "rank-importing-torch"],
)
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, moment):
    """SIGINT to `minitrain train` (as a terminal's Ctrl+C reaches it) and to torchrun's process or the
    rank while it starts Python (the `site` import: "Fatal Python error" and a traceback) or imports torch
    (a 45-line KeyboardInterrupt traceback): one line, exit 130. The signal goes to the process itself too,
    so that it lands at that moment and not only after the launcher forwarded it a few ms later."""
    from minitrain.train.faults import _descendants, kill_process_tree

    data = write_tokenized(tmp_path / "d.jsonl", num=8, vocab=100, seed=0)
    model = _model(tmp_path, 128)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
    }
    cmd = [
        sys.executable, "-m", "minitrain", "train", "--data-path", str(data),
        "--model-name-or-path", str(model), "--output-dir", str(tmp_path / "o"), "--from-scratch",
        "--nproc", "1", "--batch-size", "4",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env | {"OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    who, stage = moment.split("-", 1)
    module = "minitrain.train.launch" if who == "torchrun" else "minitrain.train.worker"
    try:
        deadline = time.monotonic() + 120
        while not (target := [p for p in _descendants(proc.pid) if _at(p, module, stage)]):
            assert proc.poll() is None and time.monotonic() < deadline, "the process never started"
            time.sleep(0.002)
        os.kill(target[0], signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc.pid)
            proc.wait()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output and "Fatal" not in output, output
    assert output.rstrip("\n").splitlines()[-1] == "minitrain: training interrupted (exit 130)", output
