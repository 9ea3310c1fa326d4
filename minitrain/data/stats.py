"""The `inspect` stage: pick samples to view, compute `--stats`, run the `--audit` checks on a tokenized file.

Everything streams the tokenized JSONL (format in `minitrain.data.format`) once, front to back:

- Sample selection parses only the lines it shows. `-n` and `--index` stop at the last line they need;
  `--random K` is reservoir sampling over the raw lines (one pass that splits lines but parses none,
  O(K) memory, uniform, reproducible for a `--seed`); `--grep` must decode every sample it passes.
- `--stats` keeps one int64 per sample (its length, for percentiles, the histogram and the packing
  plan) and never a token list: 8 bytes per sample.
- `--audit` checks `BATCH_SAMPLES` samples at a time with numpy on the concatenation of their tokens
  (per-sample numpy calls would cost more than the JSON parsing), keeps counts and the first few
  example indices per kind of finding, and with `--source` reads the original input in step (samples
  come in input order, so `source_line` only grows) and decodes a batch's trained spans in one call.
  `--audit --stats` is one pass.

Trade-off: checks are per sample and mechanical - they prove the file is self-consistent and that what
is trained looks like assistant turns ending in an end-of-turn token (and, with `--source`, reads as the
assistant contents), not that the tokenization is the one a template would give (that is `tokenize`'s
own test suite). The audit trusts the sidecar's `tokenizer.end_of_turn_token_ids` (plus EOS); without a
sidecar it takes EOS and whichever of `KNOWN_END_OF_TURN` the vocabulary has.
"""

from __future__ import annotations

import heapq
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from minitrain.data.format import IGNORE_INDEX, parse_sample, read_sidecar, sidecar_path
from minitrain.data.tokenizer import load_tokenizer as load_named_tokenizer
from minitrain.errors import UserError

PERCENTILES = (50, 90, 95, 99, 100)
HISTOGRAM_BINS = 12
NUM_LONGEST = 5
NUM_EXAMPLES = 5
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eot|>")


@dataclass(frozen=True)
class Check:
    """One kind of audit finding."""

    severity: str  # "error" (exit 1) or "warning"
    description: str


# Every audit check, in the order the report lists them. `minitrain inspect --help` and docs/formats.md show these.
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
        "error", "--source: the decoded trained spans differ from the assistant contents (each + end-of-turn)"
    ),
    "source_unmatched": Check(
        "error", "--source: no source_line, or it goes backwards, or past the end, or that line is unreadable"
    ),
    "sidecar_mismatch": Check(
        "error", "the sidecar's counts (written, tokens, trained_tokens) disagree with the file"
    ),
}


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    """What `minitrain inspect` was asked to do, validated once."""

    path: Path
    model_name_or_path: str | None = None
    n: int | None = None
    indices: tuple[int, ...] = ()
    random_k: int | None = None
    seed: int = 42  # train's default, so --stats packs in the order training would
    grep: str | None = None
    tokens: bool = False
    stats: bool = False
    audit: bool = False
    source: Path | None = None
    max_tokens_per_gpu: int | None = None
    batch_size: int | None = None
    nproc: int | None = None

    def __post_init__(self) -> None:
        chosen = [
            f
            for f, v in (("-n", self.n), ("--index", self.indices or None), ("--random", self.random_k))
            if v is not None
        ]
        if len(chosen) > 1:
            raise UserError(f"{' and '.join(chosen)} choose samples in different ways; pass only one of them")
        if self.n is not None and self.n < 1:
            raise UserError(f"-n {self.n}: pass a number of samples >= 1")
        if self.random_k is not None and self.random_k < 1:
            raise UserError(f"--random {self.random_k}: pass a number of samples >= 1")
        if any(i < 0 for i in self.indices):
            raise UserError(f"--index {min(self.indices)}: sample indices start at 0")
        if self.source is not None and not self.audit:
            raise UserError("--source is only used by --audit; add --audit")
        if self.source is not None and not Path(self.source).is_file():
            raise UserError(f"--source {self.source}: no such file")
        packing = {
            "--max-tokens-per-gpu": self.max_tokens_per_gpu,
            "--batch-size": self.batch_size,
            "--nproc": self.nproc,
        }
        given = [k for k, v in packing.items() if v is not None]
        if given and not self.stats:
            raise UserError(f"{', '.join(given)} describe packing for --stats; add --stats")
        if given and (self.max_tokens_per_gpu is None or self.batch_size is None):
            raise UserError(
                "packing statistics need both --max-tokens-per-gpu and --batch-size (--nproc defaults to 1)"
            )
        for k, v in packing.items():
            if v is not None and v < 1:
                raise UserError(f"{k} {v}: must be >= 1")

    @property
    def shows_samples(self) -> bool:
        """The sample view runs unless only --stats/--audit were asked for."""
        explicit = (
            self.n is not None
            or self.indices
            or self.random_k is not None
            or self.grep is not None
            or self.tokens
        )
        return bool(explicit) or not (self.stats or self.audit)


