"""Worker processes of the `tokenize` stage: chunks out, results back in input order, this process one of
the workers.

`--num-workers N` is this process and N-1 worker processes, forked from this process when it has a single
thread (the `minitrain tokenize` command: a worker then starts in milliseconds with the encoder already
loaded), else from a forkserver (a library caller with threads: see `worker_context`). Each worker has its
own task and result pipe (grown to 1 MiB on Linux) and QUEUED_PER_WORKER chunks queued; a chunk that finds
every queue full is worked on here, between reading the input and writing the results in order, so no
core waits while this process only shuffles bytes. No Pool and no threads: a worker's answer is read when
it is the next to write, and a busy worker is sent a chunk only while it fits in its pipe's buffer (else
this process works on it), so the two sides never wait on each other for good; a worker that dies is an
error, not a hang.

The trade-off: chunks and results pickled through pipes, and up to QUEUED_PER_WORKER chunks per worker
still to finish when the input ends; from a forkserver also its start (imports, 0.35 CPU-s) and a
tokenizer copy per worker (pickled once, unpickled by each: 0.2 CPU-s for SmolLM2, 0.8 for Qwen3).
Measured on 9,990 SmolLM2 samples (157 chunks; 2 shared cores) with a forkserver: this process spent
0.1 CPU-s on pipes and pickling and the worker 0.2-0.25 CPU-s on its start, where the Pool of 2 workers
with an idle parent spent 2.0 CPU-s more than 1 process; each side encoded about half of the chunks.
While both cores are busy each encode also costs 15-40% more CPU than alone (0-40% for two independent
processes side by side: the machine, not the code), so the wall ratio says little on a loaded machine:
measure it idle (benchmarks/bench_tokenize.py prints that ceiling).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from minitrain.errors import UserError

QUEUED_PER_WORKER = 2  # chunks waiting per worker process: it never runs dry while the parent encodes one
MAX_IN_FLIGHT_PER_WORKER = 4  # chunks sent or done but not yet written, per encoder: bounded memory
PIPE_BYTES = 1 << 20  # each worker's pipes are grown to this (Linux): neither side waits on the other


def _init_worker(
    state: bytes | tuple[Callable, Any], inherited: tuple[Connection, ...] = ()
) -> tuple[Callable, Any]:
    """Worker start: its signal handling, the parent's pipe ends it inherited closed, and its (work,
    state): the parent's own objects when forked from it, else pickled once by the parent for all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() kills the worker outright
    for conn in inherited:  # a copy of a task pipe's write end here would keep that worker from seeing EOF
        conn.close()
    return pickle.loads(state) if isinstance(state, bytes) else state


