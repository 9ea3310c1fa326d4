"""The `tokenize` stage: records in; tokenized JSONL, rejects and sidecar out (format: `format.py`).

    INPUT.jsonl --(reader: chunks of raw lines)--> encoders (sources.to_chat_record, ChatEncoder.encode;
                                                             pairs: sources.to_pair_record, encode_pair)
    (Parquet, Arrow, save_to_disk, --dataset: `sources.read_row_chunks`, one JSON line per row)
                --(results, in input order)--> OUT.jsonl + OUT.rejects.jsonl --> OUT.meta.json

Streaming: at most a few chunks per encoder are in flight, so memory does not grow with the input. An
encoder does everything per line (UTF-8, JSON, encode, length check, serialising the output line); every
non-blank input line ends up written, dropped (longer than `max_sample_num_tokens`) or rejected with a
reason, so `read == written + dropped + rejected`.
The file's kind (SFT samples or preference pairs) is decided by its first line that parses as a JSON object,
read by the parent before the workers start; lines of the other kind are rejected ("mixed kinds").
Outputs are written atomically (temporary files renamed at the end): an interrupted or failed run
leaves no partial OUT.

Workers: `--num-workers N` is this process and N-1 worker processes, forked from this process when it has
a single thread (the `minitrain tokenize` command: a worker then starts in milliseconds with the encoder
already loaded), else from a forkserver (a library caller with threads: see `_worker_context`). Each
worker has its own task and result pipe (grown to 1 MiB on Linux) and QUEUED_PER_WORKER chunks queued; a
chunk that finds every queue full is encoded here, between reading the input and writing the results in
order, so no core waits while this process only shuffles bytes. No Pool and no threads: a worker's answer
is read when it is the next to write, and a busy worker is sent a chunk only while it fits in its pipe's
buffer (else this process encodes it), so the two sides never wait on each other for good; a worker that
dies is an error, not a hang.
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
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from minitrain import __version__
from minitrain.atomic import atomic_write
from minitrain.config import TokenizeConfig
from minitrain.data.chat import (
    MALFORMED_JSON,
    MIXED_KINDS,
    NOT_UTF8,
    TOO_LONG,
    ChatEncoder,
    SampleRejected,
    load_chat_encoder,
)
from minitrain.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    KIND_PREFERENCE,
    KIND_SFT,
    rejects_path,
    sidecar_path,
)
from minitrain.data.preference import encode_pair
from minitrain.data.sources import (
    FieldMapping,
    RowSource,
    check_columns,
    field_mapping,
    is_pair_record,
    is_row_input,
    open_rows,
    read_row_chunks,
    to_chat_record,
    to_pair_record,
)
from minitrain.errors import UserError, signal_exit_code

CHUNK_LINES = 64  # lines per task sent to a worker
CHUNK_BYTES = 1 << 20  # ... or fewer when the lines are long
QUEUED_PER_WORKER = 2  # chunks waiting per worker process: it never runs dry while the parent encodes one
MAX_IN_FLIGHT_PER_WORKER = 4  # chunks sent or done but not yet written, per encoder: bounded memory
PIPE_BYTES = 1 << 20  # each worker's pipes are grown to this (Linux): neither side waits on the other


@dataclass
class ChunkResult:
    """What a worker returns for one chunk of lines (everything the parent needs, nothing more)."""

    out: bytes = b""  # output JSONL lines, in order
    rejects: list[tuple[int, str, str, str]] = field(default_factory=list)  # (line, kind, reason, detail)
    written: int = 0
    samples: int = 0  # output lines: == written, more with --split-turns
    blank: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    reasoning_dropped_turns: int = 0
    reasoning_dropped_tokens: int = 0
    num_bytes: int = 0


@dataclass
class TokenizeResult:
    """Counts and timing of one `tokenize` run (also written to the sidecar)."""

    input_file: Path | None  # None for --dataset
    output_file: Path
    rejects_file: Path
    sidecar_file: Path
    num_workers: int
    kind: str = KIND_SFT  # or KIND_PREFERENCE: one output line per pair
    read: int = 0
    written: int = 0
    samples: int = 0  # output lines: == written, more with --split-turns (one per trained turn)
    dropped: int = 0
    blank: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    # assistant turns (in written samples) whose reasoning the chat template does not render, and its tokens
    reasoning_dropped_turns: int = 0
    reasoning_dropped_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Policy:
    """What each worker needs besides the encoder: field mapping, length limit, which turns become samples."""

    max_tokens: int | None = None
    train_on: str = "all"
    split_turns: bool = False
    mapping: FieldMapping | None = None  # None: the default layouts (data/sources.py)
    kind: str = KIND_SFT  # the file's kind; a line of the other kind is rejected ("mixed kinds")


def encode_lines(encoder: ChatEncoder, policy: Policy, lines: list[tuple[int, bytes]]) -> ChunkResult:
    """Encode raw input lines (1-based line number, bytes) into output bytes, rejects and counts."""
    result = ChunkResult()
    out: list[bytes] = []
    max_tokens = policy.max_tokens
    for line_no, raw in lines:
        result.num_bytes += len(raw)
        if not raw.strip():
            result.blank += 1
            continue
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SampleRejected(NOT_UTF8, str(err)) from None
            try:
                record = orjson.loads(text)
            except orjson.JSONDecodeError as err:
                raise SampleRejected(MALFORMED_JSON, str(err)) from None
            if is_pair_record(record, policy.mapping) != (policy.kind == KIND_PREFERENCE):
                raise SampleRejected(MIXED_KINDS, _mixed_detail(policy.kind))
            if policy.kind == KIND_PREFERENCE:
                _encode_pair_line(encoder, policy, line_no, record, result, out)
                continue
            record = to_chat_record(record, policy.mapping)  # ShareGPT, Alpaca, ... -> messages
            if policy.split_turns:
                samples = encoder.encode_turns(record)
            else:
                samples = [encoder.encode(record, policy.train_on)]
        except SampleRejected as rej:
            result.rejects.append((line_no, "rejected", rej.reason, rej.detail))
            continue
        longest = max(len(sample.input_ids) for sample in samples)
        if max_tokens is not None and longest > max_tokens:
            # a line is one unit: with --split-turns, one sample too long drops the line's samples
            what = (
                f"{longest} tokens" if len(samples) == 1 else f"its longest turn sample has {longest} tokens"
            )
            result.rejects.append(
                (line_no, "dropped", TOO_LONG, f"{what} > --max-sample-num-tokens {max_tokens}")
            )
            continue
        for sample in samples:
            n = len(sample.input_ids)
            trained = n - sample.labels.count(IGNORE_INDEX)
            out.append(
                orjson.dumps(
                    {
                        "input_ids": sample.input_ids,
                        "labels": sample.labels,
                        "len": n,
                        "num_loss_counted_tokens": trained,
                        "source_line": line_no,
                    }
                )
            )
            result.tokens += n
            result.trained_tokens += trained
            result.reasoning_dropped_turns += sample.reasoning_dropped_turns
            result.reasoning_dropped_tokens += sample.reasoning_dropped_tokens
        result.written += 1
        result.samples += len(samples)
    if out:
        out.append(b"")
        result.out = b"\n".join(out)
    return result


def _mixed_detail(kind: str) -> str:
    if kind == KIND_PREFERENCE:
        return "an SFT record (no `chosen`/`rejected`) in a file of preference pairs (its first line decides)"
    return "a preference pair (`chosen`/`rejected`) in a file of SFT records (its first line decides)"


def _encode_pair_line(
    encoder: ChatEncoder, policy: Policy, line_no: int, record: Any, result: ChunkResult, out: list[bytes]
) -> None:
    """One pair line -> one output line (format.py), or a reject; SampleRejected passes through."""
    pair = encode_pair(encoder, to_pair_record(record, policy.mapping))
    sides = {"chosen": pair.chosen, "rejected": pair.rejected}
    longest = max(len(side.input_ids) for side in sides.values())
    if policy.max_tokens is not None and longest > policy.max_tokens:
        result.rejects.append(
            (
                line_no,
                "dropped",
                TOO_LONG,
                f"its longer side has {longest} tokens > --max-sample-num-tokens {policy.max_tokens}",
            )
        )
        return
    line: dict[str, Any] = {}
    for key, side in sides.items():
        n = len(side.input_ids)
        trained = n - side.labels.count(IGNORE_INDEX)
        line[key] = {
            "input_ids": side.input_ids,
            "labels": side.labels,
            "len": n,
            "num_loss_counted_tokens": trained,
        }
        result.tokens += n
        result.trained_tokens += trained
        result.reasoning_dropped_turns += side.reasoning_dropped_turns
        result.reasoning_dropped_tokens += side.reasoning_dropped_tokens
    line["prompt_len"] = pair.prompt_len
    line["source_line"] = line_no
    out.append(orjson.dumps(line))
    result.written += 1
    result.samples += 1


def detect_kind(lines: Iterator[tuple[int, bytes]], mapping: FieldMapping | None) -> str:
    """The file's kind: decided by the first line that parses as a JSON object (sft when none does)."""
    for _, raw in lines:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return KIND_PREFERENCE if is_pair_record(record, mapping) else KIND_SFT
    return KIND_SFT


