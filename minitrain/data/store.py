"""Reading a tokenized file: a memory-mapped binary cache built once beside the JSONL.

Owns the cache format and its life cycle. `TokenStore.open(OUT.jsonl)` converts the JSONL (the format
in `minitrain.data.format`) on first use into one file, `OUT.mtcache/store.bin`, and memory-maps it:

    [0, 4096)          header: b"MTSTORE1" + uint32 JSON length + JSON {version, fingerprint, n,
                       num_tokens, max_token_id, layout {name: [byte offset, dtype, count]}}
    tokens             int32 [T]   input_ids of every sample, concatenated (T = total tokens)
    labels             int32 [T]   labels, aligned with tokens (-100 where masked, NOT shifted)
    offsets            int64 [N+1] sample i is tokens[offsets[i]:offsets[i+1]]
    lengths            int64 [N]   tokens per sample
    num_loss_counted   int64 [N]   labels != -100 per sample
    num_trained        int64 [N]   labels != -100 after the in-sample shift (the first label never trains)
    source_lines       int64 [N]   1-based JSONL line of each sample

A preference file (`--objective dpo`, pairs from `format.iter_pairs`) is stored the same way with pair i
flattened into samples 2i (chosen) and 2i+1 (rejected), both with the pair's source line; its header says
`"kind": "preference"` and `num_pairs` is N / 2. Training samples pair indices and expands them.

The cache is rebuilt when the JSONL's fingerprint changes (size, mtime_ns and a BLAKE2 hash of its first
and last 1 MiB). It is built by one process while the others wait on `OUT.mtcache/build.lock`
(`fcntl.flock`), written to a temporary file and renamed into place, so a crash never leaves a
half-written cache and a reader never sees one. When the JSONL's folder is not writable the cache goes
to `$MINITRAIN_CACHE` (default `$XDG_CACHE_HOME/minitrain` or `~/.cache/minitrain`), keyed by a hash
of the JSONL's absolute path.

Trade-off: a second copy of the data on disk (8 bytes per token, 40 per sample) buys a process memory
that does not grow with the data (every array is a read-only memory map; the page cache holding what
is read is shared by all ranks of a node) and start-up in milliseconds once the cache exists. The
fingerprint hashes the ends of the file rather than all of it: an edit in the middle that keeps size
and mtime is not detected, but hashing a 0.5 GB file in full took 1.5-1.9 s at every start here
against 2-10 ms (benchmarks/bench_store.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from minitrain.atomic import atomic_write
from minitrain.data.format import (
    IGNORE_INDEX,
    KIND_PREFERENCE,
    KIND_SFT,
    SIDE_KEYS,
    check_kind,
    iter_pairs,
    iter_samples,
    read_sidecar,
)
from minitrain.errors import UserError

CACHE_VERSION = 3
MAGIC = b"MTSTORE1"
HEADER_BYTES = 4096
HASH_SPAN = 1 << 20  # bytes hashed at each end of the JSONL for the fingerprint
FLUSH_TOKENS = 1 << 20  # tokens buffered in memory while building (4 MiB per array)


def fingerprint(jsonl_path: Path) -> dict[str, Any]:
    """Identity of a JSONL file's content, cheap to compute: size, mtime_ns, hash of head and tail."""
    st = os.stat(jsonl_path)
    h = hashlib.blake2b(digest_size=16)
    with open(jsonl_path, "rb") as f:
        h.update(f.read(HASH_SPAN))
        if st.st_size > HASH_SPAN:
            f.seek(max(HASH_SPAN, st.st_size - HASH_SPAN))
            h.update(f.read(HASH_SPAN))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_blake2b": h.hexdigest()}


