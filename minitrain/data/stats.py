"""The `inspect` stage: pick samples to view, compute `--stats`, run the `--audit` checks on a tokenized file.

Everything streams the tokenized JSONL (format in `minitrain.data.format`) once, front to back:

- Sample selection parses only the lines it shows. `-n` and `--index` stop at the last line they need;
  `--random K` is reservoir sampling over the raw lines (one pass that splits lines but parses none,
  O(K) memory, uniform, reproducible for a `--seed`); `--grep` must decode every sample it passes.
- `--stats` keeps one int64 per sample (its length, for percentiles, the histogram and the packing
  plan) and never a token list: 8 bytes per sample.
- `--audit` checks each sample with numpy on that sample alone, keeps counts and the first few example
  indices per kind of finding, and with `--source` reads the original input in step (samples come in
  input order, so `source_line` only grows).

Trade-off: checks are per sample and mechanical - they prove the file is self-consistent and that what
is trained looks like assistant turns ending in an end-of-turn token, not that the tokenization is the
one a template would give (that is `tokenize`'s own test suite). The audit trusts the sidecar's
`tokenizer.end_of_turn_token_ids`; without a sidecar it takes the tokenizer's EOS plus the usual
end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<|endoftext|>`, `<end_of_turn>`) present in its vocabulary.
"""

from __future__ import annotations

import heapq
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from minitrain.data.format import IGNORE_INDEX, parse_sample, read_sidecar, sidecar_path
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


# Every audit check, in the order the report lists them. `minitrain inspect --help` and the README show these.
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
    seed: int = 0
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

    @property
    def packing(self) -> bool:
        return self.max_tokens_per_gpu is not None and self.batch_size is not None


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


def _ids(sample: dict[str, Any], key: str) -> list[int]:
    value = sample[key]
    if not isinstance(value, list):
        raise TypeError(f"{key} is {type(value).__name__}, not a list")
    return value


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
    seed: int = 0,
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
            if grep is None:
                yield SelectedSample(index, line, {}) if random_k is not None else parsed(index, line, raw)
            else:
                s = parsed(index, line, raw)
                if grep(s.sample):
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
        origin = f"recorded in {sidecar_path(path).name}"
    else:
        name, origin = override, "from --model-name-or-path"
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # transformers raises OSError, ValueError, ... for a missing or broken tokenizer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load tokenizer {name!r} ({origin}): {first[:200]}; pass --model-name-or-path"
        ) from None


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
    """Plan one epoch in the sampler's order (`default_rng([seed, 0]).permutation`) with the data engine's planner."""
    try:
        from minitrain.data.packing import plan_minibatches
    except ImportError as err:
        raise UserError(
            f"packing statistics need minitrain.data.packing ({err}); reinstall minitrain"
        ) from None
    n = int(lengths.size)
    order = np.random.default_rng([seed, 0]).permutation(n)
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
    seed: int = 0,
) -> DatasetStats:
    """Stream the file once and return `--stats`; with a token budget and batch size, also how it packs."""
    path = Path(path)
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
        return raw

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


