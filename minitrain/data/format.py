"""The tokenized-file contract: what `tokenize` writes and what `inspect`, the store and `train` read.

For an output path `OUT.jsonl` the tokenize stage writes three files, each atomically (to a temporary
name in the same directory, renamed into place when complete):

    OUT.jsonl           one JSON object per written sample, in input order:
                          input_ids                list[int]   token ids, length `len`
                          labels                   list[int]   -100 where not trained, else == input_ids[i]
                                                               (aligned, NOT shifted: the model shifts)
                          len                      int         == len(input_ids)
                          num_loss_counted_tokens  int         count of labels != -100
                          source_line              int         1-based line number in the input JSONL
                                                               (row number for Parquet/Arrow/datasets input)
    OUT.meta.json       the sidecar (its keys: `read_sidecar` below): tokenizer, template hash, counts,
                        version
    OUT.rejects.jsonl   one object per dropped or rejected input line:
                          {"line": int, "kind": "dropped"|"rejected", "reason": str, "detail": str}

`read == written + dropped + rejected` holds in the sidecar's counts (input lines; with `--split-turns` a
written line gives several samples, all with its `source_line`, counted in `samples`). The keys of OUT.jsonl
are the ones mini_trainer uses, so its users can switch either way.

A file is of one kind, named by the sidecar's `kind` ("sft" above; a sidecar without `kind` is "sft"), or
"preference" (input lines with `chosen` and `rejected`, see `minitrain.data.preference`). A preference
OUT.jsonl holds one JSON object per written pair, in input order:

    chosen        {"input_ids", "labels", "len", "num_loss_counted_tokens"}   the chosen side, as an SFT
                                                                              sample
    rejected      {"input_ids", "labels", "len", "num_loss_counted_tokens"}   the rejected side
    prompt_len    int   ids shared by both sides:
                        chosen.input_ids[:prompt_len] == rejected.input_ids[:prompt_len], all masked;
                        the first trained label of each side is at index prompt_len
    source_line   int   1-based line number in the input

Its sidecar's counts add `pairs` (== written == samples: one output line per pair); `tokens` and
`trained_tokens` add up both sides. `--max-sample-num-tokens` drops a pair when either side is longer.
Training reads pairs with `iter_pairs`; `check_kind` refuses a file of the wrong kind for the objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from minitrain.errors import UserError

FORMAT_NAME = "minitrain.tokenized"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
KIND_SFT = "sft"
KIND_PREFERENCE = "preference"
SIDE_KEYS = ("chosen", "rejected")


def _stem(out: Path) -> Path:
    return out.with_suffix("") if out.suffix == ".jsonl" else out


def sidecar_path(out: Path) -> Path:
    """`OUT.jsonl` -> `OUT.meta.json`."""
    return _stem(Path(out)).with_name(_stem(Path(out)).name + ".meta.json")


def rejects_path(out: Path) -> Path:
    """`OUT.jsonl` -> `OUT.rejects.jsonl`."""
    return _stem(Path(out)).with_name(_stem(Path(out)).name + ".rejects.jsonl")


def read_sidecar(out: Path) -> dict[str, Any] | None:
    """The sidecar of a tokenized file, or None when there is none (e.g. a file written by mini_trainer).

    Keys written by `tokenize` (version 1): format, format_version, minitrain_version, created,
    input (path, or NAME:split for --dataset), input_format (jsonl, parquet, arrow, save_to_disk, dataset;
    absent before it was added), tokenizer {path, class, vocab_size, bos_token_id, eos_token_id, pad_token_id,
    end_of_turn_token_ids, turn_token_ids (added tokens trained inside a turn: `<think>` ...), fingerprint},
    chat_template_sha256, max_sample_num_tokens, kind ("sft" or "preference"; absent before it was added:
    "sft"), counts {read, written (lines), samples (output lines: more than written with --split-turns),
    pairs (preference files), dropped, rejected, rejected_by_reason {reason: n}}, tokens,
    trained_tokens, reasoning_dropped_by_template {turns, tokens}, chat_template_kwargs_unread {name: lines
    whose chat_template_kwargs give that name, which the template never reads; absent before it was added},
    config (with train_on, split_turns).
    """
    path = sidecar_path(out)
    if not path.exists():
        return None
    try:
        meta = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise UserError(f"{path}: not a valid sidecar ({err})") from None
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not a minitrain tokenize sidecar (format={meta.get('format')!r})")
    return meta


def reasoning_dropped_text(turns: int, tokens: int) -> str:
    """The sidecar's reasoning_dropped_by_template as the summary and `inspect --stats` say it."""
    return f"{turns:,} turn{'s' * (turns != 1)}, {tokens:,} token{'s' * (tokens != 1)}"