def default_cache_root() -> Path:
    """Where caches go when the JSONL's own folder is read-only."""
    env = os.environ.get("MINITRAIN_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minitrain"


def cache_dirs(jsonl_path: Path) -> tuple[Path, Path]:
    """(`OUT.mtcache` beside the JSONL, the per-path fallback folder under the cache root)."""
    jsonl_path = Path(jsonl_path).resolve()
    beside = jsonl_path.with_name(jsonl_path.name.removesuffix(".jsonl") + ".mtcache")
    key = hashlib.blake2b(str(jsonl_path).encode(), digest_size=8).hexdigest()
    return beside, default_cache_root() / f"{jsonl_path.stem}-{key}.mtcache"


def _writable(cache_dir: Path) -> bool:
    if cache_dir.is_dir():
        return os.access(cache_dir, os.W_OK)
    return not cache_dir.exists() and os.access(cache_dir.parent, os.W_OK)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_header(cache_file: Path) -> dict[str, Any] | None:
    try:
        with open(cache_file, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        return None
    size = int.from_bytes(head[8:12], "little")
    try:
        header = orjson.loads(head[12 : 12 + size])
    except orjson.JSONDecodeError:
        return None
    return header if header.get("version") == CACHE_VERSION else None


class _Builder:
    """Streams JSONL samples into the cache file with bounded memory (labels go to a side file first)."""

    def __init__(self, jsonl_path: Path, out, side) -> None:
        self.path, self.out, self.side = jsonl_path, out, side
        self.ids = array("i")
        self.labels = array("i")
        self.buf_lines: list[int] = []  # source lines of the samples in the buffer (for error messages)
        self.buf_lens: list[int] = []
        self.lengths = array("q")
        self.num_loss = array("q")
        self.num_trained = array("q")
        self.lines = array("q")
        self.max_token_id = -1
        self.num_tokens = 0

    def add(self, line: int, sample: dict[str, Any]) -> None:
        ids, labels = sample["input_ids"], sample["labels"]
        if not isinstance(ids, list) or not isinstance(labels, list):
            raise UserError(f"{self.path}:{line}: input_ids and labels must be lists of integers")
        n = len(ids)
        if n == 0:
            raise UserError(f"{self.path}:{line}: empty sample (no input_ids); re-run `minitrain tokenize`")
        if len(labels) != n:
            raise UserError(
                f"{self.path}:{line}: {n} input_ids but {len(labels)} labels; the file is corrupt"
            )
        if "len" in sample and sample["len"] != n:
            raise UserError(f"{self.path}:{line}: len={sample['len']} but {n} input_ids; the file is corrupt")
        try:
            self.ids.extend(ids)
            self.labels.extend(labels)
        except (TypeError, OverflowError):
            raise UserError(f"{self.path}:{line}: token ids and labels must be 32-bit integers") from None
        self.buf_lines.append(line)
        self.buf_lens.append(n)
        self.lines.append(line)
        if len(self.ids) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.buf_lens:
            return
        ids = np.frombuffer(self.ids, dtype=np.int32)
        labels = np.frombuffer(self.labels, dtype=np.int32)
        bad = (ids < 0) | ((labels != IGNORE_INDEX) & (labels < 0))
        if bad.any():
            sample = int(np.searchsorted(np.cumsum(self.buf_lens), int(np.argmax(bad)), side="right"))
            raise UserError(
                f"{self.path}:{self.buf_lines[sample]}: negative token id or label "
                "(only -100 may be negative)"
            )
        trained = (labels != IGNORE_INDEX).astype(np.int64)
        ends = np.cumsum(self.buf_lens)
        starts = np.concatenate([[0], ends[:-1]])
        per_sample = np.add.reduceat(trained, starts)
        self.num_loss.extend(per_sample.tolist())
        self.num_trained.extend((per_sample - trained[starts]).tolist())
        self.lengths.extend(self.buf_lens)
        self.max_token_id = max(self.max_token_id, int(ids.max()))
        self.num_tokens += len(ids)
        self.out.write(ids.tobytes())
        self.side.write(labels.tobytes())
        self.ids, self.labels = array("i"), array("i")
        self.buf_lines, self.buf_lens = [], []


def _flat_samples(jsonl_path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, sample) of an SFT file, or of a preference file with each pair as chosen then rejected."""
    if kind == KIND_SFT:
        yield from iter_samples(jsonl_path)
        return
    for line, pair in iter_pairs(jsonl_path):
        for side in SIDE_KEYS:
            yield line, pair[side]


def _build(jsonl_path: Path, cache_file: Path, fp: dict[str, Any], kind: str = KIND_SFT) -> None:
    """Convert the JSONL into `cache_file` atomically (`atomic_write`: temporary file + rename)."""
    with atomic_write(cache_file, "w+b") as out, tempfile.TemporaryFile(dir=cache_file.parent) as side:
        out.write(b"\0" * HEADER_BYTES)
        builder = _Builder(jsonl_path, out, side)
        for line, sample in _flat_samples(jsonl_path, kind):
            builder.add(line, sample)
        builder.flush()
        n, t = len(builder.lengths), builder.num_tokens
        if n == 0:
            raise UserError(f"{jsonl_path}: no samples in the file; tokenize some data first")
        layout: dict[str, list[Any]] = {"tokens": [HEADER_BYTES, "int32", t]}
        pos = HEADER_BYTES + 4 * t
        layout["labels"] = [pos, "int32", t]
        side.seek(0)
        shutil.copyfileobj(side, out, 1 << 24)
        pos += 4 * t
        pad = (-pos) % 8
        out.write(b"\0" * pad)
        pos += pad
        lengths = np.frombuffer(builder.lengths, dtype=np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        for name, arr in (
            ("offsets", offsets),
            ("lengths", lengths),
            ("num_loss_counted", np.frombuffer(builder.num_loss, dtype=np.int64)),
            ("num_trained", np.frombuffer(builder.num_trained, dtype=np.int64)),
            ("source_lines", np.frombuffer(builder.lines, dtype=np.int64)),
        ):
            layout[name] = [pos, "int64", len(arr)]
            out.write(arr.tobytes())
            pos += 8 * len(arr)
        header = orjson.dumps(
            {
                "version": CACHE_VERSION,
                "kind": kind,
                "source": str(jsonl_path),
                "fingerprint": fp,
                "n": n,
                "num_tokens": t,
                "max_token_id": builder.max_token_id,
                "layout": layout,
            }
        )
        if len(header) > HEADER_BYTES - 12:  # cannot happen: the header is a few hundred bytes
            raise RuntimeError("cache header too long")
        out.seek(0)
        out.write(MAGIC + len(header).to_bytes(4, "little") + header)


class TokenStore:
    """A tokenized file, memory-mapped: every array (tokens and per-sample) is a read-only view of the
    cache."""

    path: Path
    cache_path: Path
    lengths: np.ndarray  # int64 [N] tokens per sample (all arrays here are read-only memory maps)
    num_loss_counted: np.ndarray  # int64 [N] labels != -100 per sample (unshifted)
    num_trained: np.ndarray  # int64 [N] trained tokens after the in-sample shift (the loss normaliser)
    source_lines: np.ndarray  # int64 [N] JSONL line numbers
    offsets: np.ndarray  # int64 [N+1] (memory-mapped)
    max_token_id: int
    num_tokens: int
    meta: dict[str, Any] | None

    def __init__(self, path: Path, cache_path: Path, header: dict[str, Any]) -> None:
        self.path, self.cache_path = path, cache_path
        raw = np.memmap(cache_path, dtype=np.uint8, mode="r")
        arrays = {}
        for name, (offset, dtype, count) in header["layout"].items():
            itemsize = np.dtype(dtype).itemsize
            arrays[name] = raw[offset : offset + itemsize * count].view(dtype)
        self._tokens, self._labels = arrays["tokens"], arrays["labels"]
        self.offsets = arrays["offsets"]
        # every array is a read-only view of the page cache: nothing per token or per sample is copied
        self.lengths = arrays["lengths"]
        self.num_loss_counted = arrays["num_loss_counted"]
        self.num_trained = arrays["num_trained"]
        self.source_lines = arrays["source_lines"]
        self.max_token_id = int(header["max_token_id"])
        self.num_tokens = int(header["num_tokens"])
        self.meta = read_sidecar(path)
        self.kind = header.get("kind", KIND_SFT)

    @property
    def num_pairs(self) -> int:
        """Preference pairs (samples 2i and 2i+1); 0 for an SFT file."""
        return len(self.lengths) // 2 if self.kind == KIND_PREFERENCE else 0

    @property
    def pair_lengths(self) -> np.ndarray:
        """int64 [num_pairs] tokens of both sides of each pair: the unit the planner packs."""
        return self.lengths[0::2] + self.lengths[1::2]

    @classmethod
    def open(cls, jsonl_path: Path, objective: str = "sft") -> TokenStore:
        """Open a tokenized JSONL through its cache, building or refreshing the cache first if needed.

        `objective` "sft" wants SFT samples, "dpo" preference pairs (flattened, see the module docstring).
        """
        jsonl_path = Path(jsonl_path)
        if not jsonl_path.is_file():
            raise UserError(f"{jsonl_path}: no such file; pass the output of `minitrain tokenize`")
        if jsonl_path.stat().st_size == 0:
            raise UserError(f"{jsonl_path}: the file is empty; tokenize some data first")
        # a file of the other kind (its sidecar says so, or, without one, a pair line met by
        # format.parse_sample) is one line naming the flag, before any cache is built
        check_kind(jsonl_path, read_sidecar(jsonl_path), objective)
        kind = KIND_SFT if objective == "sft" else KIND_PREFERENCE
        fp = fingerprint(jsonl_path)
        beside, fallback = cache_dirs(jsonl_path)
        for cache_dir in (beside, fallback):  # an up-to-date cache anywhere is used, even read-only
            header = _read_header(cache_dir / "store.bin")
            if header is not None and header["fingerprint"] == fp and header.get("kind", KIND_SFT) == kind:
                return cls(jsonl_path, cache_dir / "store.bin", header)
        cache_dir = beside if _writable(beside) else fallback
        cache_file = cache_dir / "store.bin"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create the data cache {cache_dir} ({err}); set MINITRAIN_CACHE"
            ) from None
        with _exclusive(cache_dir / "build.lock"):
            header = _read_header(cache_file)  # another process may have built it while we waited
            if header is None or header["fingerprint"] != fp or header.get("kind", KIND_SFT) != kind:
                _build(jsonl_path, cache_file, fp, kind)
                header = _read_header(cache_file)
        if header is None:
            raise RuntimeError(f"{cache_file}: cache unreadable right after building it")
        return cls(jsonl_path, cache_file, header)

    def __len__(self) -> int:
        return len(self.lengths)

    def input_ids(self, i: int) -> np.ndarray:
        """int32 view of sample i's token ids (length lengths[i])."""
        return self._tokens[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def labels(self, i: int) -> np.ndarray:
        """int32 view of sample i's labels, -100 where masked, aligned with input_ids (not shifted)."""
        return self._labels[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def truncated(self, max_tokens: int) -> TokenStore:
        """This store with every sample cut to its first `max_tokens` tokens (`--truncate`).

        A cut sample keeps its first `max_tokens` tokens and their labels; the label of the token after the
        cut is lost with it, so the last kept position trains nothing (its target is gone), exactly as the
        last token of any sample. Per-sample counts (lengths, num_loss_counted, num_trained) are recomputed
        for the cut samples only; the token arrays are still the same memory map.
        """
        over = np.flatnonzero(self.lengths > max_tokens)
        return self._cut({int(i): max_tokens for i in over})

    def truncated_pairs(self, max_tokens: int) -> TokenStore:
        """This preference store with each pair longer than `max_tokens` (both sides) cut to fit it
        (`--truncate --objective dpo`).

        Each side keeps its first tokens, as TRL's `truncation_mode="keep_start"` does per sequence: the
        shared prompt stays whole and the responses lose their ends. The two sides get the largest common
        cap c with min(len_chosen, c) + min(len_rejected, c) <= max_tokens: a side shorter than that is kept
        whole and the longer response is cut first. A pair whose cut would leave a side without a trained
        token (its prompt leaves no room for a response) is not cut: it stays longer than the budget and
        the planner skips it, as without --truncate (`pair_truncation` counts both).
        """
        cut: dict[int, int] = {}
        for p in np.flatnonzero(self.pair_lengths > max_tokens):
            a, b = int(self.lengths[2 * p]), int(self.lengths[2 * p + 1])
            short = min(a, b)
            cap = max_tokens - short if short <= max_tokens // 2 else max_tokens // 2
            keep = {2 * int(p): min(a, cap), 2 * int(p) + 1: min(b, cap)}
            if all(self._trained_in_first(i, n) > 0 for i, n in keep.items()):
                cut.update((i, n) for i, n in keep.items() if n < self.lengths[i])
        return self._cut(cut)

    def _trained_in_first(self, i: int, n: int) -> int:
        """Trained tokens (labels != -100 after the shift) among sample i's first n tokens."""
        return int((self._labels[self.offsets[i] + 1 : self.offsets[i] + n] != IGNORE_INDEX).sum())

    def _cut(self, keep: dict[int, int]) -> TokenStore:
        """A view of this store with sample i cut to its first keep[i] tokens, its counts recomputed."""
        view = object.__new__(TokenStore)
        view.__dict__.update(self.__dict__)
        if not keep:
            return view
        view.lengths = np.array(self.lengths)
        view.num_loss_counted = np.array(self.num_loss_counted)
        view.num_trained = np.array(self.num_trained)
        for i, n in keep.items():
            kept = self._labels[self.offsets[i] : self.offsets[i] + n]
            view.lengths[i] = n
            view.num_loss_counted[i] = int((kept != IGNORE_INDEX).sum())
            view.num_trained[i] = int((kept[1:] != IGNORE_INDEX).sum())
        view.num_tokens = int(view.lengths.sum())
        return view

    @property
    def flat_input_ids(self) -> np.ndarray:
        """int32 [T] memory-mapped token ids of all samples; sample i is [offsets[i]:offsets[i+1]]."""
        return self._tokens

    @property
    def flat_labels(self) -> np.ndarray:
        """int32 [T] memory-mapped labels of all samples, aligned with `flat_input_ids`."""
        return self._labels

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, samples={len(self)}, tokens={self.num_tokens})"


@dataclass(frozen=True)
class Truncation:
    """What `--truncate` did to a store, in the objective's units (samples, or pairs)."""

    too_long: int  # units longer than the budget before the cut
    cut: int  # of those, units cut to fit it
    tokens_cut: int  # tokens cut off them
    skipped: int  # units still longer than the budget (pairs whose prompt leaves no room): skipped


def truncate(store: TokenStore, max_tokens: int, objective: str) -> tuple[TokenStore, Truncation]:
    """`store` cut to the token budget as `train --truncate` does (`TokenStore.truncated` for samples,
    `truncated_pairs` for `--objective dpo`), and what was cut."""
    pairs = objective == "dpo"
    view = store.truncated_pairs(max_tokens) if pairs else store.truncated(max_tokens)
    before, after = (store.pair_lengths, view.pair_lengths) if pairs else (store.lengths, view.lengths)
    return view, Truncation(
        too_long=int((before > max_tokens).sum()),
        cut=int((after < before).sum()),
        tokens_cut=int((before - after).sum()),
        skipped=int((after > max_tokens).sum()),
    )
