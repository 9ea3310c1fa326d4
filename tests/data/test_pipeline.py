"""Tests for minitrain/data/pipeline.py: counts identity, rejects, order over workers, atomicity, sidecar."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from minitrain.config import TokenizeConfig
from minitrain.data import chat, pipeline, probe
from minitrain.data import workers as pool
from minitrain.data.format import iter_samples, read_sidecar, rejects_path, sidecar_path
from minitrain.data.probe import load_chat_encoder
from minitrain.errors import UserError
from tests.conftest import MESSAGES_FILES, QWEN3, SMOLLM2, TINYLLAMA, needs_fixtures
from tests.data.test_workers import record_workers

pytestmark = needs_fixtures

GOOD = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}'
# One line per reason, in this order, with the line numbers the rejects file must name.
BAD_LINES = [
    (b"{not json", chat.MALFORMED_JSON),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', chat.NOT_UTF8),
    (b'{"text": "no shape"}', chat.NO_KNOWN_SHAPE),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', chat.UNKNOWN_ROLE),
    (
        b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
        chat.NON_STRING_CONTENT,
    ),
    (
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
        chat.EMPTY_ASSISTANT,
    ),
    (
        b'{"messages": [{"role": "pretrain", "content": "x"}, {"role": "user", "content": "y"}]}',
        chat.PRETRAIN_MIXED,
    ),
    (
        b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "y"}]}',
        chat.TEMPLATE_ERROR,
    ),
    (
        b'{"messages": [{"role": "user", "content": "\xf4\x8f\xbf\xb0"}, '
        b'{"role": "assistant", "content": "y"}]}',
        chat.ALIGNMENT_FAILURE,
    ),
]
LONG = b'{"prompt": "' + b"word " * 300 + b'", "generation": "end"}'


def mixed_file(tmp_path):
    """GOOD, each bad line, a blank line, a too-long line, pretrain and prompt/generation lines."""
    lines = (
        [GOOD]
        + [line for line, _ in BAD_LINES]
        + [
            b"",
            LONG,
            b'{"messages": [{"role": "pretrain", "content": "Plain text."}]}',
            b'{"prompt": "Q:", "generation": " A"}',
            GOOD,
        ]
    )
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run(tmp_path, inp, *, workers=1, out_name="out.jsonl", model=SMOLLM2, **kwargs):
    config = TokenizeConfig(
        input_file=inp,
        output_file=tmp_path / out_name,
        model_name_or_path=str(model),
        num_workers=workers,
        **kwargs,
    )
    return pipeline.tokenize_file(config), config.output_file


def test_every_line_is_written_dropped_or_rejected(tmp_path):
    import orjson

    result, out = run(tmp_path, mixed_file(tmp_path), max_sample_num_tokens=200)
    assert result.read == result.written + result.dropped + result.rejected == 14
    assert (result.written, result.dropped, result.rejected, result.blank) == (4, 1, len(BAD_LINES), 1)
    assert result.rejected_by_reason == {reason: 1 for _, reason in sorted(BAD_LINES, key=lambda x: x[1])}
    rejects = [orjson.loads(line) for line in rejects_path(out).read_bytes().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (i + 2, reason) for i, (_, reason) in enumerate(BAD_LINES)
    ] + [(12, chat.TOO_LONG)]
    assert all(r["kind"] == "rejected" for r in rejects[:-1]) and rejects[-1]["kind"] == "dropped"
    samples = list(iter_samples(out))
    assert [s["source_line"] for _, s in samples] == [1, 13, 14, 15]
    for _, s in samples:
        assert s["len"] == len(s["input_ids"]) == len(s["labels"])
        assert s["num_loss_counted_tokens"] == sum(label != -100 for label in s["labels"])
        assert all(label in (-100, tok) for label, tok in zip(s["labels"], s["input_ids"], strict=True))
    assert result.tokens == sum(s["len"] for _, s in samples)
    assert result.trained_tokens == sum(s["num_loss_counted_tokens"] for _, s in samples)


@pytest.mark.parametrize("split_turns", [False, True], ids=["whole", "split-turns"])
def test_a_chunk_is_its_lines_encoded_one_by_one(monkeypatch, split_turns):
    """encode_lines plans every line of a chunk, then encodes them (chat.ChatEncoder.plan): the bytes, the
    counts and the rejects must be those of each line encoded alone, rejects in line order even when the
    second pass rejects or drops a line before one the first pass rejected."""
    encoder = load_chat_encoder(str(QWEN3)).encoder
    lines = [raw for path in MESSAGES_FILES for raw in path.read_bytes().splitlines()[:12]]
    lines[1:1] = [
        LONG,
        b"{not json",
        GOOD.replace(b"Hello there.", b"REJECT AT ENCODE"),
        b"",
        BAD_LINES[3][0],
    ]
    numbered = list(enumerate(lines, 1))
    finish = chat.ChatEncoder.finish

    def failing(self, planned):  # a rejection only the encode finds (none in the fixture data)
        if isinstance(planned, chat.PlannedSample) and "REJECT AT ENCODE" in planned.text:
            raise chat.SampleRejected(chat.NO_END_OF_TURN, "made up for the test")
        return finish(self, planned)

    monkeypatch.setattr(chat.ChatEncoder, "finish", failing)
    policy = pipeline.Policy(max_tokens=120, split_turns=split_turns)
    chunk = pipeline.encode_lines(encoder, policy, numbered)
    alone = [pipeline.encode_lines(encoder, policy, [line]) for line in numbered]
    assert chunk.out == b"".join(result.out for result in alone)
    assert chunk.rejects == [reject for result in alone for reject in result.rejects]
    reasons = {line: reason for line, _, reason, _ in chunk.rejects}
    assert [line for line, *_ in chunk.rejects] == sorted(reasons)  # one entry per line, in line order
    assert [reasons[line] for line in (2, 3, 4, 6)] == [
        chat.TOO_LONG,  # dropped by the second pass, before the first pass's rejects below
        chat.MALFORMED_JSON,
        chat.NO_END_OF_TURN,
        chat.UNKNOWN_ROLE,
    ]
    for key in ("written", "samples", "blank", "tokens", "trained_tokens", "num_bytes"):
        assert getattr(chunk, key) == sum(getattr(result, key) for result in alone), key
    assert chunk.written > 10


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    inp = tmp_path / "bom.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + GOOD + b"\r\n")
    result, _ = run(tmp_path, inp)
    assert (result.written, result.rejected) == (2, 0)


def test_sidecar_has_the_documented_keys(tmp_path):
    result, out = run(tmp_path, mixed_file(tmp_path), max_sample_num_tokens=200)
    meta = read_sidecar(out)
    assert meta is not None and sidecar_path(out).is_file()
    for key in (
        "format",
        "format_version",
        "minitrain_version",
        "created",
        "input",
        "tokenizer",
        "chat_template_sha256",
        "max_sample_num_tokens",
        "counts",
        "tokens",
        "trained_tokens",
    ):
        assert key in meta, key
    assert meta["kind"] == "sft" and "pairs" not in meta["counts"]
    for key in (
        "path",
        "class",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "end_of_turn_token_ids",
        "fingerprint",
    ):
        assert key in meta["tokenizer"], key
    loaded = load_chat_encoder(str(SMOLLM2))
    assert (
        meta["tokenizer"]["end_of_turn_token_ids"] == [2]
        and meta["tokenizer"]["fingerprint"] == loaded.fingerprint
    )
    assert meta["chat_template_sha256"] == loaded.template_sha256
    counts = meta["counts"]
    assert counts["read"] == counts["written"] + counts["dropped"] + counts["rejected"] == result.read
    assert counts["rejected_by_reason"] == result.rejected_by_reason
    assert meta["tokens"] == result.tokens and meta["max_sample_num_tokens"] == 200


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_write_the_same_bytes_in_input_order(tmp_path, monkeypatch, workers):
    """This process and N-1 workers share the chunks; the output is byte for byte the 1-process one."""
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 7)  # many small chunks, so order across workers is exercised
    inp = tmp_path / "all.jsonl"
    inp.write_bytes(b"".join(p.read_bytes() for p in MESSAGES_FILES) + mixed_file(tmp_path).read_bytes())
    one, out1 = run(tmp_path, inp, workers=1, out_name="one.jsonl", max_sample_num_tokens=1000)
    two, out2 = run(tmp_path, inp, workers=workers, out_name="two.jsonl", max_sample_num_tokens=1000)
    assert out1.read_bytes() == out2.read_bytes()
    assert rejects_path(out1).read_bytes() == rejects_path(out2).read_bytes()
    assert (one.read, one.written, one.dropped, one.rejected_by_reason) == (
        two.read,
        two.written,
        two.dropped,
        two.rejected_by_reason,
    )
    lines = [n for n, _ in iter_samples(out1)]
    sources = [s["source_line"] for _, s in iter_samples(out1)]
    assert sources == sorted(sources) and len(lines) == one.written


def test_strict_with_workers_stops_them(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 300 + b"{bad\n" + (GOOD + b"\n") * 300)
    with pytest.raises(UserError, match=r":301: malformed JSON"):
        run(tmp_path, inp, workers=2, strict=True)
    assert not (tmp_path / "out.jsonl").exists()


@contextmanager
def _fails_if_it_hangs(seconds: int = 120) -> Iterator[None]:
    """A deadlock between the parent and a worker fails the test (TimeoutError) instead of hanging it."""

    def hung(signum, frame):
        raise TimeoutError(f"tokenize hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _count_parent_encodes(monkeypatch) -> list[int]:
    """Chunks this process encodes itself (the workers, forked from the forkserver, keep the real one)."""
    real, calls = pipeline.encode_lines, []

    def counting(encoder, policy, lines):
        calls.append(len(lines))
        return real(encoder, policy, lines)

    monkeypatch.setattr(pipeline, "encode_lines", counting)
    return calls


def test_the_parent_encodes_a_share_of_the_chunks(tmp_path, monkeypatch):
    """--num-workers 2 is this process and one worker: the worker takes the first chunks (its queue), this
    process the ones that find the queue full; every chunk is encoded once."""
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 5)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 400)  # 80 chunks
    parent = _count_parent_encodes(monkeypatch)
    workers = record_workers(monkeypatch)
    result, _ = run(tmp_path, inp, workers=2)
    assert len(workers) == 1  # N-1 worker processes
    assert result.written == 400
    assert 0 < len(parent) < 80  # both encoded some (the worker's start alone takes 0.2 s)
    assert all(not w.process.is_alive() and w.process.exitcode == 0 for w in workers)  # exited at EOF


@pytest.mark.parametrize("workers", [1, 2])
def test_the_tokenizer_fingerprint_is_computed_once_while_the_workers_encode(tmp_path, monkeypatch, workers):
    """The sidecar's fingerprint (0.4 s for Qwen3) is off the path to the first encoded line: with workers it
    is computed when every worker has chunks queued and before this process encodes one; alone, after the
    last chunk. Either way once, and the sidecar holds it."""
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 5)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 400)  # 80 chunks
    parent = _count_parent_encodes(monkeypatch)
    started = record_workers(monkeypatch)
    real, seen = probe.tokenizer_fingerprint, []

    def recording(tokenizer):
        seen.append((len(parent), [len(w.queued) for w in started]))
        return real(tokenizer)

    monkeypatch.setattr(probe, "tokenizer_fingerprint", recording)
    result, out = run(tmp_path, inp, workers=workers)
    assert result.written == 400 and len(seen) == 1
    encoded_here, queued = seen[0]
    if workers == 1:
        assert encoded_here == 80 and queued == []
    else:
        assert encoded_here == 0 and len(queued) == 1 and queued[0] > 0
    assert read_sidecar(out)["tokenizer"]["fingerprint"] == real(load_chat_encoder(str(SMOLLM2)).tokenizer)


def test_chunks_and_results_larger_than_the_pipes_pass_in_order(tmp_path, monkeypatch):
    """A chunk over the task pipe's budget waits for an idle worker and a result over the result pipe's
    buffer waits for the parent to read it: both get through, in order, with no deadlock."""
    monkeypatch.setattr(pool, "PIPE_BYTES", 1 << 16)  # 64 KiB pipes: a 32 KiB budget per worker
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 3)
    big = b'{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "ok"}]}'
    lines = [big % (b"word%d " % i * 4000) for i in range(12)] + [GOOD] * 30  # 12 lines of ~30 KB
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    _, out1 = run(tmp_path, inp, workers=1, out_name="one.jsonl")
    assert max(len(line) for line in out1.read_bytes().splitlines()) > 1 << 16  # results over the buffer
    parent = _count_parent_encodes(monkeypatch)
    with _fails_if_it_hangs():
        _, out2 = run(tmp_path, inp, workers=2, out_name="two.jsonl")
    assert out1.read_bytes() == out2.read_bytes()
    assert len(parent) < 14  # the worker encoded some of the 14 chunks


def test_ctrl_c_while_the_parent_encodes_stops_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 5)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 400)

    def interrupted(encoder, policy, lines):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while this process encodes a chunk

    monkeypatch.setattr(pipeline, "encode_lines", interrupted)
    workers = record_workers(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inp, workers=2)
    assert workers and all(not w.process.is_alive() for w in workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temporary files


_TOKENIZE_IN_A_PROCESS = """
import sys
from pathlib import Path
from minitrain.config import TokenizeConfig
from minitrain.data.pipeline import tokenize_file
inp, out, tokenizer = sys.argv[1:]
tokenize_file(TokenizeConfig(input_file=Path(inp), output_file=Path(out), model_name_or_path=tokenizer,
                             num_workers=2))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_stops_the_workers_and_leaves_no_output(tmp_path, signum):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) while this process and a worker encode: the process ends,
    the worker and the forkserver with it, and no output or temporary file is left."""
    import subprocess
    import sys
    import time

    import psutil

    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 200_000)  # a minute of work: the signal lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-c", _TOKENIZE_IN_A_PROCESS, str(inp), str(tmp_path / "out.jsonl"), str(SMOLLM2)],
        env={
            **os.environ,
            "PYTHONPATH": str(pipeline.Path(pipeline.__file__).parents[2]),
            "OPENBLAS_NUM_THREADS": "1",  # as `minitrain tokenize` sets it: the process has one thread
        },
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) == 1 and time.monotonic() < deadline:  # OUT's temporary file
            time.sleep(0.2)
        # the worker, forked from the process (single-threaded: see test_a_single_threaded_process_forks...)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        while not descendants and time.monotonic() < deadline:  # a loaded machine starts it later
            time.sleep(0.2)
            descendants = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(1.0)  # this process and the worker encode now
        assert len(descendants) == 1 and proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    expected = 128 + signum if signum == signal.SIGTERM else -signal.SIGINT  # KeyboardInterrupt re-raised
    assert proc.returncode == expected, stderr.decode()[-500:]
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive  # no worker (or forkserver) outlives the run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


_TOKENIZE_RECORDING_THE_START = """
import sys, threading
from pathlib import Path
from minitrain.config import TokenizeConfig
from minitrain.data import pipeline, workers as pool
inp, out, tokenizer, workers, thread = sys.argv[1:]
if thread == "thread":  # as a library caller with a thread of its own (torch's pool, a progress bar)
    threading.Thread(target=threading.Event().wait, daemon=True).start()