# ---------------------------------------------------------------------------------------------- reading


def _iter_raw(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(sample index, 1-based line number, raw line) for every non-blank line, without parsing."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    index = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield index, line_no, raw
                index += 1


def _counts(sample: dict[str, Any]) -> tuple[int, int] | None:
    """(tokens, trained tokens) of a parsed sample, or None when input_ids/labels are not lists."""
    ids, labels = sample.get("input_ids"), sample.get("labels")
    if not isinstance(ids, list) or not isinstance(labels, list):
        return None
    return len(ids), len(labels) - labels.count(IGNORE_INDEX)


@dataclass(frozen=True)
class SelectedSample:
    """A sample chosen for the view: its 0-based index among the file's samples and its parsed line."""

    index: int
    line: int
    sample: dict[str, Any]


def select_samples(
    path: Path,
    *,
    n: int | None = None,
    indices: tuple[int, ...] = (),
    random_k: int | None = None,
    seed: int = 42,
    grep: Callable[[dict[str, Any]], bool] | None = None,
) -> list[SelectedSample]:
    """The samples to show, in file order: the first `n` (default 3), the given `indices`, or `random_k` at random.

    `grep` (a predicate on the parsed sample) filters first: `n`/`random_k` then count matching samples
    and `indices` keep only those that match.
    """
    path = Path(path)

    def parsed(index: int, line: int, raw: bytes) -> SelectedSample:
        return SelectedSample(index, line, parse_sample(raw, path, line))

    def candidates() -> Iterator[SelectedSample]:
        for index, line, raw in _iter_raw(path):
            s = parsed(index, line, raw)
            if grep is None or grep(s.sample):
                yield s

    if indices:
        wanted, last, found = set(indices), max(indices), []
        count = 0
        for index, line, raw in _iter_raw(path):
            count = index + 1
            if index in wanted:
                s = parsed(index, line, raw)
                if grep is None or grep(s.sample):
                    found.append(s)
            if index >= last:
                break
        if last >= count:
            raise UserError(f"--index {last}: {path} has only {count} samples (indices start at 0)")
        return found

    if random_k is not None:
        # Reservoir sampling (algorithm R): one pass, k kept, each sample kept with probability k / seen.
        rng = random.Random(seed)
        reservoir: list[tuple[int, int, bytes | SelectedSample]] = []
        if grep is None:
            stream: Iterator[tuple[int, int, bytes | SelectedSample]] = iter(_iter_raw(path))
        else:
            stream = ((s.index, s.line, s) for s in candidates())
        for seen, item in enumerate(stream):
            if seen < random_k:
                reservoir.append(item)
            else:
                j = rng.randrange(seen + 1)
                if j < random_k:
                    reservoir[j] = item
        reservoir.sort(key=lambda t: t[0])
        return [it if isinstance(it, SelectedSample) else parsed(i, ln, it) for i, ln, it in reservoir]

    out: list[SelectedSample] = []
    for s in candidates():
        out.append(s)
        if len(out) >= (n or 3):
            break
    return out


def first_sample(path: Path) -> dict[str, Any]:
    """The first sample, parsed: a one-line error if the file is empty or not tokenize output."""
    for _, line, raw in _iter_raw(path):
        return parse_sample(raw, Path(path), line)
    raise UserError(f"{path}: no samples (empty file); run `minitrain tokenize` first")


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path, meta: dict[str, Any] | None, override: str | None) -> Any:
    """The tokenizer named by `--model-name-or-path`, else the one recorded in the sidecar; one-line errors."""
    if override is None:
        recorded = ((meta or {}).get("tokenizer") or {}).get("path")
        if not recorded:
            where = sidecar_path(path)
            raise UserError(
                f"{path}: no tokenizer recorded ({where.name} missing); pass --model-name-or-path"
            )
        name = str(recorded)
        candidate = Path(name)
        # A relative path recorded by tokenize is relative to where it ran; also try beside the sidecar.
        if (
            not candidate.exists()
            and not candidate.is_absolute()
            and (Path(path).parent / candidate).exists()
        ):
            name = str(Path(path).parent / candidate)
        elif not candidate.exists() and name.startswith((".", "/", "~")):  # a path, not a hub id
            raise UserError(
                f"tokenizer {name!r} recorded in {sidecar_path(path).name} does not exist from here"
                f"{' (a path relative to where tokenize ran)' if not candidate.is_absolute() else ''}; "
                "pass --model-name-or-path"
            )
        return load_named_tokenizer(name, f"the tokenizer recorded in {sidecar_path(path).name},")
    return load_named_tokenizer(override)


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token: the named ones (BOS, EOS, PAD ...) and added tokens marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return frozenset(int(i) for i in ids if i is not None)