# Imported once by the forkserver, so each worker forked from it starts with them (not once per worker).
_WORKER_MODULES = ("__main__", __name__, "tokenizers", "jinja2.sandbox", "jinja2.ext")


def _init_worker(
    state: bytes | tuple[ChatEncoder, Policy], inherited: tuple[Connection, ...] = ()
) -> tuple[ChatEncoder, Policy]:
    """Worker start: its signal handling, the parent's pipe ends it inherited closed, and its (encoder,
    policy): the parent's own objects when forked from it, else pickled once by the parent for all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's terminate() kills the worker outright
    for conn in inherited:  # a copy of a task pipe's write end here would keep that worker from seeing EOF
        conn.close()
    return pickle.loads(state) if isinstance(state, bytes) else state


def _worker_main(
    state: bytes | tuple[ChatEncoder, Policy],
    tasks: Connection,
    results: Connection,
    inherited: tuple[Connection, ...] = (),
) -> None:
    """A worker process: pickled chunks in, pickled ChunkResults out, in the order received; stops at EOF."""
    encoder, policy = _init_worker(state, inherited)
    while True:
        try:
            data = tasks.recv_bytes()
        except EOFError:  # the parent closed the task pipe: no more chunks
            return
        result = encode_lines(encoder, policy, pickle.loads(data))
        results.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def _read_chunks(path: Path) -> Iterator[list[tuple[int, bytes]]]:
    """Stream the input as chunks of (1-based line number, raw bytes without the newline)."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (some editors write one) is not part of the JSON
            chunk.append((line_no, raw.rstrip(b"\r\n")))
            size += len(raw)
            if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _single_threaded() -> bool:
    """True when this process has exactly one thread (Linux: counted by the kernel, native threads too)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # not Linux: unknown, so not proven
        return False


def _worker_context() -> Any:
    """The multiprocessing context of the workers: fork when this process has one thread, else a
    forkserver (started here; it imports `_WORKER_MODULES`).

    Forked from this process, a worker starts in milliseconds with the encoder already loaded: no
    interpreter start and imports (0.35 CPU-s) and no unpickled tokenizer copy (0.2 CPU-s for SmolLM2, 0.8
    for Qwen3). That is safe only while this process has a single thread: a thread that holds a lock at
    fork time (torch's OpenMP pool, a progress bar, tokenizers' Rust pool) leaves it held forever in the
    child, which can deadlock, and then terminate() hangs (seen: --strict after torch was imported). So
    with any other thread (the kernel's count, which sees native threads too) the workers fork from a
    forkserver, a clean single-threaded process. `minitrain tokenize` has one thread when its workers
    start (the progress bar's starts after them); a library caller that has imported torch has several.
    Called early by `tokenize_file`, so a forkserver starts while the parent loads the tokenizer.
    """
    if _single_threaded() and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_WORKER_MODULES))  # read when the server starts (once a process)
    forkserver.ensure_running()
    return ctx


@dataclass
class _Worker:
    """The parent's side of one worker process: its two pipes and the chunks it has not answered yet."""

    process: Any
    tasks: Connection  # parent -> worker: pickled chunks
    results: Connection  # worker -> parent: pickled ChunkResults, in the order the chunks were sent
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


def _start_workers(ctx: Any, state: bytes | tuple[ChatEncoder, Policy], n: int) -> list[_Worker]:
    """Start `n` worker processes (`_worker_context`), each with its own task and result pipe."""
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
            args = (state, task_r, result_w, tuple(ours))  # forked: passed as they are, not pickled
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


def _receive(worker: _Worker) -> ChunkResult:
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


def _results_in_order(
    encoder: ChatEncoder,
    policy: Policy,
    chunks: Iterator[list[tuple[int, bytes]]],
    workers: int,
    side_task: Callable[[], Any] | None = None,
) -> Iterator[ChunkResult]:
    """ChunkResults in input order from this process and `workers - 1` worker processes.

    The workers' queues are kept QUEUED_PER_WORKER deep; a chunk that finds them all full is encoded
    here, so this process is one of the `workers` encoders and only needs N-1 tokenizer copies. At most
    MAX_IN_FLIGHT_PER_WORKER x `workers` chunks are in flight (streaming, constant memory).

    `side_task` (work for the sidecar, such as the tokenizer's fingerprint) runs here once, the first time
    every worker has chunks queued, so it overlaps their encoding; with no workers (or a short input) it
    runs after the last chunk.
    """
    if workers == 1:
        for chunk in chunks:
            yield encode_lines(encoder, policy, chunk)
        if side_task is not None:
            side_task()
        return
    ctx = _worker_context()
    state: bytes | tuple[ChatEncoder, Policy] = (encoder, policy)  # forked: the workers share these
    if ctx.get_start_method() != "fork":
        # The tokenizer pickles as its whole JSON (1.5 MB for SmolLM2, 5 MB for Qwen3): serialised once
        # here, not once per worker.
        state = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    pool = _start_workers(ctx, state, workers - 1)
    pending: deque[ChunkResult | _Worker] = deque()  # in input order: a result, or the worker encoding it

    def head_ready() -> bool:
        head = pending[0]
        return not isinstance(head, _Worker) or head.results.poll()

    def pop_head() -> ChunkResult:
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
                if side_task is not None:
                    side_task, task = None, side_task
                    task()
                pending.append(encode_lines(encoder, policy, chunk))
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


def _progress(console: Any, total: int) -> Any:
    """A rich progress bar over input bytes (rows for table inputs), or None when not a terminal."""
    if console is None or not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("tokenize"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[samples]} samples"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def tokenize_file(config: TokenizeConfig, *, console: Any = None) -> TokenizeResult:
    """Run the tokenize stage; a progress bar on `console` when it is a terminal. UserError on bad input."""
    inp, out = config.input_file, config.output_file
    rows: RowSource | None = None
    if config.dataset is not None or (inp is not None and inp.exists() and is_row_input(inp)):
        rows = open_rows(inp, config.dataset)  # Parquet, Arrow, save_to_disk folder, --dataset
        check_columns(rows, field_mapping(config))
        total = rows.num_rows
        if total == 0:
            raise UserError(f"{rows.label}: no rows; nothing to tokenize")
    else:
        assert inp is not None
        if not inp.is_file():
            raise UserError(f"{inp}: no such file; give the JSONL file to tokenize")
        total = inp.stat().st_size
        if total == 0:
            raise UserError(f"{inp}: the file is empty; nothing to tokenize")
    _check_output_folder(out)  # before any work: atomic_write would only fail at the end
    chunks = read_row_chunks(rows, 1) if rows else _read_chunks(inp)
    try:
        kind = detect_kind((line for chunk in chunks for line in chunk), field_mapping(config))
    finally:
        chunks.close()  # the file (or the Parquet/Arrow reader) is read again from the start below
    if kind == KIND_PREFERENCE:
        _check_pair_flags(config, rows.label if rows is not None else inp)
    workers = config.workers()
    if workers > 1:
        _worker_context()  # a forkserver (if needed) starts now, while this process loads the tokenizer
    loaded = load_chat_encoder(
        config.model_name_or_path, config.chat_template, trust_remote_code=config.trust_remote_code
    )
    result = TokenizeResult(
        input_file=inp,
        output_file=out,
        rejects_file=rejects_path(out),
        sidecar_file=sidecar_path(out),
        num_workers=workers,
        kind=kind,
    )
    with _sigterm_raises():
        _write_outputs(config, loaded, result, _progress(console, total), total, rows)
    return result


def _check_pair_flags(config: TokenizeConfig, inp: Any) -> None:
    """UserError for the flags that choose turns of a conversation: a pair trains its whole response."""
    if config.split_turns:
        raise UserError(
            f"{inp} holds preference pairs (its first line has chosen/rejected); --split-turns makes one "
            "sample per turn of a conversation, which a pair does not have; drop --split-turns"
        )
    if config.train_on != "all":
        raise UserError(
            f"{inp} holds preference pairs (its first line has chosen/rejected); --train-on "
            f"{config.train_on} chooses turns of a conversation, a pair trains its whole response; "
            "drop --train-on"
        )


def _check_output_folder(out: Path) -> None:
    """Create OUT's folder now, or raise UserError when it cannot be created or written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"-o {out}: cannot create the folder {out.parent} (a file is in the way); choose another -o path"
        ) from None
    except OSError as err:
        raise UserError(
            f"-o {out}: cannot create the folder {out.parent} ({err.strerror}); choose a writable -o path"
        ) from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"-o {out}: the folder {out.parent} is not writable; choose a writable -o path")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While tokenizing, SIGTERM raises SystemExit so the temporary files are removed (as Ctrl-C does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(signal_exit_code(signum))

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_outputs(
    config: TokenizeConfig,
    loaded: Any,
    result: TokenizeResult,
    progress: Any,
    total: int,
    rows: RowSource | None,
) -> None:
    """Stream chunks through the workers into OUT, its rejects and its sidecar; fills in `result`.

    Progress (and `total`) counts input bytes for JSONL, rows for the other inputs.
    """
    inp, out = rows.label if rows is not None else config.input_file, config.output_file
    reasons: Counter[str] = Counter()
    first_reject = ""  # "line N: reason: detail" of the first dropped or rejected line
    start = time.perf_counter()
    with atomic_write(out) as f_out:  # OUT is renamed into place last: if it exists, so do its companions
        with atomic_write(result.rejects_file) as f_rej:
            # The pool is created (forked) inside the generator before the progress bar starts its thread.
            chunks = read_row_chunks(rows, CHUNK_LINES) if rows else _read_chunks(config.input_file)
            mapping = None if field_mapping(config).is_default else field_mapping(config)
            policy = Policy(
                config.max_sample_num_tokens, config.train_on, config.split_turns, mapping, result.kind
            )
            def sidecar_facts() -> None:  # computed (and cached) while the workers encode
                loaded.fingerprint, loaded.turn_token_ids  # noqa: B018

            results = _results_in_order(loaded.encoder, policy, chunks, result.num_workers, sidecar_facts)
            first = next(results, None)
            task = None
            if progress is not None:
                progress.start()
                task = progress.add_task("tokenize", total=total, samples=0)
            try:
                chunk = first
                while chunk is not None:
                    for line_no, kind, reason, detail in chunk.rejects:
                        if kind == "rejected" and config.strict:
                            raise UserError(
                                f"{inp}:{line_no}: {reason}"
                                + (f": {detail}" if detail else "")
                                + " (without --strict such lines go to the rejects file)"
                            )
                        f_rej.write(
                            orjson.dumps({"line": line_no, "kind": kind, "reason": reason, "detail": detail})
                        )
                        f_rej.write(b"\n")
                        first_reject = first_reject or f"line {line_no}: {reason}" + (
                            f": {detail}" if detail else ""
                        )
                        if kind == "dropped":
                            result.dropped += 1
                        else:
                            reasons[reason] += 1
                    f_out.write(chunk.out)
                    result.written += chunk.written
                    result.samples += chunk.samples
                    result.blank += chunk.blank
                    result.tokens += chunk.tokens
                    result.trained_tokens += chunk.trained_tokens
                    result.reasoning_dropped_turns += chunk.reasoning_dropped_turns
                    result.reasoning_dropped_tokens += chunk.reasoning_dropped_tokens
                    if progress is not None:
                        done = chunk.written + chunk.blank + len(chunk.rejects) if rows else chunk.num_bytes
                        progress.update(task, advance=done, samples=result.written)
                    chunk = next(results, None)
            finally:
                if progress is not None:
                    progress.stop()
                results.close()  # terminates the pool if we stop early
            result.rejected_by_reason = dict(sorted(reasons.items()))
            result.read = result.written + result.dropped + result.rejected
            if result.read == 0:
                raise UserError(f"{inp}: only blank lines; nothing to tokenize")
            if result.written == 0:  # no file is written: an empty OUT would only fail later, in train
                raise UserError(nothing_written(inp, result, reasons, first_reject))
        result.elapsed_s = time.perf_counter() - start
        with atomic_write(result.sidecar_file) as f_meta:
            meta = _sidecar(config, loaded, result, rows)
            f_meta.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2))


def nothing_written(inp: Any, result: TokenizeResult, reasons: Counter[str], first: str) -> str:
    """The one-line error when no line became a sample: the counts, the top reasons, the first line's."""
    top = ", ".join(f"{reason} ({n:,})" for reason, n in reasons.most_common(3))
    why = f"{result.rejected:,} rejected: {top}" if reasons else ""
    if result.dropped:
        why += ("; " if why else "") + f"{result.dropped:,} dropped as longer than --max-sample-num-tokens"
    return (
        f"{inp}: no line could be tokenized, nothing written ({why}); first, {first[:200]};"
        " fix the input or the flags named"
    )


def _sidecar(
    config: TokenizeConfig, loaded: Any, result: TokenizeResult, rows: RowSource | None
) -> dict[str, Any]:
    """The OUT.meta.json content (keys as documented in `format.read_sidecar`)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "minitrain_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": rows.label
        if rows is not None and rows.kind == "dataset"
        else str(config.input_file.resolve()),
        "input_format": rows.kind if rows is not None else "jsonl",
        "tokenizer": {
            "path": _tokenizer_location(config.model_name_or_path),
            "class": loaded.tokenizer_class,
            "vocab_size": loaded.vocab_size,
            "bos_token_id": loaded.bos_token_id,
            "eos_token_id": loaded.eos_token_id,
            "pad_token_id": loaded.pad_token_id,
            "end_of_turn_token_ids": loaded.end_of_turn_token_ids,
            "turn_token_ids": loaded.turn_token_ids,
            "fingerprint": loaded.fingerprint,
        },
        "chat_template_sha256": loaded.template_sha256,
        "chat_template_origin": loaded.template_origin,
        "end_of_turn_text": loaded.encoder.eot_text,
        "max_sample_num_tokens": config.max_sample_num_tokens,
        "kind": result.kind,
        "counts": {
            "read": result.read,
            "written": result.written,
            "samples": result.samples,
            **({"pairs": result.written} if result.kind == KIND_PREFERENCE else {}),
            "dropped": result.dropped,
            "rejected": result.rejected,
            "rejected_by_reason": result.rejected_by_reason,
            "blank_lines_skipped": result.blank,
        },
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "reasoning_dropped_by_template": {
            "turns": result.reasoning_dropped_turns,
            "tokens": result.reasoning_dropped_tokens,
        },
        "elapsed_s": round(result.elapsed_s, 3),
        "num_workers": result.num_workers,
        "config": config.to_dict(),
    }


def render_summary(result: TokenizeResult, console: Any) -> None:
    """The end-of-run table: lines read/written/dropped/rejected (by reason), tokens, throughput."""
    from rich.table import Table

    table = Table(title="minitrain tokenize", show_header=True, header_style="bold")
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("lines read", f"{result.read:,}")
    written = "written (preference pairs)" if result.kind == KIND_PREFERENCE else "written"
    table.add_row(written, f"[green]{result.written:,}[/green]")
    if result.samples != result.written:
        table.add_row("  samples (one per trained turn)", f"{result.samples:,}")
    table.add_row(
        "dropped (too long)",
        f"{result.dropped:,}" if not result.dropped else f"[yellow]{result.dropped:,}[/yellow]",
    )
    table.add_row(
        "rejected", f"{result.rejected:,}" if not result.rejected else f"[red]{result.rejected:,}[/red]"
    )
    for reason, n in result.rejected_by_reason.items():
        table.add_row(f"  {reason}", f"{n:,}")
    if result.blank:
        table.add_row("blank lines skipped", f"{result.blank:,}")
    table.add_row("tokens", f"{result.tokens:,}")
    table.add_row("trained tokens", f"{result.trained_tokens:,}")
    if result.reasoning_dropped_turns:
        table.add_row(
            "reasoning dropped by the template",
            f"[yellow]{result.reasoning_dropped_turns:,} turns, "
            f"{result.reasoning_dropped_tokens:,} tokens[/yellow]",
        )
    table.add_row("samples/s", f"{result.samples_per_s:,.0f}")
    table.add_row("tokens/s", f"{result.tokens_per_s:,.0f}")
    table.add_row("workers", str(result.num_workers))
    console.print(table)
    console.print(f"wrote {result.output_file} (sidecar: {result.sidecar_file.name})")
    if result.dropped or result.rejected:
        console.print(f"dropped and rejected lines (line number + reason): {result.rejects_file}")


def _tokenizer_location(name_or_path: str) -> str:
    """A local tokenizer folder as an absolute path (later stages may run elsewhere); a hub name as given."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path