real, seen = pool.worker_context, []
pipeline.worker_context = pool.worker_context = lambda *args: seen.append(real(*args)) or seen[-1]
pipeline.CHUNK_LINES = 7
pipeline.tokenize_file(TokenizeConfig(input_file=Path(inp), output_file=Path(out),
                                      model_name_or_path=tokenizer, num_workers=int(workers)))
print(" ".join(ctx.get_start_method() for ctx in seen))
"""


def test_a_single_threaded_process_forks_its_workers_and_writes_the_same_bytes(tmp_path):
    """`minitrain tokenize` has one thread when its workers start: they fork from it (the encoder
    inherited, nothing unpickled), every pipe end they inherit is closed (or a worker would never see EOF
    and the run would hang at its end), and the output is the 1-process one byte for byte. With another
    thread in the process, the workers come from a forkserver instead."""
    import subprocess
    import sys

    inp = tmp_path / "all.jsonl"
    inp.write_bytes(b"".join(p.read_bytes() for p in MESSAGES_FILES) + mixed_file(tmp_path).read_bytes())
    env = {
        **os.environ,
        "PYTHONPATH": str(pipeline.Path(pipeline.__file__).parents[2]),
        "OPENBLAS_NUM_THREADS": "1",  # as `minitrain tokenize` sets it (numpy's BLAS pool is a thread)
    }
    outputs = {}
    for workers, thread in ((1, "none"), (3, "none"), (2, "thread")):
        out = tmp_path / f"{workers}-{thread}.jsonl"
        done = subprocess.run(
            [sys.executable, "-c", _TOKENIZE_RECORDING_THE_START, str(inp), str(out), str(SMOLLM2),
             str(workers), thread],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[workers, thread] = done.stdout.split(), out.read_bytes(), rejects_path(out).read_bytes()
    assert outputs[1, "none"][0] == []  # one process: no workers
    assert outputs[3, "none"][0] == ["fork", "fork"]  # decided early, and again when the workers start
    assert outputs[2, "thread"][0] == ["forkserver", "forkserver"]
    assert outputs[1, "none"][1:] == outputs[3, "none"][1:] == outputs[2, "thread"][1:]


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A worker killed (as the OS does when memory runs out) ends the run with a one-line error."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 400)
    real = pool._start_workers

    def killed(ctx, state, n):
        workers = real(ctx, state, n)
        os.kill(workers[0].process.pid, signal.SIGKILL)
        workers[0].process.join()
        return workers

    monkeypatch.setattr(pool, "_start_workers", killed)
    says = r"worker process \d+ ended without an answer \(exit code -9"
    with _fails_if_it_hangs(), pytest.raises(UserError, match=says):
        run(tmp_path, inp, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_fixture_data_reject_counts(tmp_path):
    """Nothing in the fixture conversations is rejected, with either tokenizer (the numbers in the report)."""
    inp = tmp_path / "fixtures.jsonl"
    inp.write_bytes(b"".join(p.read_bytes() for p in MESSAGES_FILES))
    for tokenizer in (SMOLLM2, TINYLLAMA):
        config = TokenizeConfig(
            input_file=inp,
            output_file=tmp_path / f"{tokenizer.name}.jsonl",
            model_name_or_path=str(tokenizer),
            num_workers=1,
        )
        result = pipeline.tokenize_file(config)
        assert (result.read, result.written, result.rejected, result.dropped) == (1499, 1499, 0, 0)


def test_strict_stops_at_the_first_bad_line(tmp_path):
    inp = mixed_file(tmp_path)
    with pytest.raises(UserError, match=rf"^{inp}:2: malformed JSON"):
        run(tmp_path, inp, strict=True)
    assert not (tmp_path / "out.jsonl").exists()
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD + b"\n" + LONG + b"\n")
    result, _ = run(tmp_path, good, strict=True, max_sample_num_tokens=100)  # dropped lines are not errors
    assert (result.written, result.dropped) == (1, 1)


def test_failure_mid_run_leaves_no_output_and_keeps_an_old_one(tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((GOOD + b"\n") * 20)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"previous run\n")
    monkeypatch.setattr(pipeline, "CHUNK_LINES", 5)
    real = pipeline.encode_lines
    calls = []

    def failing(encoder, policy, lines):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-run
        return real(encoder, policy, lines)

    monkeypatch.setattr(pipeline, "encode_lines", failing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inp)
    assert out.read_bytes() == b"previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary files left


def test_missing_empty_and_blank_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        run(tmp_path, tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        run(tmp_path, empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n")
    with pytest.raises(UserError, match="only blank lines"):
        run(tmp_path, blank)
    assert not (tmp_path / "out.jsonl").exists()


def test_config_validation():
    with pytest.raises(UserError, match="--num-workers"):
        TokenizeConfig(input_file="a.jsonl", output_file="b.jsonl", model_name_or_path="m", num_workers=0)
    with pytest.raises(UserError, match="--max-sample-num-tokens"):
        TokenizeConfig(
            input_file="a.jsonl", output_file="b.jsonl", model_name_or_path="m", max_sample_num_tokens=-1
        )
    with pytest.raises(UserError, match="is the input"):
        TokenizeConfig(input_file="a.jsonl", output_file="a.jsonl", model_name_or_path="m")
    with pytest.raises(UserError, match=".jsonl"):
        TokenizeConfig(input_file="a.jsonl", output_file="b.json", model_name_or_path="m")
    config = TokenizeConfig(input_file="a.jsonl", output_file="b.jsonl", model_name_or_path="m")
    assert config.workers() >= 1 and config.to_dict()["input_file"] == "a.jsonl"


def test_summary_renders_every_count(tmp_path):
    from rich.console import Console

    result, _ = run(tmp_path, mixed_file(tmp_path), max_sample_num_tokens=200)
    console = Console(record=True, width=120)
    pipeline.render_summary(result, console)
    text = console.export_text()
    for label in (
        "lines read",
        "written",
        "dropped",
        "rejected",
        "tokens",
        "trained tokens",
        "samples/s",
        "tokens/s",
        chat.ALIGNMENT_FAILURE,
    ):
        assert label in text


def test_nothing_written_is_an_error_with_the_top_reasons_and_no_files(tmp_path):
    """Every line rejected: one UserError (exit 1) naming the counts, top reasons and the first line; no
    OUT."""
    inp = tmp_path / "odd.jsonl"
    inp.write_bytes(b'{"text": "q", "label": "a"}\n' * 3 + b"{broken\n")
    with pytest.raises(UserError) as err:
        run(tmp_path, inp)
    message = str(err.value)
    assert (
        "no line could be tokenized, nothing written (4 rejected: no known shape (3), malformed JSON (1))"
        in message
    )
    assert "first, line 1: no known shape" in message and "\n" not in message
    assert not (tmp_path / "out.jsonl").exists() and not rejects_path(tmp_path / "out.jsonl").exists()
    # all dropped as too long: said too
    inp.write_bytes(GOOD + b"\n")
    with pytest.raises(UserError, match="1 dropped as longer than --max-sample-num-tokens"):
        run(tmp_path, inp, max_sample_num_tokens=3)
    # one line written among rejected ones: fine, as before
    inp.write_bytes(b"{broken\n" + GOOD + b"\n")
    result, out = run(tmp_path, inp)
    assert (result.written, result.rejected) == (1, 1) and out.is_file()


def test_reasoning_dropped_by_the_template_is_counted_in_summary_and_sidecar(tmp_path):
    """Qwen3 drops the reasoning of turns before the last user query: counted (turns, tokens), not silent."""
    import orjson
    from rich.console import Console

    qwen3 = SMOLLM2.parent / "qwen3"
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
    ]
    inp = tmp_path / "reasoning.jsonl"
    inp.write_bytes(orjson.dumps({"messages": turns}) + b"\n" + orjson.dumps({"messages": turns[:2]}) + b"\n")
    config = TokenizeConfig(
        input_file=inp, output_file=tmp_path / "out.jsonl", model_name_or_path=str(qwen3), num_workers=1
    )
    result = pipeline.tokenize_file(config)
    expected_tokens = len(load_chat_encoder(str(qwen3)).encoder.backend.encode("Greet back.").ids)
    assert (result.reasoning_dropped_turns, result.reasoning_dropped_tokens) == (1, expected_tokens)
    meta = read_sidecar(config.output_file)
    assert meta["reasoning_dropped_by_template"] == {"turns": 1, "tokens": expected_tokens}
    console = Console(record=True, width=120)
    pipeline.render_summary(result, console)
    row = next(line for line in console.export_text().splitlines() if "reasoning dropped" in line)
    assert f"1 turn, {expected_tokens} tokens" in row


def test_split_turns_writes_one_sample_per_turn_and_counts_lines_and_samples(tmp_path):
    import orjson

    three = {
        "messages": [
            {"role": r, "content": c} for r, c in zip(["user", "assistant"] * 3, "abcdef", strict=True)
        ]
    }
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(orjson.dumps(three) + b"\n" + GOOD + b"\n")
    result, out = run(tmp_path, inp, split_turns=True)
    assert (result.read, result.written, result.samples) == (2, 2, 4)
    assert [s["source_line"] for _, s in iter_samples(out)] == [1, 1, 1, 2]
    assert read_sidecar(out)["counts"]["samples"] == 4 and read_sidecar(out)["config"]["split_turns"] is True
    # too long: the whole line goes (a line is one unit), said in the rejects file
    lengths = [s["len"] for _, s in iter_samples(out)]
    assert lengths[3] < max(lengths[:3]) - 1  # GOOD is shorter than line 1's longest turn sample
    result, out = run(tmp_path, inp, split_turns=True, max_sample_num_tokens=max(lengths[:3]) - 1)
    assert (result.written, result.dropped, result.samples) == (1, 1, 1)
    assert "longest turn sample" in rejects_path(out).read_text()


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"train_on": "first"}, "--train-on first: expected one of all, last"),
        ({"train_on": "last", "split_turns": True}, "pass one of them"),
    ],
)
def test_train_on_and_split_turns_are_validated(tmp_path, kwargs, says):
    with pytest.raises(UserError, match=says):
        TokenizeConfig(
            input_file=tmp_path / "a.jsonl",
            output_file=tmp_path / "b.jsonl",
            model_name_or_path="m",
            **kwargs,
        )


# ------------------------------------------------------------------------------------- preference pairs


def _pair(prompt: str, chosen: str, rejected: str) -> bytes:
    import orjson

    user = [{"role": "user", "content": prompt}]
    return orjson.dumps(
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    )


PAIR_LINES = [  # (line, what becomes of it)
    (_pair("Hi", "Hello there.", "Go away."), "written"),
    (GOOD, chat.MIXED_KINDS),
    (b'{"prompt": "q", "chosen": "a"}', chat.MISSING_SIDE),
    (b'{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}', chat.EMPTY_RESPONSE),
    (
        b'{"prompt": [], "chosen": [{"role": "user", "content": "q"}], '
        b'"rejected": [{"role": "assistant", "content": "a"}]}',
        chat.NON_ASSISTANT_RESPONSE,
    ),
    (b'{"prompt": "Answer: ", "chosen": "Yes", "rejected": "\\nNo"}', chat.PROMPT_TOKENS_DIFFER),
    (b"{broken", chat.MALFORMED_JSON),
    (b"", "blank"),
    (_pair("Hi", "word " * 300, "Short."), chat.TOO_LONG),  # the chosen side is too long: the pair goes
    (b'{"prompt": "Q: capital of France?", "chosen": " Paris", "rejected": " Lyon"}', "written"),
    (
        b'{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], '
        b'"rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}]}',
        "written",
    ),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_preference_file_counts_every_line_and_writes_one_line_per_pair(tmp_path, workers):
    import orjson

    from minitrain.data.format import iter_pairs

    inp = tmp_path / "pairs.jsonl"
    inp.write_bytes(b"\n".join(line for line, _ in PAIR_LINES) + b"\n")
    result, out = run(tmp_path, inp, workers=workers, max_sample_num_tokens=200)
    fates = {n: fate for n, (_, fate) in enumerate(PAIR_LINES, 1)}
    rejected = {n: fate for n, fate in fates.items() if fate not in ("written", "blank", chat.TOO_LONG)}
    assert result.kind == "preference"
    assert result.read == result.written + result.dropped + result.rejected == len(PAIR_LINES) - 1
    assert (result.written, result.dropped, result.rejected, result.blank) == (3, 1, len(rejected), 1)
    rejects = [orjson.loads(line) for line in rejects_path(out).read_bytes().splitlines()]
    assert {r["line"]: r["reason"] for r in rejects} == {
        n: fate for n, fate in fates.items() if fate not in ("written", "blank")
    }
    pairs = list(iter_pairs(out))
    assert [p["source_line"] for _, p in pairs] == [n for n, fate in fates.items() if fate == "written"]
    for _, p in pairs:
        k = p["prompt_len"]
        assert p["chosen"]["input_ids"][:k] == p["rejected"]["input_ids"][:k]
        for side in (p["chosen"], p["rejected"]):
            assert side["len"] == len(side["input_ids"]) == len(side["labels"])
            assert side["num_loss_counted_tokens"] == sum(label != -100 for label in side["labels"])
            assert set(side["labels"][:k]) == {-100} and side["labels"][k] == side["input_ids"][k]
    sides = [p[key] for _, p in pairs for key in ("chosen", "rejected")]
    assert result.tokens == sum(s["len"] for s in sides)
    assert result.trained_tokens == sum(s["num_loss_counted_tokens"] for s in sides)
    meta = read_sidecar(out)
    assert meta["kind"] == "preference" and meta["counts"]["pairs"] == meta["counts"]["written"] == 3
    counts = meta["counts"]
    assert counts["read"] == counts["written"] + counts["dropped"] + counts["rejected"]


def test_an_sft_file_rejects_pair_lines_as_mixed_kinds(tmp_path):
    inp = tmp_path / "sft.jsonl"
    inp.write_bytes(b"{broken\n" + GOOD + b"\n" + _pair("Hi", "a", "b") + b"\n" + GOOD + b"\n")
    result, out = run(tmp_path, inp)
    assert result.kind == "sft" and read_sidecar(out)["kind"] == "sft"
    assert (result.written, result.rejected_by_reason) == (2, {chat.MALFORMED_JSON: 1, chat.MIXED_KINDS: 1})


@pytest.mark.parametrize(
    ("flags", "says"),
    [({"split_turns": True}, "drop --split-turns"), ({"train_on": "last"}, "drop --train-on")],
)
def test_turn_flags_are_refused_on_a_preference_file(tmp_path, flags, says):
    inp = tmp_path / "pairs.jsonl"
    inp.write_bytes(_pair("Hi", "a", "b") + b"\n")
    with pytest.raises(UserError, match=f"holds preference pairs .*; {says}"):
        run(tmp_path, inp, **flags)


def test_the_fixture_preference_file(tmp_path):
    """dpo_en_demo (300 pairs, prompts of 1 to 13 messages): every pair written; the first ones exactly as the
    reference render gives each side."""
    import orjson
    from transformers import AutoTokenizer

    from minitrain.data.format import iter_pairs
    from tests.conftest import DATA
    from tests.data.test_preference import reference_side

    inp = DATA / "dpo_en_demo.preference.jsonl"
    result, out = run(tmp_path, inp)
    assert (result.read, result.written, result.dropped, result.rejected) == (300, 300, 0, 0)
    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    records = [orjson.loads(line) for line in inp.read_bytes().splitlines()]
    for _, pair in iter_pairs(out):
        k = pair["prompt_len"]
        assert pair["chosen"]["input_ids"][:k] == pair["rejected"]["input_ids"][:k]
        record = records[pair["source_line"] - 1]
        if pair["source_line"] <= 20:
            for key in ("chosen", "rejected"):
                ids, labels, prompt_len = reference_side(tok, record["prompt"], record[key])
                assert (pair[key]["input_ids"], pair[key]["labels"], k) == (ids, labels, prompt_len)


def test_chat_template_kwargs_the_template_never_reads_are_an_error_or_counted(tmp_path):
    """--chat-template-kwargs naming what the template never reads (a typo, another family's switch) would
    change nothing: a one-line error. A line's own such names are rendered as transformers renders them
    (without effect) and counted by name and line in the result, the sidecar and the summary; the lines
    are the same bytes as without the key."""
    from rich.console import Console

    def run_qwen3(inp, out_name, **kwargs):
        return run(tmp_path, inp, out_name=out_name, model=QWEN3, **kwargs)

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(GOOD + b"\n")
    with pytest.raises(UserError) as err:
        run_qwen3(inp, "flag.jsonl", chat_template_kwargs='{"enable_thinkng": false}')
    assert "never reads 'enable_thinkng'" in str(err.value)
    assert "the names it reads: enable_thinking" in str(err.value)  # not the template's own `content`
    assert not (tmp_path / "flag.jsonl").exists()
    run_qwen3(inp, "read.jsonl", chat_template_kwargs='{"enable_thinking": false}')  # a name it reads

    kwargs_lines = [
        b'{"messages": %s, "chat_template_kwargs": {"enable_thinkng": false}}',
        b'{"messages": %s, "chat_template_kwargs": {"enable_thinking": true, "enable_thinkng": 1, "x": 2}}',
        b'{"messages": %s}',
    ]
    messages = GOOD[len(b'{"messages": ') : -1]
    inp.write_bytes(b"\n".join(line % messages for line in kwargs_lines) + b"\n")
    result, out = run_qwen3(inp, "lines.jsonl")
    assert result.unread_template_kwargs == {"enable_thinkng": 2, "x": 1}
    assert read_sidecar(out)["chat_template_kwargs_unread"] == {"enable_thinkng": 2, "x": 1}
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes((GOOD + b"\n") * 3)
    assert out.read_bytes() == run_qwen3(plain, "plain-out.jsonl")[1].read_bytes()
    console = Console(record=True, width=200)
    pipeline.render_summary(result, console)
    assert "chat_template_kwargs unread by the template │ enable_thinkng (2 lines), x (1 line)" in (
        console.export_text()
    )
    clean, clean_out = run_qwen3(plain, "clean.jsonl")
    assert clean.unread_template_kwargs == {} and read_sidecar(clean_out)["chat_template_kwargs_unread"] == {}