def unread_kwargs_text(counts: dict[str, int]) -> str:
    """The sidecar's chat_template_kwargs_unread as the summary and `inspect --stats` say it."""
    return ", ".join(f"{name} ({n:,} line{'s' * (n != 1)})" for name, n in sorted(counts.items()))


def _parse_object(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    """One line of a tokenized file as a JSON object; errors name `FILE:LINE`."""
    try:
        sample = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise UserError(
            f"{path}:{line}: malformed JSON ({err}); fix or delete that line, or re-run `minitrain tokenize`"
        ) from None
    if not isinstance(sample, dict):
        raise UserError(
            f"{path}:{line}: expected a JSON object, got {type(sample).__name__}; fix or delete that line"
        )
    return sample


def parse_sample(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    """One line of a tokenized file, checked for the required keys; errors name `FILE:LINE`."""
    sample = _parse_object(raw, path, line)
    missing = [k for k in ("input_ids", "labels") if k not in sample]
    if missing and all(isinstance(sample.get(k), dict) for k in SIDE_KEYS):
        raise UserError(
            f"{path}:{line}: a preference pair (chosen/rejected), not an SFT sample; this file was tokenized "
            "as preference pairs; train it with --objective dpo"
        )
    if missing:
        raise UserError(
            f"{path}:{line}: not a tokenized sample (missing {', '.join(missing)}); "
            "run `minitrain tokenize` first"
        )
    return sample


def iter_samples(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (1-based line number, sample) from a tokenized JSONL file; blank lines are skipped."""
    return _iter_lines(Path(path), parse_sample)


def _iter_lines(
    path: Path, parse: Callable[[bytes, Path, int], dict[str, Any]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, parse(line)) for every non-blank line of `path`."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield line_no, parse(raw, path, line_no)


def is_preference(meta: dict[str, Any] | None) -> bool:
    """True when a sidecar says its file holds preference pairs (a missing `kind` is "sft")."""
    return (meta or {}).get("kind", KIND_SFT) == KIND_PREFERENCE


def is_pair_file(path: Path, meta: dict[str, Any] | None) -> bool:
    """True for a preference file: its sidecar says so, or (no sidecar: a file written by hand or by another
    tool, or the sidecar not copied along) its first non-blank line holds both sides as objects."""
    if meta is not None:
        return is_preference(meta)
    if not Path(path).is_file():
        return False  # the reader names the missing file
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return False  # the line's own error comes from parse_sample / parse_pair, with FILE:LINE
                return isinstance(first, dict) and all(isinstance(first.get(k), dict) for k in SIDE_KEYS)
    return False


def check_kind(path: Path, meta: dict[str, Any] | None, objective: str) -> None:
    """UserError when the file's kind (`is_pair_file`) does not fit the objective ("sft" or "dpo")."""
    pairs = is_pair_file(path, meta)
    if objective == "sft" and pairs:
        raise UserError(f"{path} was tokenized as preference pairs; train it with --objective dpo")
    if objective != "sft" and not pairs:
        raise UserError(
            f"{path} holds SFT samples; --objective {objective} needs preference pairs "
            "(tokenize prompt/chosen/rejected lines)"
        )


def parse_pair(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    """One line of a preference file, checked for both sides and `prompt_len`; errors name `FILE:LINE`."""
    pair = _parse_object(raw, path, line)
    if "input_ids" in pair:
        raise UserError(
            f"{path}:{line}: an SFT sample, not a preference pair; tokenize prompt/chosen/rejected lines "
            "for --objective dpo"
        )
    for key in SIDE_KEYS:
        side = pair.get(key)
        if not isinstance(side, dict) or not all(k in side for k in ("input_ids", "labels")):
            raise UserError(
                f"{path}:{line}: not a tokenized pair (`{key}` lacks input_ids/labels); "
                "run `minitrain tokenize` on prompt/chosen/rejected lines first"
            )
    if not isinstance(pair.get("prompt_len"), int):
        raise UserError(f"{path}:{line}: not a tokenized pair (no `prompt_len`); re-run `minitrain tokenize`")
    return pair


def iter_pairs(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (1-based line number, pair) from a tokenized preference file; blank lines are skipped."""
    return _iter_lines(Path(path), parse_pair)
