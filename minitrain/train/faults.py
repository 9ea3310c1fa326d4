"""Stopping a run on purpose or by accident without losing it: signals, non-finite values, dying processes.

Owns four small pieces, one per fault:

- `StopFlag` (in every worker): the first SIGINT/SIGTERM only *asks* for a stop; `should_stop(dist)` is
  called once per step boundary and all-reduces (MAX) the signal number, so every rank sees the request at
  the same step even when the signal reached them a few milliseconds apart. The loop then saves a checkpoint
  and the process exits with `errors.signal_exit_code` of the signal (130 for SIGINT, 143 for SIGTERM). A
  second signal to the same worker ends it at once (default action).
- `check_finite(loss, grad_norm, step)`: called after clipping and BEFORE `optimizer.step()`, so a diverged
  step raises `NonFiniteError` (one line, the step number) and no NaN ever reaches the weights or a
  checkpoint.
- `die_with_parent()` (in every worker): the kernel sends SIGKILL to the worker if its parent (torchrun)
  dies, so killing the launcher never leaves orphans training on.
- `wait_forwarding_signals(start)` (in the launcher): the first SIGINT/SIGTERM is forwarded to torchrun (which
  forwards it to every rank); a second one kills torchrun and every process under it at once.
- Start-up (a signal in the first ~0.2 s of a process, while Python imports `site` or our modules): a
  process ends in a `KeyboardInterrupt` traceback (or "Fatal Python error: init_import_site") if SIGINT
  reaches it before its entry point can install anything. So every process we start begins with
  SIGINT/SIGTERM *blocked* (the mask is inherited through fork and exec, and a blocked signal waits,
  pending, instead of being lost): the launcher blocks them while it starts torchrun, torchrun's process
  keeps them blocked in the thread that starts the ranks (`block_stop_signals_in_children`), and the
  first statement of each entry point (`start_quietly`) restores their default action - end the process,
  print nothing - and unblocks them, so a signal that came early is acted on then. The run's own
  handlers (torchrun's, `StopFlag`) replace that default later.

A rank that dies (killed, out of memory) ends the run through torchrun: with `--max-restarts 0` (the default)
its agent notices within `--monitor-interval` (0.1 s), sends SIGTERM to the other ranks and SIGKILL after
`--shutdown-timeout` seconds. Survivors blocked in a collective see the dead peer's closed connection (gloo:
at once) or the process group's timeout (NCCL). Measured here: SIGKILL of one of two gloo ranks ends the
torchrun in about a second (tests/train/test_faults.py). Trade-off: the shutdown timeout bounds both the time
a graceful stop has to save and the time a hung NCCL rank survives a dead peer; one number serves both.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

from minitrain.errors import UserError, signal_exit_code

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteError(UserError):
    """The loss or gradient norm of a step is NaN or infinite; the step was not taken."""


class StopFlag:
    """Graceful-stop request from SIGINT/SIGTERM, agreed across ranks at step boundaries.

    Use as `with StopFlag(announce=dist.is_main) as stop:` around the loop (main thread only), and at the end
    of every step: `if stop.should_stop(dist): save(); return` (the stop's signal is `stop.agreed`).
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS, *, announce: bool = True) -> None:
        self.signals = tuple(signals)
        self.announce = announce
        self.received = 0  # first signal this process got (0: none)
        self.agreed = 0  # the signal all ranks agreed on at the last `should_stop` (0: keep going)
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.restore()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (tests, or a stop decided by the program)."""
        self.received = self.received or int(signum)

    def should_stop(self, dist: Any) -> bool:
        """Collective (once per step, on every rank): True on all ranks if any rank was asked to stop."""
        import torch
        import torch.distributed as torch_dist

        if dist.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            flag = torch.tensor([self.received], dtype=torch.int64, device=dist.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)  # one int per step: negligible
            self.agreed = int(flag.item())
        else:
            self.agreed = self.received
        return self.agreed != 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.agreed).name if self.agreed else None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received:  # second signal: do not wait for the step boundary
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self.announce:  # os.write: safe even if the signal interrupted a print
            name = signal.Signals(signum).name
            os.write(
                2, f"minitrain: {name} received; stopping after this step to save a checkpoint\n".encode()
            )


def check_finite(loss: Any, grad_norm: Any, step: int) -> None:
    """Raise `NonFiniteError` if `loss` or `grad_norm` is NaN/inf; call before `optimizer.step()`.

    Pass the values every rank shares (the global loss, the total norm from clipping), so that all ranks
    raise at the same step instead of some waiting in the next collective.
    """
    loss_value, norm_value = _as_float(loss), _as_float(grad_norm)
    bad = [name for name, v in (("loss", loss_value), ("gradient norm", norm_value)) if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"step {step}: the {' and the '.join(bad)} became non-finite (loss {loss_value}, grad norm "
            f"{norm_value}); stopped before the optimizer step, so no NaN weights were saved; lower "
            f"--learning-rate (or raise --num-warmup-steps) and resume from the last checkpoint"
        )


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


def start_quietly() -> None:
    """The first statement of a process we start: SIGINT/SIGTERM end it at once with nothing printed (until
    the run installs its own handlers), then they are unblocked, so one that arrived while the process
    started, blocked by its launcher, is acted on now. Call it before any other import."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # the kernel ends the process: no Python code, no traceback
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def block_stop_signals_in_children() -> None:
    """From now on, processes this thread starts begin with SIGINT/SIGTERM blocked (see `start_quietly`),
    while this process still receives them. Call it from the main thread, before it starts children.

    The signals are blocked in this thread only; one helper thread, started first so that it keeps them
    unblocked, is where the kernel delivers them, and Python runs their handlers in the main thread as
    always (within torchrun's monitor interval, 0.1 s, when the main thread sleeps).
    """
    receiver = threading.Thread(target=threading.Event().wait, name="minitrain-signals", daemon=True)
    receiver.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def wait_forwarding_signals(
    start: Callable[[], subprocess.Popen], *, notify: Callable[[str], None] | None = None
) -> tuple[int, int | None]:
    """Start the child (`start()`), wait for it, forwarding the first SIGINT/SIGTERM to it and killing its
    tree on the second.

    Returns (exit code, first signal or None). The code is the child's, or 128 + N for death by signal N;
    when the user sent a signal and the child exited non-zero, it is 128 + that signal (torchrun itself
    reports a forwarded signal as a plain failure). `start` should pass `start_new_session=True`, so a
    terminal Ctrl+C reaches the child only through here. It is called after the handlers are in place, with
    SIGINT/SIGTERM blocked (inherited by the child, whose entry point calls `start_quietly`); a signal that
    arrives meanwhile is forwarded as soon as the child exists.
    """
    received: list[int] = []
    child: list[subprocess.Popen] = []  # filled by start(); the handler may run before it exists

    def handle(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            if child and child[0].poll() is None:
                child[0].send_signal(signum)
            if notify:
                notify(
                    f"{name}: stopping at the next step and saving a checkpoint; press Ctrl+C again to abort"
                )
        elif len(received) == 2 and child:
            kill_process_tree(child[0].pid)
            if notify:
                notify(f"{name} again: aborting now (the last complete checkpoint is kept)")

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.append(start())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what came meanwhile is handled here
        if received and child[0].poll() is None:  # it came before the child existed: forward it now
            child[0].send_signal(received[0])
            if len(received) > 1:
                kill_process_tree(child[0].pid)
        code = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = signal_exit_code(-code) if code < 0 else code
    first = received[0] if received else None
    if first is not None and code != 0:
        code = signal_exit_code(first)
    return code, first


def kill_process_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to `pid` and every descendant (torchrun starts its workers in sessions of their own, so
    a process-group kill would miss them). Returns the pids signalled."""
    pids = [pid, *_descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone / not ours
            os.kill(p, sig)
    return pids


def _descendants(pid: int) -> list[int]:
    """All descendants of `pid`, from /proc (Linux); [] elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "pid (comm) state": ppid
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _as_float(value: Any) -> float:
    if hasattr(value, "full_tensor"):  # a DTensor (FSDP2 total norm)
        value = value.full_tensor()
    if hasattr(value, "item"):
        value = value.item()
    return float(value)
