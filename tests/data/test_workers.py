"""Tests for minitrain/data/workers.py: results in input order from this process and its workers, the
start method chosen by the thread count, the send rule that avoids deadlock, and clean stops.

The tokenize stage's own runs through the workers (same bytes as one process, Ctrl-C, signals, a killed
worker) are in test_pipeline.py; these use a plain function as the work.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from minitrain.data import workers as pool
from tests.conftest import REPO, SMOLLM2, needs_fixtures


def _square_all(state: int, chunk: list[int]) -> list[tuple[int, int]]:
    """The work: (pid, state + x * x) per item, so a test sees who did it and that `state` arrived."""
    return [(os.getpid(), state + x * x) for x in chunk]


def _slow_square_all(state: int, chunk: list[int]) -> list[tuple[int, int]]:
    time.sleep(0.002)  # slower than the parent's send: the worker's queue fills
    return _square_all(state, chunk)


def _chunks(n: int, size: int = 3):
    return (list(range(i, min(i + size, n))) for i in range(0, n, size))


def record_workers(monkeypatch) -> list:
    """The workers `results_in_order` starts, for a test to inspect (or kill)."""
    started: list = []
    real = pool._start_workers

    def recording(ctx, job, n):
        started.extend(real(ctx, job, n))
        return started

    monkeypatch.setattr(pool, "_start_workers", recording)
    return started


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_input_order_and_the_parent_takes_a_share(workers):
    calls: list[str] = []
    results = list(
        pool.results_in_order(
            _slow_square_all, 10, _chunks(600), workers, side_task=lambda: calls.append("side")
        )
    )
    flat = [value for chunk in results for _, value in chunk]
    assert flat == [10 + x * x for x in range(600)]
    pids = {pid for chunk in results for pid, _ in chunk}
    assert len(pids) == workers  # with N: this process and N-1 workers, each did some
    assert os.getpid() in pids
    assert calls == ["side"]  # the side task ran once


def test_the_side_task_runs_once_when_the_workers_are_busy():
    """The side task (the sidecar's tokenizer facts) overlaps the workers' work: it runs the first time
    this process would take a chunk itself (every worker's queue full), so mid-run, before any chunk of
    this process's own."""
    done: list = []
    seen: list = []

    def side() -> None:
        seen.append([pid for chunk in done for pid, _ in chunk])

    for chunk in pool.results_in_order(_slow_square_all, 0, _chunks(600), 2, side_task=side):
        done.append(chunk)
    assert len(seen) == 1
    assert os.getpid() not in seen[0]  # nothing of this process's own was done before it
    # ... and it did some after: this process takes a chunk only right after the side task, so mid-run
    assert os.getpid() in {pid for chunk in done for pid, _ in chunk}


def test_closing_early_stops_the_workers(monkeypatch):
    started = record_workers(monkeypatch)
    results = pool.results_in_order(_slow_square_all, 0, _chunks(3000), 3)
    next(results)
    results.close()  # --strict's stop, an error while writing: the generator is closed
    assert len(started) == 2 and all(not w.process.is_alive() for w in started)


@needs_fixtures
def test_single_threaded_counts_native_threads_too():
    """Python's own count misses the threads of native libraries (tokenizers' Rust pool here, torch's
    OpenMP pool): the kernel's count does not."""
    code = (
        "import threading, tokenizers, sys\n"
        "from minitrain.data.workers import single_threaded\n"
        "before = single_threaded()\n"
        "tokenizer = tokenizers.Tokenizer.from_file(sys.argv[1])\n"
        "tokenizer.encode_batch(['some words'] * 2000)  # parallel: starts the Rust pool\n"
        "print(before, threading.active_count(), single_threaded())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(SMOLLM2 / "tokenizer.json")],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["True", "1", "False"]


def test_a_busy_worker_takes_a_chunk_only_within_its_queue_and_pipe_budget():
    """The rule that keeps the parent's sends from blocking on a worker that is blocked on its results."""
    worker = pool._Worker(process=None, tasks=None, results=None, budget=1000)
    assert worker.can_take(10**9)  # idle: it is reading, any size gets through
    worker.queued.append(600)
    assert worker.can_take(400) and not worker.can_take(401)  # bytes: within the budget only
    worker.queued.append(100)
    assert not worker.can_take(1)  # queue: QUEUED_PER_WORKER chunks at most
    assert pool.QUEUED_PER_WORKER == 2


def test_workers_die_on_sigterm_instead_of_inheriting_the_parents_handler():
    """Regression: a forked worker kept tokenize's SIGTERM handler and could hang in the pool's
    terminate()."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda *_: None)
        assert pool._init_worker(pickle.dumps((_square_all, 3))) == (_square_all, 3)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