def end_of_turn_ids(tokenizer: Any, meta: dict[str, Any] | None) -> frozenset[int]:
    """End-of-turn ids: the sidecar's list (+ EOS), else EOS and the usual end-of-turn tokens in the vocabulary."""
    ids: set[int] = set()
    recorded = ((meta or {}).get("tokenizer") or {}).get("end_of_turn_token_ids")
    if recorded:
        ids.update(int(i) for i in recorded)
    else:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in KNOWN_END_OF_TURN if t in vocab)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class PackingStats:
    """How one epoch (sampler order for `seed`) packs with the data engine's planner."""

    max_tokens_per_gpu: int
    batch_size: int
    nproc: int
    seed: int
    steps: int
    minibatches_mean: float
    minibatches_min: int
    minibatches_max: int
    utilization: float  # tokens placed / (minibatches x nproc x max_tokens_per_gpu), over the epoch
    too_long: int  # samples longer than max_tokens_per_gpu: the planner leaves them out


@dataclass(frozen=True)
class DatasetStats:
    """The numbers `--stats` prints."""

    path: Path
    samples: int
    tokens: int
    trained_tokens: int
    mean_length: float
    percentiles: dict[int, int]
    histogram: list[tuple[int, int, int]]  # (lowest length, highest length, samples) per bin
    zero_trained: int
    zero_trained_examples: list[int]
    longest: list[tuple[int, int, int | None, int]]  # (tokens, index, source line, trained), longest first
    packing: PackingStats | None = None


