"""`minitrain inspect --stats`: lengths, trained fraction, histogram, the longest samples, and packing.

One int64 per sample is kept (its length, for percentiles, the histogram and the packing plan), never a
token list: 8 bytes per sample. Packing replays the training planner on one epoch in sampler order.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minitrain.data.format import parse_pair, parse_sample
from minitrain.errors import UserError
from minitrain.inspect.select import first_sample, iter_raw, sample_counts

PERCENTILES = (50, 90, 95, 99, 100)
HISTOGRAM_BINS = 12
NUM_LONGEST = 5
NUM_EXAMPLES = 5


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
    # from the sidecar: {"turns", "tokens"} of reasoning the chat template did not render; None without one
    reasoning_dropped: dict[str, int] | None = None
    # from the sidecar: {name: lines} of chat_template_kwargs names the template never reads
    template_kwargs_unread: dict[str, int] | None = None


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
        for index, line, raw in iter_raw(path):
            counts = sample_counts(sample := parse_sample(raw, path, line))
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


# ------------------------------------------------------------------------------------------ preference pairs


@dataclass(frozen=True)
class SideStats:
    """Lengths of one part of every pair (the shared prompt, the chosen side or the rejected side)."""

    tokens: int
    trained_tokens: int
    mean_length: float
    percentiles: dict[int, int]


@dataclass(frozen=True)
class PairStats:
    """The numbers `--stats` prints for a preference file (packing is planned for SFT samples only)."""

    path: Path
    pairs: int
    prompt: SideStats
    chosen: SideStats
    rejected: SideStats
    margin_mean: float  # mean of len(chosen) - len(rejected), tokens
    margin_percentiles: dict[int, int]  # of the same difference (negative: chosen shorter)
    chosen_longer: int  # pairs whose chosen side has more trained tokens than the rejected one
    rejected_longer: int
    zero_trained: int  # pairs with a side that trains nothing
    reasoning_dropped: dict[str, int] | None = None  # from the sidecar, as DatasetStats'
    template_kwargs_unread: dict[str, int] | None = None  # from the sidecar, as DatasetStats'


def _side_stats(lengths: np.ndarray, trained: np.ndarray) -> SideStats:
    pct = {p: int(np.percentile(lengths, p, method="higher")) for p in PERCENTILES} if lengths.size else {}
    return SideStats(
        int(lengths.sum()), int(trained.sum()), float(lengths.mean()) if lengths.size else 0.0, pct
    )


def compute_pair_stats(path: Path) -> PairStats:
    """`--stats` of a preference file: prompt, chosen and rejected lengths, trained tokens per side, margins.

    Keeps five int64 per pair (prompt, chosen, rejected lengths and the two trained counts).
    """
    path = Path(path)
    first_sample(path, pairs=True)
    cols = [array("q") for _ in range(5)]  # prompt_len, len c, len r, trained c, trained r
    for _, line, raw in iter_raw(path):
        pair = parse_pair(raw, path, line)
        counts = [sample_counts(pair[key]) for key in ("chosen", "rejected")]
        if counts[0] is None or counts[1] is None:
            raise UserError(
                f"{path}:{line}: input_ids or labels is not a list; run `minitrain inspect --audit`"
            )
        (nc, tc), (nr, tr) = counts
        for col, value in zip(cols, (pair["prompt_len"], nc, nr, tc, tr), strict=True):
            col.append(value)
    prompt, nc, nr, tc, tr = (
        np.frombuffer(c, dtype=np.int64) if len(c) else np.zeros(0, np.int64) for c in cols
    )
    margin = nc - nr
    return PairStats(
        path=path,
        pairs=int(prompt.size),
        prompt=_side_stats(prompt, np.zeros_like(prompt)),
        chosen=_side_stats(nc, tc),
        rejected=_side_stats(nr, tr),
        margin_mean=float(margin.mean()) if margin.size else 0.0,
        margin_percentiles={p: int(np.percentile(margin, p, method="higher")) for p in PERCENTILES}
        if margin.size
        else {},
        chosen_longer=int((tc > tr).sum()),
        rejected_longer=int((tr > tc).sum()),
        zero_trained=int(((tc == 0) | (tr == 0)).sum()),
    )
