"""Which samples `minitrain inspect` shows: the first n, given indices, a reservoir sample, a grep.

Selection parses only the lines it shows. `-n` and `--index` stop at the last line they need; `--random K`
is reservoir sampling over the raw lines (one pass that splits lines but parses none, O(K) memory,
uniform, reproducible for a `--seed`); `--grep` must decode every sample it passes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.data.format import IGNORE_INDEX, parse_pair, parse_sample
from minitrain.errors import UserError

# ---------------------------------------------------------------------------------------------- reading


def iter_raw(path: Path) -> Iterator[tuple[int, int, bytes]]:
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


def sample_counts(sample: dict[str, Any]) -> tuple[int, int] | None:
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
    pairs: bool = False,
) -> list[SelectedSample]:
    """The samples to show, in file order: the first `n` (default 3), the given `indices`, or `random_k` at
    random.

    `grep` (a predicate on the parsed sample) filters first: `n`/`random_k` then count matching samples
    and `indices` keep only those that match. `pairs`: the file holds preference pairs (one per line).
    """
    path = Path(path)
    parse = parse_pair if pairs else parse_sample

    def parsed(index: int, line: int, raw: bytes) -> SelectedSample:
        return SelectedSample(index, line, parse(raw, path, line))

    def candidates() -> Iterator[SelectedSample]:
        for index, line, raw in iter_raw(path):
            s = parsed(index, line, raw)
            if grep is None or grep(s.sample):
                yield s

    if indices:
        wanted, last, found = set(indices), max(indices), []
        count = 0
        for index, line, raw in iter_raw(path):
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
            stream: Iterator[tuple[int, int, bytes | SelectedSample]] = iter(iter_raw(path))
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


def first_sample(path: Path, pairs: bool = False) -> dict[str, Any]:
    """The first sample (or pair), parsed: a one-line error if the file is empty or not tokenize output."""
    for _, line, raw in iter_raw(path):
        return (parse_pair if pairs else parse_sample)(raw, Path(path), line)
    raise UserError(f"{path}: no samples (empty file); run `minitrain tokenize` first")
