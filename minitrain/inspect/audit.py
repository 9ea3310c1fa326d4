"""`minitrain inspect --audit`: mechanical checks of a tokenized file, batch by batch with numpy.

`BATCH_SAMPLES` samples are checked at a time on the concatenation of their tokens (per-sample numpy
calls would cost more than the JSON parsing); counts and the first few example indices are kept per
kind of finding, and with `--source` the original input is read in step (samples come in input order,
so `source_line` only grows) and a batch's trained spans are decoded in one call. `--audit --stats` is
one pass: the audit feeds a `StatsAccumulator`.

Trade-off: checks are per sample and mechanical - they prove the file is self-consistent and that what
is trained looks like assistant turns ending in an end-of-turn token (and, with `--source`, reads as the
assistant contents), not that the tokenization is the one a template would give (that is `tokenize`'s
own test suite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from minitrain.data.chat import assistant_parts
from minitrain.data.format import IGNORE_INDEX, parse_pair, parse_sample
from minitrain.errors import UserError
from minitrain.inspect.select import first_sample, iter_raw
from minitrain.inspect.stats import NUM_EXAMPLES, StatsAccumulator
from minitrain.inspect.tokenizer import end_of_turn_ids, special_token_ids


@dataclass(frozen=True)
class Check:
    """One kind of audit finding."""

    severity: str  # "error" (exit 1) or "warning"
    description: str


# Every audit check, in the order the report lists them. `minitrain inspect --help` and docs/formats.md show
# these.
CHECKS: dict[str, Check] = {
    "malformed_line": Check("error", "a line that is not JSON or has no input_ids/labels lists of ints"),
    "len_mismatch": Check("error", "`len` missing or != len(input_ids), or len(labels) != len(input_ids)"),
    "loss_count_mismatch": Check(
        "error", "`num_loss_counted_tokens` missing or != the number of labels that are not -100"
    ),
    "label_not_input": Check("error", "a label that is neither -100 nor the input id at the same position"),
    "token_out_of_vocab": Check("error", "an input id < 0 or >= the tokenizer's vocabulary size"),
    "zero_trained": Check(
        "warning", "no trained token at all (costs compute, teaches nothing; e.g. every turn train:false)"
    ),
    "trained_special": Check(
        "error", "a trained special token that is not an end-of-turn token (role header, BOS, ...)"
    ),
    "eot_not_trained": Check(
        "error", "a trained span that does not end with an end-of-turn token (the model never learns to stop)"
    ),
    "text_mismatch": Check(
        "error",
        "--source: a trained span does not end with its assistant content (+ end-of-turn), or holds more than"
        " its reasoning and 128 characters of template text before it",
    ),
    "reasoning_masked": Check(
        "error",
        "--source: a turn's reasoning is rendered in the sample but masked (the model never learns to think)",
    ),
    "source_unmatched": Check(
        "error", "--source: no source_line, or it goes backwards, or past the end, or that line is unreadable"
    ),
    "prompt_mismatch": Check(
        "error",
        "pairs: the first prompt_len ids differ between the chosen and rejected sides (or do not exist)",
    ),
    "trained_in_prompt": Check(
        "error",
        "pairs: a side's first trained token is not at prompt_len (a prompt token trained, or none at it)",
    ),
    "sidecar_mismatch": Check(
        "error", "the sidecar's counts (written, tokens, trained_tokens) disagree with the file"
    ),
}


@dataclass(frozen=True)
class Example:
    """Where a finding was seen: sample index, its source line, and a short detail."""

    index: int | None  # None: a finding about the whole file
    source_line: int | None
    detail: str


@dataclass
class AuditReport:
    """Findings of `--audit`: samples per kind (a sample counts once per kind) and the first examples of
    each."""

    path: Path
    samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Example]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, index: int | None, source_line: int | None, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < NUM_EXAMPLES:
            examples.append(Example(index, source_line, detail))

    @property
    def num_errors(self) -> int:
        return sum(c for k, c in self.counts.items() if CHECKS[k].severity == "error")

    @property
    def num_warnings(self) -> int:
        return sum(c for k, c in self.counts.items() if CHECKS[k].severity == "warning")

    @property
    def ok(self) -> bool:
        """True when no finding is an error (warnings allowed): the exit code is 0."""
        return self.num_errors == 0


def _short(text: str, limit: int = 40) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _first_difference(expected: str, got: str) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    return f"at char {at}: expected {_short(expected[at:])}, trained {_short(got[at:])}"


TEMPLATE_TEXT_LIMIT = 128  # characters of template text a trained span may hold before its answer


def expected_turns(
    source: Any, config: dict[str, Any] | None = None, part: int = 0
) -> list[tuple[str, str]] | None:
    """What `tokenize` trains for one input line: per trained turn, (answer, reasoning), end-of-turn excluded.

    `config` is the sidecar's tokenize config: with `train_on` "last" only the last assistant turn, with
    `split_turns` sample `part` of the line holds turn `part` alone. None when the line cannot be compared
    as text: assistant turns with tool calls (the template renders those its own way) or an unknown shape.
    """
    if not isinstance(source, dict):
        return None
    config = config or {}
    messages = source.get("messages")
    if isinstance(messages, list):
        if not all(isinstance(m, dict) for m in messages):
            return None
        if any(m.get("role") == "pretrain" for m in messages):
            return [(str(m.get("content") or ""), "") for m in messages if m.get("role") == "pretrain"]
        turns = [m for m in messages if m.get("role") == "assistant"]
        if any(m.get("tool_calls") for m in turns):
            return None
        if config.get("train_on") == "last":
            turns = turns[-1:]
        out = [assistant_parts(m) for m in turns if m.get("train", True) is not False]
        if config.get("split_turns") and len(out) > 1:
            out = out[part : part + 1]
        return out
    if isinstance(source.get("prompt"), str) and isinstance(source.get("generation"), str):
        return [(source["generation"], "")]
    return None


class _SourceReader:
    """Reads the original input JSONL forward only, to the line a sample names."""

    def __init__(self, path: Path) -> None:
        self._f = Path(path).open("rb")  # noqa: SIM115 - closed by audit_file's finally
        self.line_no = 0
        self._last = b""

    def read(self, line: int) -> bytes | None:
        """Raw text of 1-based `line`, or None if it was already passed or lies past the end.

        The current line may be read again (`--split-turns` writes several samples per input line).
        """
        if line == self.line_no and line > 0:
            return self._last
        if line < self.line_no:
            return None
        raw = b""
        while self.line_no < line:
            raw = self._f.readline()
            if not raw:
                return None
            self.line_no += 1
        self._last = raw.removeprefix(b"\xef\xbb\xbf") if line == 1 else raw  # tokenize accepts a UTF-8 BOM
        return self._last

    def close(self) -> None:
        self._f.close()


@dataclass(frozen=True)
class _Vocab:
    """Lookup tables over the vocabulary (index = token id)."""

    size: int
    bad_special: np.ndarray  # bool [size]: special and not end-of-turn
    eot: np.ndarray  # bool [size]
    eot_ids: frozenset[int]


def _vocab_tables(tokenizer: Any, meta: dict[str, Any] | None) -> _Vocab:
    size = max(len(tokenizer), int((meta or {}).get("tokenizer", {}).get("vocab_size") or 0))
    eot_ids = end_of_turn_ids(tokenizer, meta)
    # tokens the template writes in the model's voice (`<think>`, `<|channel|>` ...) are trained by design
    voice = frozenset(int(i) for i in ((meta or {}).get("tokenizer") or {}).get("turn_token_ids") or [])
    special = special_token_ids(tokenizer) - voice
    bad_special = np.zeros(size, dtype=bool)
    eot = np.zeros(size, dtype=bool)
    for i in special - eot_ids:
        if 0 <= i < size:
            bad_special[i] = True
    for i in eot_ids:
        if 0 <= i < size:
            eot[i] = True
    return _Vocab(size, bad_special, eot, eot_ids)


def _piece(tokenizer: Any, token_id: int) -> str:
    return repr(tokenizer.convert_ids_to_tokens(int(token_id)))


@dataclass
class _Pending:
    """A parsed, aligned sample waiting for its batch to be checked."""

    index: int
    line: int | None  # source_line
    ids: list[int]
    labels: list[int]
    counted: Any  # num_loss_counted_tokens as written


def _batch_decoder(tokenizer: Any) -> Callable[[list[list[int]]], list[str]]:
    """Decode many id lists at once, through the Rust tokenizer when there is one (transformers' wrapper
    costs about a microsecond per token in Python)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda lists: backend.decode_batch(lists, skip_special_tokens=False)
    return lambda lists: [
        tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in lists
    ]


