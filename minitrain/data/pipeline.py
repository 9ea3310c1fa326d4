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

Workers: `--num-workers N` is this process and N-1 worker processes (`workers.py`); this process
reads chunks, encodes those the workers' queues have no room for, and writes the results in input order.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import itemgetter
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
    EncodedSample,
    PlannedSample,
    SampleRejected,
)
from minitrain.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    KIND_PREFERENCE,
    KIND_SFT,
    reasoning_dropped_text,
    rejects_path,
    sidecar_path,
    unread_kwargs_text,
)
from minitrain.data.preference import encode_pair
from minitrain.data.probe import load_chat_encoder
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
from minitrain.data.workers import results_in_order, worker_context
from minitrain.errors import UserError, signal_exit_code

CHUNK_LINES = 64  # lines per task sent to a worker
CHUNK_BYTES = 1 << 20  # ... or fewer when the lines are long


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
    unread_template_kwargs: Counter[str] = field(default_factory=Counter)  # name -> written lines giving it
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
    # a line's chat_template_kwargs names that the template never reads (rendered without effect): name ->
    # written lines
    unread_template_kwargs: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    replaced: bool = False  # OUT existed before this run: the new file took its place (said in the summary)

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
    """Encode raw input lines (1-based line number, bytes) into output bytes, rejects and counts.

    Two passes: every line parsed, rendered and its turns located (`ChatEncoder.plan`), then every planned
    sample encoded, labelled and written in line order (`ChatEncoder.finish`): the encodes run together,
    not each between two renders (see `plan`). Rejects of both passes are put back in line order.
    """
    result = ChunkResult()
    out: list[bytes] = []
    planned: list[tuple[int, list[PlannedSample | EncodedSample], Any]] = []  # (line, its samples, record)
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
            if policy.kind == KIND_PREFERENCE:  # a pair file has no SFT lines: its lines stay in order
                _encode_pair_line(encoder, policy, line_no, record, result, out)
                continue
            record = to_chat_record(record, policy.mapping)  # ShareGPT, Alpaca, ... -> messages
            if policy.split_turns:
                planned.append((line_no, encoder.plan_turns(record), record))
            else:
                planned.append((line_no, [encoder.plan(record, policy.train_on)], record))
        except SampleRejected as rej:
            result.rejects.append((line_no, "rejected", rej.reason, rej.detail))
    for line_no, plans, record in planned:
        try:
            samples = [encoder.finish(plan) for plan in plans]
        except SampleRejected as rej:
            result.rejects.append((line_no, "rejected", rej.reason, rej.detail))
            continue
        if not _write_samples(policy, line_no, samples, result, out):
            continue
        _count_unread(encoder, record, result.unread_template_kwargs)
        result.written += 1
        result.samples += len(samples)
    result.rejects.sort(key=itemgetter(0))  # one entry per line at most
    if out:
        out.append(b"")
        result.out = b"\n".join(out)
    return result


def _write_samples(
    policy: Policy, line_no: int, samples: list[EncodedSample], result: ChunkResult, out: list[bytes]
) -> bool:
    """One line's samples to `out` with their counts (True), or the line recorded as dropped (too long)."""
    longest = max(len(sample.input_ids) for sample in samples)
    if policy.max_tokens is not None and longest > policy.max_tokens:
        # a line is one unit: with --split-turns, one sample too long drops the line's samples
        what = f"{longest} tokens" if len(samples) == 1 else f"its longest turn sample has {longest} tokens"
        result.rejects.append(
            (line_no, "dropped", TOO_LONG, f"{what} > --max-sample-num-tokens {policy.max_tokens}")
        )
        return False
    for sample in samples:
        out.append(orjson.dumps({**_counted_fields(sample, result), "source_line": line_no}))
    return True


def _counted_fields(sample: EncodedSample, result: ChunkResult) -> dict[str, Any]:
    """A sample's fields in the output format (format.py), its tokens added to `result`'s counts."""
    n = len(sample.input_ids)
    trained = n - sample.labels.count(IGNORE_INDEX)
    result.tokens += n
    result.trained_tokens += trained
    result.reasoning_dropped_turns += sample.reasoning_dropped_turns
    result.reasoning_dropped_tokens += sample.reasoning_dropped_tokens
    return {
        "input_ids": sample.input_ids,
        "labels": sample.labels,
        "len": n,
        "num_loss_counted_tokens": trained,
    }