@dataclass
class StatsAccumulator:
    """Running totals for `--stats`; one int64 per sample (its length), no token lists."""

    lengths: array = field(default_factory=lambda: array("q"))
    tokens: int = 0
    trained_tokens: int = 0
    zero_trained: int = 0
    zero_trained_examples: list[int] = field(default_factory=list)
    _longest: list[tuple[int, int, int, int | None]] = field(
        default_factory=list
    )  # min-heap (len, -index, trained, line)

    def add(self, index: int, source_line: int | None, num_tokens: int, num_trained: int) -> None:
        self.lengths.append(num_tokens)
        self.tokens += num_tokens
        self.trained_tokens += num_trained
        if num_trained == 0:
            self.zero_trained += 1
            if len(self.zero_trained_examples) < NUM_EXAMPLES:
                self.zero_trained_examples.append(index)
        item = (num_tokens, -index, num_trained, source_line)
        if len(self._longest) < NUM_LONGEST:
            heapq.heappush(self._longest, item)
        elif item > self._longest[0]:
            heapq.heapreplace(self._longest, item)

    def finish(self, path: Path, packing: PackingStats | None = None) -> DatasetStats:
        lengths = (
            np.frombuffer(self.lengths, dtype=np.int64) if len(self.lengths) else np.zeros(0, dtype=np.int64)
        )
        percentiles: dict[int, int] = {}
        histogram: list[tuple[int, int, int]] = []
        if lengths.size:
            for q in PERCENTILES:
                percentiles[q] = int(np.percentile(lengths, q, method="higher"))
            lo, hi = int(lengths.min()), int(lengths.max())
            width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))
            counts = np.bincount((lengths - lo) // width, minlength=-(-(hi - lo + 1) // width))
            histogram = [(lo + b * width, lo + (b + 1) * width - 1, int(c)) for b, c in enumerate(counts)]
        longest = [(n, -neg, line, t) for n, neg, t, line in sorted(self._longest, reverse=True)]
        return DatasetStats(
            path=Path(path),
            samples=len(self.lengths),
            tokens=self.tokens,
            trained_tokens=self.trained_tokens,
            mean_length=float(lengths.mean()) if lengths.size else 0.0,
            percentiles=percentiles,
            histogram=histogram,
            zero_trained=self.zero_trained,
            zero_trained_examples=list(self.zero_trained_examples),
            longest=longest,
            packing=packing,
        )

    def length_array(self) -> np.ndarray:
        return np.frombuffer(self.lengths, dtype=np.int64)


def packing_stats(
    lengths: np.ndarray, *, max_tokens_per_gpu: int, batch_size: int, nproc: int, seed: int
) -> PackingStats:
    """Plan epoch 0 in the training sampler's order for `seed` with the data engine's planner."""
    from minitrain.data.packing import plan_minibatches
    from minitrain.data.sampler import epoch_permutation

    n = int(lengths.size)
    order = epoch_permutation(n, seed, 0)  # what `train` visits first for this seed
    per_step: list[int] = []
    placed = 0
    for start in range(0, n, batch_size):
        batch = lengths[order[start : start + batch_size]]
        plan = plan_minibatches([int(x) for x in batch], max_tokens_per_gpu, nproc)
        per_step.append(len(plan))
        placed += sum(int(batch[i]) for minibatch in plan for rank in minibatch for i in rank)
    total_minibatches = sum(per_step)
    return PackingStats(
        max_tokens_per_gpu=max_tokens_per_gpu,
        batch_size=batch_size,
        nproc=nproc,
        seed=seed,
        steps=len(per_step),
        minibatches_mean=total_minibatches / len(per_step) if per_step else 0.0,
        minibatches_min=min(per_step, default=0),
        minibatches_max=max(per_step, default=0),
        utilization=placed / (total_minibatches * nproc * max_tokens_per_gpu) if total_minibatches else 0.0,
        too_long=int((lengths > max_tokens_per_gpu).sum()),
    )


def compute_stats(
    path: Path,
    *,
    max_tokens_per_gpu: int | None = None,
    batch_size: int | None = None,
    nproc: int | None = None,
    seed: int = 42,
    collected: StatsAccumulator | None = None,
) -> DatasetStats:
    """`--stats` of the file; with a token budget and batch size, also how it packs.

    The file is streamed once, unless `collected` holds what an `audit_file(..., stats=)` pass gathered.
    """
    path = Path(path)
    acc = collected
    if acc is None:
        first_sample(path)
        acc = StatsAccumulator()
        for index, line, raw in _iter_raw(path):
            counts = _counts(sample := parse_sample(raw, path, line))
            if counts is None:
                raise UserError(
                    f"{path}:{line}: input_ids or labels is not a list; run `minitrain inspect --audit`"
                )
            acc.add(index, sample.get("source_line"), *counts)
    packing = None
    if max_tokens_per_gpu is not None and batch_size is not None:
        packing = packing_stats(
            acc.length_array(),
            max_tokens_per_gpu=max_tokens_per_gpu,
            batch_size=batch_size,
            nproc=nproc or 1,
            seed=seed,
        )
    return acc.finish(path, packing)


# ---------------------------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class Example:
    """Where a finding was seen: sample index, its source line, and a short detail."""

    index: int | None  # None: a finding about the whole file
    source_line: int | None
    detail: str


@dataclass
class AuditReport:
    """Findings of `--audit`: samples per kind (a sample counts once per kind) and the first examples of each."""

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


def expected_trained_texts(source: Any) -> list[str] | None:
    """What `tokenize` trains for one input line, one string per trained turn (end-of-turn excluded).

    None when the line cannot be compared as text: assistant turns with tool calls (the template
    renders those its own way) or a shape this check does not know.
    """
    if not isinstance(source, dict):
        return None
    messages = source.get("messages")
    if isinstance(messages, list):
        out: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                return None
            if m.get("role") == "pretrain":
                out.append(str(m.get("content") or ""))
            elif m.get("role") == "assistant" and m.get("train", True) is not False:
                if m.get("tool_calls"):
                    return None
                out.append(str(m.get("content") or ""))
        return out
    if isinstance(source.get("prompt"), str) and isinstance(source.get("generation"), str):
        return [source["generation"]]
    return None


class _SourceReader:
    """Reads the original input JSONL forward only, to the line a sample names."""

    def __init__(self, path: Path) -> None:
        self._f = Path(path).open("rb")  # noqa: SIM115 - closed by audit_file's finally
        self.line_no = 0

    def read(self, line: int) -> bytes | None:
        """Raw text of 1-based `line`, or None if it was already passed or lies past the end."""
        if line <= self.line_no:
            return None
        raw = b""
        while self.line_no < line:
            raw = self._f.readline()
            if not raw:
                return None
            self.line_no += 1
        return raw.removeprefix(b"\xef\xbb\xbf") if line == 1 else raw  # tokenize accepts a UTF-8 BOM

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
    special = special_token_ids(tokenizer)
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
    sources: dict[int, Any],
    decode_batch: Callable[[list[list[int]]], list[str]],
    vocab: _Vocab,
) -> tuple[int, int]:
    """Compare decoded trained spans with the source lines (`sources[b]` for sample b of the batch).

    Returns (compared, not comparable). The spans of the whole batch are decoded in one call.
    """
    first_span = np.searchsorted(checked.span_starts, checked.starts)  # [samples + 1] span range per sample
    todo: list[tuple[int, int, str]] = []  # (sample in batch, turn, expected text)
    spans: list[list[int]] = []
    compared = skipped = 0
    for b, source in sources.items():
        expected = expected_trained_texts(source)
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
    for (b, turn, want), got in zip(todo, decode_batch(spans) if spans else [], strict=True):
        # Templates may trim content (Llama-3 `| trim`) and SentencePiece decoders drop a leading space.
        if b not in reported and got.strip() != want.strip():
            reported.add(b)
            msg = f"turn {turn} {_first_difference(want.strip(), got.strip())}"
            report.add("text_mismatch", batch[b].index, batch[b].line, msg)
    return compared, skipped


