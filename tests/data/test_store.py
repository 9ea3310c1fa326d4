"""Store: the cache equals the JSONL, is rebuilt on change, is built once under concurrent opens, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from minitrain.data import store as store_mod
from minitrain.data.store import TokenStore
from minitrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def make_samples(n: int, seed: int = 0, max_len: int = 40, vocab: int = 1000) -> list[dict]:
    """Random tokenized samples in the format `minitrain tokenize` writes."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        length = int(rng.integers(1, max_len + 1))
        ids = rng.integers(0, vocab, length).tolist()
        labels = [t if rng.random() < 0.6 else -100 for t in ids]
        samples.append(
            {
                "input_ids": ids,
                "labels": labels,
                "len": length,
                "num_loss_counted_tokens": sum(x != -100 for x in labels),
                "source_line": k + 1,
            }
        )
    return samples


def write_tokenized(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in samples))
    return path


def assert_store_equals(store: TokenStore, samples: list[dict]) -> None:
    assert len(store) == len(samples)
    for i, s in enumerate(samples):
        assert store.input_ids(i).tolist() == s["input_ids"]
        assert store.labels(i).tolist() == s["labels"]
        assert store.input_ids(i).dtype == np.int32
    assert store.lengths.tolist() == [s["len"] for s in samples]
    assert store.num_loss_counted.tolist() == [s["num_loss_counted_tokens"] for s in samples]
    assert store.num_trained.tolist() == [sum(x != -100 for x in s["labels"][1:]) for s in samples]
    assert store.max_token_id == max(max(s["input_ids"]) for s in samples)


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    samples = make_samples(300)
    path = write_tokenized(tmp_path / "train.jsonl", samples)
    store = TokenStore.open(path)
    assert_store_equals(store, samples)
    assert store.cache_path == tmp_path / "train.mtcache" / "store.bin"
    assert store.meta is None
    umask = os.umask(0)
    os.umask(umask)
    assert store.cache_path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, as open() makes
    mtime = store.cache_path.stat().st_mtime_ns
    again = TokenStore.open(path)  # no rebuild
    assert again.cache_path.stat().st_mtime_ns == mtime
    assert_store_equals(again, samples)


def test_blank_lines_are_skipped_and_source_lines_kept(tmp_path: Path) -> None:
    samples = make_samples(3)
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b"\n".join(orjson.dumps(s) for s in samples[:2]) + b"\n\n" + orjson.dumps(samples[2]) + b"\n"
    )
    store = TokenStore.open(path)
    assert store.source_lines.tolist() == [1, 2, 4]


def test_rebuilt_when_the_jsonl_changes(tmp_path: Path) -> None:
    path = write_tokenized(tmp_path / "d.jsonl", make_samples(50, seed=1))
    TokenStore.open(path)
    changed = make_samples(70, seed=2)
    write_tokenized(path, changed)
    assert_store_equals(TokenStore.open(path), changed)
    # same size and mtime, new content: the head hash notices. The first id gets another id with as many
    # digits, so the file keeps its size (a changed size would be noticed without the hash).
    same_size = [dict(s) for s in changed]
    first = same_size[0]["input_ids"][0]
    same_size[0]["input_ids"] = [first + 1 if first % 10 < 9 else first - 1, *same_size[0]["input_ids"][1:]]
    raw_old, raw_new = path.read_bytes(), b"".join(orjson.dumps(s) + b"\n" for s in same_size)
    assert len(raw_old) == len(raw_new) and raw_old != raw_new
    st = path.stat()
    path.write_bytes(raw_new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert TokenStore.open(path).input_ids(0).tolist() == same_size[0]["input_ids"]


CONCURRENT = """
import sys, time
from pathlib import Path
from minitrain.data import store
real = store._build
def logged(*args):
    with open(sys.argv[2], "a") as f:
        f.write("build\\n")
    time.sleep(0.5)  # widen the window in which the other process arrives
    return real(*args)
store._build = logged
s = store.TokenStore.open(Path(sys.argv[1]))
print(len(s), int(s.lengths.sum()))
"""


def test_concurrent_open_builds_once(tmp_path: Path) -> None:
    samples = make_samples(2000, seed=3)
    path = write_tokenized(tmp_path / "c.jsonl", samples)
    log = tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(path), str(log)], stdout=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].decode().split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = [str(len(samples)), str(sum(s["len"] for s in samples))]
    assert outs == [expected, expected]
    assert log.read_text().count("build") == 1
    assert_store_equals(TokenStore.open(path), samples)
    assert not [p for p in path.with_name("c.mtcache").iterdir() if p.suffix == ".tmp"]