def audit_sample(
    report: AuditReport,
    index: int,
    sample: dict[str, Any],
    tokenizer: Any,
    vocab: _Vocab,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Run the per-sample checks, adding findings to `report`; returns (input_ids, trained mask) when aligned."""
    line = sample.get("source_line")
    try:
        ids = np.asarray(_ids(sample, "input_ids"), dtype=np.int64)
        labels = np.asarray(_ids(sample, "labels"), dtype=np.int64)
        if ids.ndim != 1 or labels.ndim != 1:
            raise ValueError("nested lists")
    except (TypeError, ValueError, OverflowError) as err:
        report.add("malformed_line", index, line, str(err)[:80])
        return None
    n = ids.size
    if sample.get("len") != n:
        report.add("len_mismatch", index, line, f"len={sample.get('len')!r}, input_ids has {n}")
    if labels.size != n:
        if sample.get("len") == n:
            report.add("len_mismatch", index, line, f"labels has {labels.size}, input_ids has {n}")
        return None  # nothing below can be aligned
    trained = labels != IGNORE_INDEX
    num_trained = int(trained.sum())
    counted = sample.get("num_loss_counted_tokens")
    if counted != num_trained:
        report.add(
            "loss_count_mismatch",
            index,
            line,
            f"num_loss_counted_tokens={counted!r}, labels have {num_trained}",
        )
    wrong = np.flatnonzero(trained & (labels != ids))
    if wrong.size:
        p = int(wrong[0])
        report.add(
            "label_not_input",
            index,
            line,
            f"{wrong.size} position(s), first {p}: label {labels[p]} vs id {ids[p]}",
        )
    outside = np.flatnonzero((ids < 0) | (ids >= vocab.size))
    if outside.size:
        report.add(
            "token_out_of_vocab",
            index,
            line,
            f"id {ids[outside[0]]} at {int(outside[0])} (vocab {vocab.size})",
        )
        ids = np.clip(ids, 0, vocab.size - 1)  # keep the table lookups below in range
    if num_trained == 0:
        report.add("zero_trained", index, line)
        return ids, trained
    bad = np.flatnonzero(trained & vocab.bad_special[ids])
    if bad.size:
        p = int(bad[0])
        report.add(
            "trained_special", index, line, f"{bad.size} token(s), first {_piece(tokenizer, ids[p])} at {p}"
        )
    ends = np.flatnonzero(trained & ~np.append(trained[1:], False))  # last position of each trained span
    unended = ends[~vocab.eot[ids[ends]]]
    if unended.size:
        p = int(unended[0])
        report.add(
            "eot_not_trained",
            index,
            line,
            f"{unended.size} span(s), first ends at {p} with {_piece(tokenizer, ids[p])}",
        )
    return ids, trained


def _check_text(
    report: AuditReport,
    index: int,
    line: int | None,
    ids: np.ndarray,
    trained: np.ndarray,
    source: Any,
    tokenizer: Any,
    vocab: _Vocab,
) -> bool:
    """Compare decoded trained spans with the source line's assistant turns; False when it could not compare."""
    expected = expected_trained_texts(source)
    if expected is None:
        return False
    starts = np.flatnonzero(trained & ~np.insert(trained[:-1], 0, False))
    ends = np.flatnonzero(trained & ~np.append(trained[1:], False)) + 1
    if len(starts) != len(expected):
        report.add(
            "text_mismatch",
            index,
            line,
            f"{len(starts)} trained span(s), {len(expected)} trained turn(s) in the source",
        )
        return True
    for turn, (s, e, want) in enumerate(zip(starts, ends, expected, strict=True)):
        span = ids[s:e].tolist()
        if span and span[-1] in vocab.eot_ids:
            span = span[:-1]  # the end-of-turn token is checked by eot_not_trained
        got = tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # Templates may trim content (Llama-3 `| trim`) and SentencePiece decoders drop a leading space.
        if got.strip() != want.strip():
            report.add(
                "text_mismatch", index, line, f"turn {turn} {_first_difference(want.strip(), got.strip())}"
            )
            return True
    return True


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
    report = AuditReport(path)
    reader = _SourceReader(source) if source is not None else None
    compared = skipped = 0
    tokens = trained_tokens = 0
    try:
        for index, line_no, raw in _iter_raw(path):
            report.samples += 1
            try:
                sample = parse_sample(raw, path, line_no)
            except UserError as err:
                report.add("malformed_line", index, None, str(err).split(": ", 2)[-1][:80])
                continue
            if stats is not None and (counts := _counts(sample)) is not None:
                stats.add(index, sample.get("source_line"), *counts)
            aligned = audit_sample(report, index, sample, tokenizer, vocab)
            if aligned is None:
                continue
            ids, trained = aligned
            line = sample.get("source_line")
            tokens += ids.size
            trained_tokens += int(trained.sum())
            if reader is None:
                continue
            raw_source = reader.read(line) if isinstance(line, int) else None
            if raw_source is None:
                where = (
                    "no source_line"
                    if not isinstance(line, int)
                    else f"source line {line} out of order or past the end"
                )
                report.add("source_unmatched", index, line if isinstance(line, int) else None, where)
                continue
            try:
                source_obj = orjson.loads(raw_source)
            except orjson.JSONDecodeError:
                report.add("source_unmatched", index, line, f"source line {line} is not JSON")
                continue
            if _check_text(report, index, line, ids, trained, source_obj, tokenizer, vocab):
                compared += 1
            else:
                skipped += 1
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
        if acc is None:
            result.stats = compute_stats(
                path,
                max_tokens_per_gpu=config.max_tokens_per_gpu,
                batch_size=config.batch_size,
                nproc=config.nproc,
                seed=config.seed,
            )
        else:  # the audit's pass collected them
            packing = None
            if config.packing:
                packing = packing_stats(
                    acc.length_array(),
                    max_tokens_per_gpu=config.max_tokens_per_gpu or 0,
                    batch_size=config.batch_size or 0,
                    nproc=config.nproc or 1,
                    seed=config.seed,
                )
            result.stats = acc.finish(path, packing)
    return result