@dataclass(frozen=True)
class _Checked:
    """A checked batch, concatenated: what the --source comparison needs."""

    ids: np.ndarray  # [total] int64, clipped into the vocabulary
    starts: np.ndarray  # [samples + 1] where each sample starts, total appended
    span_starts: np.ndarray  # [spans] first position of each trained span, ascending
    span_ends: np.ndarray  # [spans] one past its last position
    trained_tokens: int


def _hits(mask: np.ndarray, sample_of: np.ndarray, starts: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(sample in batch, count, first position within the sample) for every sample with a True in `mask`."""
    pos = np.flatnonzero(mask)
    if pos.size == 0:
        return
    owners = sample_of[pos]
    samples, first = np.unique(owners, return_index=True)
    counts = np.bincount(owners, minlength=int(samples[-1]) + 1)
    for b, f in zip(samples.tolist(), pos[first].tolist(), strict=True):
        yield b, int(counts[b]), f - int(starts[b])


def _int_array(lists: list[list[Any]], total: int) -> np.ndarray:
    """The concatenation of `lists` as int64; TypeError unless every value is a JSON integer.

    `sum` of a list of ints is an int, one float makes it a float, and a string, null or list raises
    TypeError; this check plus `fromiter` costs about 0.8x of letting `np.array` infer the dtype.
    """
    if type(sum(map(sum, lists))) is not int:
        raise TypeError("a value that is not an integer")
    return np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=total)


def _audit_batch(report: AuditReport, batch: list[_Pending], tokenizer: Any, vocab: _Vocab) -> _Checked:
    """The token-level checks for a batch of samples at once, on the concatenation of their tokens.

    Raises TypeError/ValueError/OverflowError before any finding is added when some id or label is not
    an int; the caller then checks the samples one by one.
    """
    lens = np.fromiter((len(p.ids) for p in batch), dtype=np.int64, count=len(batch))
    starts = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    total = int(starts[-1])
    ids = _int_array([p.ids for p in batch], total)
    labels = _int_array([p.labels for p in batch], total)
    sample_of = np.repeat(np.arange(len(batch)), lens)  # [total] which sample each position belongs to
    trained = labels != IGNORE_INDEX
    csum = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(trained, out=csum[1:])
    num_trained = (csum[starts[1:]] - csum[starts[:-1]]).tolist()

    for p, t in zip(batch, num_trained, strict=True):
        if p.counted != t:
            report.add(
                "loss_count_mismatch",
                p.index,
                p.line,
                f"num_loss_counted_tokens={p.counted!r}, labels have {t}",
            )
    for b, count, at in _hits(trained & (labels != ids), sample_of, starts):
        g = int(starts[b]) + at
        report.add(
            "label_not_input",
            batch[b].index,
            batch[b].line,
            f"{count} position(s), first {at}: label {labels[g]} vs id {ids[g]}",
        )
    for b, _, at in _hits((ids < 0) | (ids >= vocab.size), sample_of, starts):
        report.add(
            "token_out_of_vocab",
            batch[b].index,
            batch[b].line,
            f"id {ids[int(starts[b]) + at]} at {at} (vocab {vocab.size})",
        )
    ids = np.clip(ids, 0, vocab.size - 1)  # keep the table lookups below in range
    for p, t in zip(batch, num_trained, strict=True):
        if t == 0:
            report.add("zero_trained", p.index, p.line)
    for b, count, at in _hits(trained & vocab.bad_special[ids], sample_of, starts):
        piece = _piece(tokenizer, ids[int(starts[b]) + at])
        report.add(
            "trained_special", batch[b].index, batch[b].line, f"{count} token(s), first {piece} at {at}"
        )
    # Spans never cross samples: position 0 of a sample has no predecessor, its last one no successor.
    trained_prev = np.zeros(total, dtype=bool)
    trained_prev[1:] = trained[:-1]
    trained_prev[starts[:-1][lens > 0]] = False
    trained_next = np.zeros(total, dtype=bool)
    trained_next[:-1] = trained[1:]
    trained_next[starts[1:][lens > 0] - 1] = False
    last_of_span = trained & ~trained_next
    for b, count, at in _hits(last_of_span & ~vocab.eot[ids], sample_of, starts):
        piece = _piece(tokenizer, ids[int(starts[b]) + at])
        report.add(
            "eot_not_trained",
            batch[b].index,
            batch[b].line,
            f"{count} span(s), first ends at {at} with {piece}",
        )
    return _Checked(
        ids=ids,
        starts=starts,
        span_starts=np.flatnonzero(trained & ~trained_prev),
        span_ends=np.flatnonzero(last_of_span) + 1,
        trained_tokens=int(csum[-1]),
    )


def _check_texts(
    report: AuditReport,
    batch: list[_Pending],
    checked: _Checked,
    sources: dict[int, tuple[Any, int]],
    decode_batch: Callable[[list[list[int]]], list[str]],
    vocab: _Vocab,
    config: dict[str, Any] | None,
) -> tuple[int, int]:
    """Compare decoded trained spans with the source lines (`sources[b]`: sample b's line and its part).

    Each trained span must end with its turn's answer; before it may come the turn's reasoning and up to
    `TEMPLATE_TEXT_LIMIT` characters of template text in the model's voice (think tags, channel headers).
    A turn whose reasoning is in the sample's text but not in its trained span is `reasoning_masked`.
    Returns (compared, not comparable). The spans of the whole batch are decoded in one call.
    """
    first_span = np.searchsorted(checked.span_starts, checked.starts)  # [samples + 1] span range per sample
    todo: list[tuple[int, int, tuple[str, str]]] = []  # (sample in batch, turn, (answer, reasoning))
    spans: list[list[int]] = []
    compared = skipped = 0
    for b, (source, part) in sources.items():
        expected = expected_turns(source, config, part)
        if expected is None:
            skipped += 1
            continue
        compared += 1
        lo, hi = int(first_span[b]), int(first_span[b + 1])
        if hi - lo != len(expected):
            msg = f"{hi - lo} trained span(s), {len(expected)} trained turn(s) in the source"
            report.add("text_mismatch", batch[b].index, batch[b].line, msg)
            continue
        for turn, k in enumerate(range(lo, hi)):
            span = checked.ids[checked.span_starts[k] : checked.span_ends[k]].tolist()
            if span[-1] in vocab.eot_ids:
                span.pop()  # the end-of-turn token is checked by eot_not_trained
            todo.append((b, turn, expected[turn]))
            spans.append(span)
    reported: set[int] = set()
    masked: list[tuple[int, int, str]] = []  # reasoning not in its span: is it in the sample at all?
    for (b, turn, (answer, reasoning)), got in zip(todo, decode_batch(spans) if spans else [], strict=True):
        # Templates may trim content (Llama-3 `| trim`) and SentencePiece decoders drop a leading space.
        got, answer, reasoning = got.strip(), answer.strip(), reasoning.strip()
        before = (
            got[: len(got) - len(answer)].replace(reasoning, "", 1)
            if reasoning
            else got[: len(got) - len(answer)]
        )
        if b not in reported and (not got.endswith(answer) or len(before) > TEMPLATE_TEXT_LIMIT):
            reported.add(b)
            msg = f"turn {turn} {_first_difference(answer, got[-len(answer) :] if answer else got)}"
            if got.endswith(answer):
                msg = (
                    f"turn {turn}: {len(before)} characters of other text before its answer: {_short(before)}"
                )
            report.add("text_mismatch", batch[b].index, batch[b].line, msg)
        if reasoning and reasoning not in got:
            masked.append((b, turn, reasoning))
    if masked:
        whole = decode_batch(
            [checked.ids[checked.starts[b] : checked.starts[b + 1]].tolist() for b, _, _ in masked]
        )
        for (b, turn, reasoning), text in zip(masked, whole, strict=True):
            if (
                reasoning in text
            ):  # rendered, yet masked; absent = dropped by the template (tokenize counts it)
                report.add(
                    "reasoning_masked", batch[b].index, batch[b].line, f"turn {turn}: {_short(reasoning)}"
                )
    return compared, skipped


BATCH_SAMPLES = 256  # samples checked together: amortises numpy's per-call cost, bounds memory


def audit_file(
    path: Path,
    tokenizer: Any,
    meta: dict[str, Any] | None,
    *,
    source: Path | None = None,
    stats: StatsAccumulator | None = None,
    pairs: bool = False,
) -> AuditReport:
    """Check every sample of a tokenized file (see `CHECKS`) in one streaming pass.

    With `stats`, the same pass also feeds `--stats` (every sample whose input_ids and labels are lists).
    `pairs`: a preference file; both sides of each pair get every sample check, the pair the pair checks,
    and `samples` counts pairs. `--source` compares SFT samples only (refused by `inspect_file` for pairs).
    """
    path = Path(path)
    first_sample(path, pairs)  # not tokenize output at all -> one-line error, not a finding per line
    vocab = _vocab_tables(tokenizer, meta)
    decode_batch = _batch_decoder(tokenizer)
    report = AuditReport(path)
    reader = _SourceReader(source) if source is not None else None
    compared = skipped = tokens = trained_tokens = 0
    config = (meta or {}).get("config")
    part = {"line": None, "k": 0}  # samples of one source line so far (several with --split-turns)

    def check(batch: list[_Pending]) -> None:
        nonlocal compared, skipped, tokens, trained_tokens
        try:
            checked = _audit_batch(report, batch, tokenizer, vocab)
        except (TypeError, ValueError, OverflowError):
            if len(batch) == 1:
                report.add(
                    "malformed_line",
                    batch[0].index,
                    batch[0].line,
                    "input_ids/labels hold something not an int",
                )
                return
            for p in batch:  # find the culprit: findings of the good ones are added by their own call
                check([p])
            return
        tokens += checked.ids.size
        trained_tokens += checked.trained_tokens
        if reader is None:
            return
        sources: dict[int, tuple[Any, int]] = {}
        for b, p in enumerate(batch):
            part["k"] = part["k"] + 1 if p.line == part["line"] else 0
            part["line"] = p.line
            raw_source = reader.read(p.line) if isinstance(p.line, int) else None
            if raw_source is None:
                where = (
                    "no source_line"
                    if not isinstance(p.line, int)
                    else f"source line {p.line} out of order or past the end"
                )
                report.add("source_unmatched", p.index, p.line if isinstance(p.line, int) else None, where)
                continue
            try:
                sources[b] = (orjson.loads(raw_source), part["k"])
            except orjson.JSONDecodeError:
                report.add("source_unmatched", p.index, p.line, f"source line {p.line} is not JSON")
        done, not_comparable = _check_texts(report, batch, checked, sources, decode_batch, vocab, config)
        compared += done
        skipped += not_comparable

    pending: list[_Pending] = []
    try:
        for index, line_no, raw in iter_raw(path):
            report.samples += 1
            try:
                parsed = (parse_pair if pairs else parse_sample)(raw, path, line_no)
            except UserError as err:
                report.add("malformed_line", index, None, str(err).split(": ", 2)[-1][:80])
                continue
            if pairs:
                _check_pair(report, index, parsed)
            for sample in (parsed["chosen"], parsed["rejected"]) if pairs else (parsed,):
                pending = _queue(report, index, parsed.get("source_line"), sample, pending, stats)
                if len(pending) >= BATCH_SAMPLES:
                    check(pending)
                    pending = []
        if pending:
            check(pending)
    finally:
        if reader is not None:
            reader.close()
    _check_sidecar(report, meta, tokens, trained_tokens)
    if reader is not None:
        report.notes.append(
            f"--source {source}: {compared:,} samples compared with their source line"
            + (f", {skipped:,} not comparable as text (tool calls)" if skipped else "")
        )
    elif pairs:
        report.notes.append(f"{report.samples:,} preference pairs: every sample check ran on both sides")
    elif (meta or {}).get("input"):
        report.notes.append(f"trained text not compared with the input; add --source {meta['input']}")
    return report


def _check_pair(report: AuditReport, index: int, pair: dict[str, Any]) -> None:
    """The pair checks: both sides share their first prompt_len ids, and each trains from prompt_len on."""
    line, k = pair.get("source_line"), pair["prompt_len"]
    sides = {key: (pair[key]["input_ids"], pair[key]["labels"]) for key in ("chosen", "rejected")}
    if not all(isinstance(x, list) for side in sides.values() for x in side):
        return  # the side's own check reports it
    (chosen, _), (rejected, _) = sides.values()
    if not 0 <= k <= min(len(chosen), len(rejected)) or chosen[:k] != rejected[:k]:
        at = next((j for j, (a, b) in enumerate(zip(chosen[:k], rejected[:k], strict=False)) if a != b), None)
        where = (
            f"first differ at id {at}"
            if at is not None
            else f"sides of {len(chosen)} and {len(rejected)} ids"
        )
        report.add("prompt_mismatch", index, line, f"prompt_len {k}, {where}")
    for key, (_, labels) in sides.items():
        first = next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is not None and first != k:
            report.add(
                "trained_in_prompt", index, line, f"{key}: first trained token at {first}, prompt_len {k}"
            )
            break


def _queue(
    report: AuditReport,
    index: int,
    line: Any,
    sample: dict[str, Any],
    pending: list[_Pending],
    stats: StatsAccumulator | None,
) -> list[_Pending]:
    """The per-line checks of one sample; queues it for the batch checks when its ids and labels align."""
    ids, labels = sample["input_ids"], sample["labels"]
    if not isinstance(ids, list) or not isinstance(labels, list):
        report.add("malformed_line", index, line, "input_ids or labels is not a list")
        return pending
    if stats is not None:
        stats.add(index, line, len(ids), len(labels) - labels.count(IGNORE_INDEX))
    if sample.get("len") != len(ids):
        report.add("len_mismatch", index, line, f"len={sample.get('len')!r}, input_ids has {len(ids)}")
    elif len(labels) != len(ids):
        report.add("len_mismatch", index, line, f"labels has {len(labels)}, input_ids has {len(ids)}")
    if len(labels) != len(ids):
        return pending  # nothing token-level can be aligned
    pending.append(_Pending(index, line, ids, labels, sample.get("num_loss_counted_tokens")))
    return pending


def _check_sidecar(
    report: AuditReport, meta: dict[str, Any] | None, tokens: int, trained_tokens: int
) -> None:
    """sidecar_mismatch: the sidecar's written/tokens/trained_tokens against what the file holds."""
    if meta is not None:
        counts = meta.get("counts") or {}
        written = counts.get("samples", counts.get("written"))  # samples: more than lines with --split-turns
        claims = {"written": (written, report.samples)}
        if "tokens" in meta:
            claims["tokens"] = (meta["tokens"], tokens)
        if "trained_tokens" in meta:
            claims["trained_tokens"] = (meta["trained_tokens"], trained_tokens)
        off = [f"{k}: sidecar {a}, file {b}" for k, (a, b) in claims.items() if a is not None and a != b]
        if off and "malformed_line" not in report.counts and "len_mismatch" not in report.counts:
            report.add("sidecar_mismatch", None, None, "; ".join(off))