BATCH_SAMPLES = 256  # samples checked together: amortises numpy's per-call cost, bounds memory


def audit_file(
    path: Path,
    tokenizer: Any,
    meta: dict[str, Any] | None,
    *,
    source: Path | None = None,
    stats: StatsAccumulator | None = None,
) -> AuditReport:
    """Check every sample of a tokenized file (see `CHECKS`) in one streaming pass.

    With `stats`, the same pass also feeds `--stats` (every sample whose input_ids and labels are lists).
    """
    path = Path(path)
    first_sample(path)  # not tokenize output at all -> one-line error, not a finding per line
    vocab = _vocab_tables(tokenizer, meta)
    decode_batch = _batch_decoder(tokenizer)
    report = AuditReport(path)
    reader = _SourceReader(source) if source is not None else None
    compared = skipped = tokens = trained_tokens = 0

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
        sources: dict[int, Any] = {}
        for b, p in enumerate(batch):
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
                sources[b] = orjson.loads(raw_source)
            except orjson.JSONDecodeError:
                report.add("source_unmatched", p.index, p.line, f"source line {p.line} is not JSON")
        done, not_comparable = _check_texts(report, batch, checked, sources, decode_batch, vocab)
        compared += done
        skipped += not_comparable

    pending: list[_Pending] = []
    try:
        for index, line_no, raw in _iter_raw(path):
            report.samples += 1
            try:
                sample = parse_sample(raw, path, line_no)
            except UserError as err:
                report.add("malformed_line", index, None, str(err).split(": ", 2)[-1][:80])
                continue
            line = sample.get("source_line")
            ids, labels = sample["input_ids"], sample["labels"]
            if not isinstance(ids, list) or not isinstance(labels, list):
                report.add("malformed_line", index, line, "input_ids or labels is not a list")
                continue
            if stats is not None:
                stats.add(index, line, len(ids), len(labels) - labels.count(IGNORE_INDEX))
            if sample.get("len") != len(ids):
                report.add(
                    "len_mismatch", index, line, f"len={sample.get('len')!r}, input_ids has {len(ids)}"
                )
            elif len(labels) != len(ids):
                report.add("len_mismatch", index, line, f"labels has {len(labels)}, input_ids has {len(ids)}")
            if len(labels) != len(ids):
                continue  # nothing token-level can be aligned
            pending.append(_Pending(index, line, ids, labels, sample.get("num_loss_counted_tokens")))
            if len(pending) == BATCH_SAMPLES:
                check(pending)
                pending = []
        if pending:
            check(pending)
    finally:
        if reader is not None:
            reader.close()
    if meta is not None:
        written = (meta.get("counts") or {}).get("written")
        claims = {"written": (written, report.samples)}
        if "tokens" in meta:
            claims["tokens"] = (meta["tokens"], tokens)
        if "trained_tokens" in meta:
            claims["trained_tokens"] = (meta["trained_tokens"], trained_tokens)
        off = [f"{k}: sidecar {a}, file {b}" for k, (a, b) in claims.items() if a is not None and a != b]
        if off and "malformed_line" not in report.counts and "len_mismatch" not in report.counts:
            report.add("sidecar_mismatch", None, None, "; ".join(off))
    if reader is not None:
        report.notes.append(
            f"--source {source}: {compared:,} samples compared with their source line"
            + (f", {skipped:,} not comparable as text (tool calls)" if skipped else "")
        )
    elif (meta or {}).get("input"):
        report.notes.append(f"trained text not compared with the input; add --source {meta['input']}")
    return report


