"""Faults (minitrain/train/faults.py): non-finite steps, graceful SIGTERM/SIGINT, signal forwarding in the
launcher, orphan protection, and one rank dying.

The two torchrun tests use tests/train/checkpoint_worker.py: `stop` trains a tiny Llama on 2 ranks until a
signal and must stop every rank at the same step, save a complete checkpoint and exit 143; `hang` loops on
all_reduce and must end within seconds (non-zero) when one rank is SIGKILLed.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from minitrain.errors import UserError
from minitrain.rundir import find_latest_checkpoint, is_complete, scan_checkpoints
from minitrain.train.dist import DistInfo
from minitrain.train.faults import (
    STOP_SIGNALS,
    NonFiniteError,
    StopFlag,
    check_finite,
    kill_process_tree,
    wait_forwarding_signals,
)
from tests.train.test_checkpoint import REPO, WORKER, make_run_dir

SOLO = DistInfo(
    rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend="gloo"
)
ENV = {
    **os.environ,
    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_check_finite_passes_numbers_and_names_the_step_otherwise() -> None:
    check_finite(2.5, torch.tensor(0.3), step=1)
    with pytest.raises(NonFiniteError, match=r"^step 7: the loss became non-finite \(loss nan") as err:
        check_finite(torch.tensor(math.nan), 1.0, step=7)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert "no NaN weights were saved" in str(err.value) and "--learning-rate" in str(err.value)
    with pytest.raises(NonFiniteError, match="step 3: the gradient norm became non-finite"):
        check_finite(1.0, torch.tensor(math.inf), step=3)
    with pytest.raises(NonFiniteError, match="the loss and the gradient norm"):
        check_finite(math.inf, math.nan, step=3)


def test_stop_flag_records_the_first_signal_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag(announce=False) as stop:
        assert not stop.should_stop(SOLO) and stop.agreed == 0
        os.kill(os.getpid(), signal.SIGTERM)  # handled: this test process lives on
        assert stop.received == signal.SIGTERM
        assert stop.should_stop(SOLO) and stop.agreed == signal.SIGTERM and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    stop = StopFlag()
    stop.request(signal.SIGINT)
    assert stop.should_stop(SOLO) and stop.agreed == signal.SIGINT


def test_a_second_signal_ends_the_worker_at_once() -> None:
    script = textwrap.dedent(
        """
        import os, signal, time
        from minitrain.train.faults import StopFlag
        with StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT
            print("first handled", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still alive", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stdout + proc.stderr
    assert "first handled" in proc.stdout and "still alive" not in proc.stdout
    assert "SIGINT received; stopping after this step" in proc.stderr


def _send_to_self_when_forwarding(signals: list[int], gap: float = 0.5) -> threading.Thread:
    """Send `signals` to this process once `wait_forwarding_signals` has installed its handler."""
    original = signal.getsignal(signal.SIGTERM)

    def send() -> None:
        deadline = time.monotonic() + 30
        while signal.getsignal(signal.SIGTERM) is original and time.monotonic() < deadline:
            time.sleep(0.02)
        for sig in signals:
            time.sleep(gap)
            os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _spawn_tree(tmp_path: Path, *, child_on_term: str) -> subprocess.Popen:
    """A stand-in for torchrun (its own session) with a 'worker' grandchild in a session of its own."""
    script = textwrap.dedent(
        f"""
        import signal, subprocess, sys, time
        worker = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        open({str(tmp_path / "worker.pid")!r}, "w").write(str(worker.pid))
        signal.signal(signal.SIGTERM, {child_on_term})
        signal.signal(signal.SIGINT, {child_on_term})
        time.sleep(60)
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ")[1][:1] not in (b"Z", b"X")
    except OSError:
        return False


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_the_launcher_forwards_the_first_signal_and_kills_the_tree_on_the_second(tmp_path: Path) -> None:
    # first signal: forwarded; the child (like torchrun) exits 1 -> reported as 128 + SIGTERM
    proc = _spawn_tree(tmp_path, child_on_term="lambda *a: sys.exit(1)")
    _wait_for(tmp_path / "worker.pid")
    worker = int((tmp_path / "worker.pid").read_text())
    _send_to_self_when_forwarding([signal.SIGTERM])
    assert wait_forwarding_signals(lambda: proc) == (143, signal.SIGTERM)
    kill_process_tree(worker)

    # the child ignores the first one (a graceful stop in progress); the second kills it and its worker
    (tmp_path / "worker.pid").unlink()
    proc = _spawn_tree(tmp_path, child_on_term="signal.SIG_IGN")
    _wait_for(tmp_path / "worker.pid")
    worker = int((tmp_path / "worker.pid").read_text())
    notes: list[str] = []
    _send_to_self_when_forwarding([signal.SIGINT, signal.SIGINT])
    started = time.monotonic()
    assert wait_forwarding_signals(lambda: proc, notify=notes.append) == (130, signal.SIGINT)
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)  # the worker in its own session died too
    assert "press Ctrl+C again to abort" in notes[0] and "aborting now" in notes[1]


def test_a_child_started_by_the_launcher_holds_an_early_signal_until_it_can_end_quietly() -> None:
    """The launcher starts the child with SIGINT/SIGTERM blocked: a SIGINT during its start-up waits (no
    KeyboardInterrupt traceback) and ends it, with nothing printed, at `start_quietly`."""
    script = textwrap.dedent(
        """
        import os, signal
        os.kill(os.getpid(), signal.SIGINT)  # lands during start-up: still pending, Python's handler not run
        print("pending", flush=True)
        from minitrain.train.faults import start_quietly
        start_quietly()
        print("after start_quietly", flush=True)
        """
    )
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        cmd = [sys.executable, "-c", script]
        out = subprocess.PIPE
        started.append(subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True))
        return started[0]

    assert wait_forwarding_signals(start) == (130, None)  # killed by SIGINT: 128 + 2
    output = started[0].stdout.read()
    assert output == "pending\n", output  # no traceback, nothing after start_quietly
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS) == set()  # ours let in again


def test_children_of_the_torchrun_process_start_blocked_while_it_still_gets_the_signal() -> None:
    script = textwrap.dedent(
        """
        import os, re, signal, subprocess, sys, time
        from minitrain.train.faults import block_stop_signals_in_children
        got = []
        signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
        block_stop_signals_in_children()
        status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
        blocked = int(re.search(r"SigBlk:\\s*(\\w+)", status).group(1), 16)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        print(blocked & (1 << (signal.SIGINT - 1)) != 0, blocked & (1 << (signal.SIGTERM - 1)) != 0, got)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"True True [{int(signal.SIGINT)}]", done.stdout + done.stderr


def test_a_worker_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        code = "from minitrain.train.faults import die_with_parent; import time; die_with_parent(); " \\
               "open({str(tmp_path / "ready")!r}, 'w').close(); time.sleep(60)"
        worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        open({str(tmp_path / "worker.pid")!r}, "w").write(str(worker.pid))
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env=ENV)
    _wait_for(tmp_path / "ready")
    worker = int((tmp_path / "worker.pid").read_text())
    parent.kill()  # SIGKILL: no chance to clean up
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_a_diverging_run_stops_before_nan_reaches_the_weights(tmp_path: Path) -> None:
    from minitrain.train.checkpoint import load_training_state, save_training_state

    class Sampler:
        def state_dict(self) -> dict:
            return {"num_samples": 1, "seed": 0, "epoch": 0, "position": 0}

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)  # w <- w (1 - 2 lr |x|^2): explodes
    x = torch.ones(1, 8)
    with pytest.raises(NonFiniteError) as err:
        for step in range(1, 200):
            loss = model(x).square().sum()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
            check_finite(loss, norm, step)
            optimizer.step()
            optimizer.zero_grad()
            if step % 3 == 0:
                save_training_state(
                    tmp_path, model=model, optimizer=optimizer, scheduler=None, sampler=Sampler(),
                    counters={"step": step, "samples_seen": step}, dist=SOLO,
                )  # fmt: skip
    assert re.match(rf"step {step}: ", str(err.value))
    assert torch.isfinite(model.weight).all()  # the diverged step was not taken
    latest = find_latest_checkpoint(tmp_path)
    assert latest is not None
    fresh = torch.nn.Linear(8, 1, bias=False)
    load_training_state(
        latest, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=10.0), scheduler=None, dist=SOLO
    )
    assert torch.isfinite(fresh.weight).all()


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_the_same_step_saves_and_exits_143(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(
            [*TORCHRUN, str(WORKER), "stop", str(run_dir)], cwd=REPO, env=ENV, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        progress = run_dir / "progress.txt"
        deadline = time.monotonic() + 180
        while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_process_tree(proc.pid)
                pytest.fail((tmp_path / "torchrun.log").read_text()[-4000:])
            time.sleep(0.05)
        _send_to_self_when_forwarding(
            [signal.SIGTERM], gap=0
        )  # as if a scheduler preempted `minitrain train`
        code, first = wait_forwarding_signals(lambda: proc)
    output = (tmp_path / "torchrun.log").read_text()
    assert (code, first) == (143, signal.SIGTERM), output[-4000:]
    stopped = [json.loads((run_dir / f"stopped_{r}.json").read_text()) for r in range(2)]
    assert stopped[0]["step"] == stopped[1]["step"] >= 2, stopped  # the same step boundary on both ranks
    assert all(s["exit_code"] == 143 and s["received"] == signal.SIGTERM for s in stopped), stopped
    latest = find_latest_checkpoint(run_dir)
    assert latest is not None and latest.name == stopped[0]["checkpoint"] and is_complete(latest)
    assert latest.name == f"samples_{4 * stopped[0]['step']}" and scan_checkpoints(run_dir).incomplete == ()
    assert "SIGTERM received; stopping after this step" in output


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_whole_run_within_seconds(tmp_path: Path) -> None:
    with open(tmp_path / "torchrun.log", "w") as log:
        proc = subprocess.Popen(
            [*TORCHRUN, str(WORKER), "hang", str(tmp_path)], cwd=REPO, env=ENV, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            for rank in range(2):
                _wait_for(tmp_path / f"pid_{rank}.txt", timeout=180)
            time.sleep(0.5)  # both ranks inside their all_reduce loop
            victim = int((tmp_path / "pid_1.txt").read_text())
            survivor = int((tmp_path / "pid_0.txt").read_text())
            os.kill(victim, signal.SIGKILL)
            started = time.monotonic()
            code = proc.wait(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                kill_process_tree(proc.pid)
    output = (tmp_path / "torchrun.log").read_text()
    assert code != 0, output[-4000:]
    assert elapsed < 30, (elapsed, output[-4000:])
    assert not _alive(survivor)
    assert re.search(r"rank\s*:\s*1\b", output) and "SIGKILL" in output, output[-4000:]  # names the dead rank
    print(f"one rank SIGKILLed: torchrun exited {code} after {elapsed:.2f} s")