def _count_unread(encoder: ChatEncoder, record: Any, counts: Counter[str]) -> None:
    """Count the names of a written line's `chat_template_kwargs` that the template never reads."""
    kwargs = record.get("chat_template_kwargs") if isinstance(record, dict) else None
    if isinstance(kwargs, dict):
        counts.update(encoder.unread_names(kwargs))


def _mixed_detail(kind: str) -> str:
    if kind == KIND_PREFERENCE:
        return "an SFT record (no `chosen`/`rejected`) in a file of preference pairs (its first line decides)"
    return "a preference pair (`chosen`/`rejected`) in a file of SFT records (its first line decides)"


def _encode_pair_line(
    encoder: ChatEncoder, policy: Policy, line_no: int, record: Any, result: ChunkResult, out: list[bytes]
) -> None:
    """One pair line -> one output line (format.py), or a reject; SampleRejected passes through."""
    record = to_pair_record(record, policy.mapping)
    pair = encode_pair(encoder, record)
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
    line: dict[str, Any] = {key: _counted_fields(side, result) for key, side in sides.items()}
    line["prompt_len"] = pair.prompt_len
    line["source_line"] = line_no
    out.append(orjson.dumps(line))
    _count_unread(encoder, record, result.unread_template_kwargs)
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


# Imported once by a forkserver, so each worker forked from it starts with them (not once per worker).
_WORKER_MODULES = ("__main__", __name__, "tokenizers", "jinja2.sandbox", "jinja2.ext")


def _encode_chunk(state: tuple[ChatEncoder, Policy], lines: list[tuple[int, bytes]]) -> ChunkResult:
    """The workers' job (`workers.results_in_order`): one chunk of lines with the (encoder, policy)."""
    encoder, policy = state
    return encode_lines(encoder, policy, lines)


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
    if workers > 1:  # a forkserver (if needed) starts now, while this process loads the tokenizer
        worker_context(_WORKER_MODULES)
    loaded = load_chat_encoder(
        config.model_name_or_path,
        config.chat_template,
        trust_remote_code=config.trust_remote_code,
        template_kwargs=config.template_kwargs(),
    )
    result = TokenizeResult(
        input_file=inp,
        output_file=out,
        rejects_file=rejects_path(out),
        sidecar_file=sidecar_path(out),
        num_workers=workers,
        kind=kind,
        replaced=out.exists(),
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
            results = results_in_order(
                _encode_chunk,
                (loaded.encoder, policy),
                chunks,
                result.num_workers,
                preload=_WORKER_MODULES,
                # the sidecar's costly facts, computed (and cached) while the workers encode
                side_task=lambda: (loaded.fingerprint, loaded.turn_token_ids),
            )
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
                    result.unread_template_kwargs.update(chunk.unread_template_kwargs)
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
        "chat_template_kwargs_unread": dict(sorted(result.unread_template_kwargs.items())),
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
        dropped = reasoning_dropped_text(result.reasoning_dropped_turns, result.reasoning_dropped_tokens)
        table.add_row("reasoning dropped by the template", f"[yellow]{dropped}[/yellow]")
    if result.unread_template_kwargs:
        unread = unread_kwargs_text(result.unread_template_kwargs)
        table.add_row("chat_template_kwargs unread by the template", f"[yellow]{unread}[/yellow]")
    table.add_row("samples/s", f"{result.samples_per_s:,.0f}")
    table.add_row("tokens/s", f"{result.tokens_per_s:,.0f}")
    table.add_row("workers", str(result.num_workers))
    console.print(table)
    replaced = ", replacing the previous one" if result.replaced else ""
    console.print(f"wrote {result.output_file}{replaced} (sidecar: {result.sidecar_file.name})")
    if result.dropped or result.rejected:
        console.print(f"dropped and rejected lines (line number + reason): {result.rejects_file}")


def _tokenizer_location(name_or_path: str) -> str:
    """A local tokenizer folder as an absolute path (later stages may run elsewhere); a hub name as given."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path