def test_read_only_folder_falls_back_to_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tokenized(tmp_path / "ro" / "x.jsonl", make_samples(20))
    monkeypatch.setenv("MINITRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store_mod, "_writable", lambda d: not str(d).startswith(str(tmp_path / "ro")))
    store = TokenStore.open(path)
    assert store.cache_path.parent.parent == tmp_path / "cache"
    assert not (tmp_path / "ro" / "x.mtcache").exists()
    assert TokenStore.open(path).cache_path == store.cache_path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"input_ids": [1, 2]}', "missing labels"),
        (b'{"input_ids": [1, 2], "labels": [1]}', "2 input_ids but 1 labels"),
        (b'{"input_ids": [], "labels": []}', "empty sample"),
        (b'{"input_ids": [1, -5], "labels": [1, -100]}', "negative token id"),
        (b'{"input_ids": [1, 2], "labels": [1, 2], "len": 3}', "len=3"),
        (b'{"input_ids": [1, 99999999999], "labels": [1, 2]}', "32-bit"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(orjson.dumps(make_samples(1)[0]) + b"\n" + line + b"\n")
    with pytest.raises(UserError, match=rf"bad.jsonl:2: .*{message}"):
        TokenStore.open(path)
    assert not list((tmp_path / "bad.mtcache").glob("*.tmp"))


def test_empty_and_missing_files_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        TokenStore.open(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    with pytest.raises(UserError, match="no samples"):
        TokenStore.open(tmp_path / "blank.jsonl")
    with pytest.raises(UserError, match="no such file"):
        TokenStore.open(tmp_path / "missing.jsonl")


def test_rss_does_not_hold_the_tokens(tmp_path: Path) -> None:
    """The token arrays are memory-maps of the cache file, not copies."""
    path = write_tokenized(tmp_path / "m.jsonl", make_samples(100))
    store = TokenStore.open(path)
    assert isinstance(store.flat_input_ids.base, np.memmap) or isinstance(store.flat_input_ids, np.memmap)
    assert not store.input_ids(0).flags.writeable


def test_truncated_keeps_the_first_tokens_and_recounts_them(tmp_path: Path) -> None:
    samples = make_samples(40, seed=3, max_len=30)
    store = TokenStore.open(write_tokenized(tmp_path / "t.jsonl", samples)).truncated(12)
    cut = [  # the reference: every sample sliced to 12 tokens, counted again from scratch
        {"input_ids": s["input_ids"][:12], "labels": s["labels"][:12], "len": min(s["len"], 12),
         "num_loss_counted_tokens": sum(x != -100 for x in s["labels"][:12])}
        for s in samples
    ]  # fmt: skip
    assert any(s["len"] > 12 for s in samples) and any(s["len"] <= 12 for s in samples)
    assert_store_equals(store, cut)
    assert store.num_tokens == sum(s["len"] for s in cut)


def test_truncated_leaves_the_store_it_came_from_alone(tmp_path: Path) -> None:
    samples = make_samples(20, seed=4, max_len=30)
    store = TokenStore.open(write_tokenized(tmp_path / "t.jsonl", samples))
    store.truncated(5)
    assert_store_equals(store, samples)
    assert store.truncated(1000).lengths.tolist() == store.lengths.tolist()  # nothing to cut


def _pairs_file(path: Path, pairs: list[tuple[int, int, int]], seed: int = 0) -> Path:
    """A preference file of pairs (prompt length, chosen response length, rejected response length)."""
    rng = np.random.default_rng(seed)
    lines = []
    for k, (prompt_len, *responses) in enumerate(pairs):
        prompt = rng.integers(0, 1000, prompt_len).tolist()
        sides = []
        for n in responses:
            response = rng.integers(0, 1000, n).tolist()
            labels = [-100] * prompt_len + response
            sides.append({"input_ids": prompt + response, "labels": labels, "len": prompt_len + n,
                          "num_loss_counted_tokens": n})  # fmt: skip
        pair = {"chosen": sides[0], "rejected": sides[1], "prompt_len": prompt_len, "source_line": k + 1}
        lines.append(orjson.dumps(pair))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path  # no sidecar: the first line says it holds pairs


def test_truncated_pairs_keep_the_prompt_and_cut_the_longer_response_first(tmp_path: Path) -> None:
    budget = 20
    shapes = [(3, 4, 5), (4, 20, 3), (4, 12, 14), (6, 30, 30), (9, 5, 7), (10, 1, 1), (12, 40, 2)]
    store = TokenStore.open(_pairs_file(tmp_path / "p.jsonl", shapes), "dpo")
    view, cut = store_mod.truncate(store, budget, "dpo")
    for p, (prompt_len, *_) in enumerate(shapes):
        a, b = int(store.lengths[2 * p]), int(store.lengths[2 * p + 1])
        # the reference: the largest common cap c with both sides' first c tokens in the budget, by search
        c = max(c for c in range(max(a, b) + 1) if min(a, c) + min(b, c) <= budget)
        keep = [min(a, c), min(b, c)]
        if a + b > budget and min(keep) <= prompt_len:  # a side without a response token: skipped
            keep = [a, b]
        for side, n in zip((2 * p, 2 * p + 1), keep, strict=True):
            assert view.input_ids(side).tolist() == store.input_ids(side).tolist()[:n]  # the first n tokens
            assert view.lengths[side] == n
            assert view.num_trained[side] == n - prompt_len  # the response tokens kept
            assert view.num_loss_counted[side] == n - prompt_len
    # worked by hand: 15 fits; 24+7 -> 13+7; 16+18 -> 10+10; 36+36 -> 10+10; 14+16 -> 10+10 (one response
    # token each); 11+11 and 52+14 would keep no response token at the cap of 10: skipped
    assert view.pair_lengths.tolist() == [15, 20, 20, 20, 20, 22, 66]
    assert cut == store_mod.Truncation(too_long=6, cut=4, tokens_cut=11 + 14 + 52 + 10, skipped=2)
    assert store.lengths.tolist() == [7, 8, 24, 7, 16, 18, 36, 36, 14, 16, 11, 11, 52, 14]  # left alone


def test_truncate_of_an_sft_store_counts_samples(tmp_path: Path) -> None:
    samples = make_samples(30, seed=5, max_len=30)
    store = TokenStore.open(write_tokenized(tmp_path / "t.jsonl", samples))
    view, cut = store_mod.truncate(store, 12, "sft")
    over = [s["len"] - 12 for s in samples if s["len"] > 12]
    assert cut == store_mod.Truncation(too_long=len(over), cut=len(over), tokens_cut=sum(over), skipped=0)
    assert view.lengths.tolist() == store.truncated(12).lengths.tolist()