def _worker_main(
    job: bytes | tuple[Callable, Any],
    tasks: Connection,
    results: Connection,
    inherited: tuple[Connection, ...] = (),
) -> None:
    """A worker process: pickled chunks in, pickled `work(state, chunk)` results out, in the order received;
    stops at EOF."""
    work, state = _init_worker(job, inherited)
    while True:
        try:
            data = tasks.recv_bytes()
        except EOFError:  # the parent closed the task pipe: no more chunks
            return
        result = work(state, pickle.loads(data))
        results.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def single_threaded() -> bool:
    """True when this process has exactly one thread (Linux: counted by the kernel, native threads too)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # not Linux: unknown, so not proven
        return False


def worker_context(preload: tuple[str, ...] = ()) -> Any:
    """The multiprocessing context of the workers: fork when this process has one thread, else a
    forkserver (started here; it imports the modules `preload` names, once for all its workers).

    Forked from this process, a worker starts in milliseconds with the encoder already loaded: no
    interpreter start and imports (0.35 CPU-s) and no unpickled tokenizer copy (0.2 CPU-s for SmolLM2, 0.8
    for Qwen3). That is safe only while this process has a single thread: a thread that holds a lock at
    fork time (torch's OpenMP pool, a progress bar, tokenizers' Rust pool) leaves it held forever in the
    child, which can deadlock, and then terminate() hangs (seen: --strict after torch was imported). So
    with any other thread (the kernel's count, which sees native threads too) the workers fork from a
    forkserver, a clean single-threaded process. `minitrain tokenize` has one thread when its workers
    start (the progress bar's starts after them); a library caller that has imported torch has several.
    Called early by `pipeline.tokenize_file`, so a forkserver starts while the parent loads the tokenizer.
    """
    if single_threaded() and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))  # read when the server starts (once a process)
    forkserver.ensure_running()
    return ctx


@dataclass
class _Worker:
    """The parent's side of one worker process: its two pipes and the chunks it has not answered yet."""

    process: Any
    tasks: Connection  # parent -> worker: pickled chunks
    results: Connection  # worker -> parent: pickled results, in the order the chunks were sent
    budget: int  # bytes of chunks that may wait in `tasks` (half its buffer): a send within it never blocks
    queued: deque[int] = field(default_factory=deque)  # pickled sizes of the unanswered chunks, oldest first

    def can_take(self, size: int) -> bool:
        """True when a chunk of `size` pickled bytes may be sent now without risk of blocking for long.

        An idle worker takes any chunk (it is reading, so the send completes). A busy one takes it only
        while its queue is short and the bytes fit in the pipe's buffer: a parent blocked on a full task
        pipe while the worker is blocked on a full result pipe would be a deadlock.
        """
        if not self.queued:
            return True
        return len(self.queued) < QUEUED_PER_WORKER and sum(self.queued) + size <= self.budget


def _grow_pipe(conn: Connection) -> int:
    """Grow a pipe's buffer to PIPE_BYTES where the OS allows it (Linux); its size in bytes, 0 if unknown."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
    except (ImportError, AttributeError, OSError):  # not Linux, or over the user's pipe limits
        return 0


def _start_workers(ctx: Any, job: bytes | tuple[Callable, Any], n: int) -> list[_Worker]:
    """Start `n` worker processes (`worker_context`), each with its own task and result pipe."""
    workers: list[_Worker] = []
    forked = ctx.get_start_method() == "fork"
    try:
        for _ in range(n):
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            capacity = _grow_pipe(task_w)
            _grow_pipe(result_w)  # the worker's send of a result rarely waits for the parent to read it
            # forked, a worker inherits every fd of this process: this side's ends of its own pipes and of
            # the earlier workers' (forkserver and spawn pass only the ends given)
            ours = [task_w, result_r] + [c for w in workers for c in (w.tasks, w.results)] if forked else []
            args = (job, task_r, result_w, tuple(ours))  # forked: passed as they are, not pickled
            process = ctx.Process(target=_worker_main, args=args, daemon=True)
            workers.append(_Worker(process, task_w, result_r, capacity // 2))
            process.start()
            task_r.close()  # the worker holds these ends now: EOF on `results` means the worker is gone
            result_w.close()
    except BaseException:
        _stop_workers(workers, terminate=True)
        raise
    return workers


def _stop_workers(workers: list[_Worker], *, terminate: bool) -> None:
    """Normal end: close the task pipes (each worker exits at EOF) and wait. Otherwise kill them first."""
    for worker in workers:
        worker.tasks.close()
        if terminate and worker.process.pid is not None:
            worker.process.terminate()  # SIGTERM: the worker's default handler ends it at once
    for worker in workers:
        if worker.process.pid is not None:
            worker.process.join()
        worker.results.close()


def _send(worker: _Worker, data: bytes) -> None:
    """Queue a pickled chunk on the worker."""
    try:
        worker.tasks.send_bytes(data)
    except BrokenPipeError:
        raise _worker_gone(worker) from None
    worker.queued.append(len(data))


def _receive(worker: _Worker) -> Any:
    """The worker's answer to its oldest unanswered chunk (waits for it)."""
    try:
        data = worker.results.recv_bytes()
    except EOFError:
        raise _worker_gone(worker) from None
    worker.queued.popleft()
    return pickle.loads(data)


def _worker_gone(worker: _Worker) -> UserError:
    """The error for a worker that died (killed by the OS for memory, a native crash): never a hang, and
    one line with the fix, not a traceback."""
    worker.process.join(timeout=5)
    return UserError(
        f"tokenize worker process {worker.process.pid} ended without an answer (exit code "
        f"{worker.process.exitcode}; killed for memory?); run again, with fewer --num-workers "
        "if memory is short"
    )


def results_in_order(
    work: Callable[[Any, Any], Any],
    state: Any,
    chunks: Iterator[Any],
    workers: int,
    *,
    preload: tuple[str, ...] = (),
    side_task: Callable[[], Any] | None = None,
) -> Iterator[Any]:
    """`work(state, chunk)` for each chunk, in input order, from this process and `workers - 1` worker
    processes. `work` is a module-level function (a forkserver's workers import it by name); `state` is
    shared by the workers when forked, else pickled once here.

    The workers' queues are kept QUEUED_PER_WORKER deep; a chunk that finds them all full is encoded
    here, so this process is one of the `workers` encoders and only needs N-1 tokenizer copies. At most
    MAX_IN_FLIGHT_PER_WORKER x `workers` chunks are in flight (streaming, constant memory).

    `side_task` (work for the sidecar, such as the tokenizer's fingerprint) runs here once, the first time
    every worker has chunks queued, so it overlaps their encoding; with no workers (or a short input) it
    runs after the last chunk.
    """
    if workers == 1:
        for chunk in chunks:
            yield work(state, chunk)
        if side_task is not None:
            side_task()
        return
    ctx = worker_context(preload)
    job: bytes | tuple[Callable, Any] = (work, state)  # forked: the workers share these
    if ctx.get_start_method() != "fork":
        # A tokenizer pickles as its whole JSON (1.5 MB for SmolLM2, 5 MB for Qwen3): serialised once
        # here, not once per worker.
        job = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    pool = _start_workers(ctx, job, workers - 1)
    pending: deque[Any] = deque()  # in input order: a result, or the worker encoding it

    def head_ready() -> bool:
        head = pending[0]
        return not isinstance(head, _Worker) or head.results.poll()

    def pop_head() -> Any:
        head = pending.popleft()
        return _receive(head) if isinstance(head, _Worker) else head

    try:
        for chunk in chunks:
            while pending and head_ready():
                yield pop_head()
            data = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
            worker = min(pool, key=lambda w: len(w.queued))
            if worker.can_take(len(data)):
                _send(worker, data)
                pending.append(worker)
            else:  # every worker has enough queued: this process encodes the chunk itself
                if side_task is not None:  # first, once: the workers are busy now
                    side_task()
                    side_task = None
                pending.append(work(state, chunk))
            while len(pending) >= MAX_IN_FLIGHT_PER_WORKER * workers:
                yield pop_head()
        if side_task is not None:
            side_task()
        while pending:
            yield pop_head()
    except BaseException:  # error, Ctrl-C, --strict stop, generator closed early: stop the workers now
        _stop_workers(pool, terminate=True)
        raise
    _stop_workers(pool, terminate=False)