# ---------------------------------------------------------------------------------------------- the stage


@dataclass
class InspectResult:
    """What `inspect_file` found; the CLI renders it."""

    config: InspectConfig
    meta: dict[str, Any] | None
    tokenizer: Any | None
    special_ids: frozenset[int]
    samples: list[SelectedSample] | None = None
    stats: DatasetStats | None = None
    audit: AuditReport | None = None


def inspect_file(config: InspectConfig) -> InspectResult:
    """Run what the config asks for: the sample view's selection, `--stats`, `--audit`."""
    path = Path(config.path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the OUT.jsonl written by `minitrain tokenize`")
    meta = read_sidecar(path)
    first_sample(path)
    tokenizer = None
    special: frozenset[int] = frozenset()
    if config.shows_samples or config.audit:
        tokenizer = load_tokenizer(path, meta, config.model_name_or_path)
        special = special_token_ids(tokenizer)
    result = InspectResult(config=config, meta=meta, tokenizer=tokenizer, special_ids=special)
    if config.shows_samples:
        grep = None
        if config.grep is not None:
            needle = config.grep

            def grep(sample: dict[str, Any]) -> bool:
                text = tokenizer.decode(
                    sample["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                return needle in text

        result.samples = select_samples(
            path, n=config.n, indices=config.indices, random_k=config.random_k, seed=config.seed, grep=grep
        )
    acc = StatsAccumulator() if config.stats and config.audit else None
    if config.audit:
        result.audit = audit_file(path, tokenizer, meta, source=config.source, stats=acc)
    if config.stats:
        result.stats = compute_stats(
            path,
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            batch_size=config.batch_size,
            nproc=config.nproc,
            seed=config.seed,
            collected=acc,  # with --audit, its pass collected them
        )
    return result
