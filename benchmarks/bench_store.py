"""Benchmark of the token store: cache build time, open time and memory for 10k / 100k / 1M samples.

Each size gets a synthetic tokenized JSONL (random ids, 60% trained labels; lengths 16..1024 for 10k and
100k, 8..64 for 1M so that the file stays small enough to build here). Every measurement runs in a fresh
subprocess so that its memory is its own:
  build s      first `TokenStore.open` (JSONL -> cache), with the process's peak RSS (VmHWM)
  open ms      later opens (cache exists), anonymous RSS right after
  scan         reading every sample's ids and labels once: anonymous RSS (what the process owns) and
               file-backed RSS (page cache mapped from the cache file, shared by every rank on a node)
  fingerprint  head+tail hash (what the store does at every open) vs hashing the whole JSONL
Side by side: the baseline of reading the JSONL into Python lists (what a list-based loader holds).

    python benchmarks/bench_store.py [--sizes 10000,100000,1000000] [--out benchmarks/results/store.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) / 1024  # MiB
    return out
mode, path = sys.argv[1], Path(sys.argv[2])
base = rss()
if mode == "lists":
    import orjson
    t = time.perf_counter()
    data = [orjson.loads(line) for line in path.open("rb")]
    print(json.dumps({"seconds": time.perf_counter() - t, "rss": rss(), "base": base}))
    sys.exit()
from minitrain.data.store import TokenStore, fingerprint
t = time.perf_counter()
store = TokenStore.open(path)
seconds = time.perf_counter() - t
after_open = rss()
result = {"seconds": seconds, "rss_open": after_open, "base": base,
          "peak_mib": after_open["VmHWM"]}  # ru_maxrss survives exec on Linux; VmHWM does not
if mode == "scan":
    t = time.perf_counter()
    total = 0
    ids, labels = store.flat_input_ids, store.flat_labels
    step = 1 << 22
    for start in range(0, len(ids), step):  # touch every token once, as training eventually does
        total += int(ids[start:start + step].sum()) + int(labels[start:start + step].sum())
    result["scan_seconds"] = time.perf_counter() - t
    result["rss_scan"] = rss()
    t = time.perf_counter()
    fingerprint(path)
    result["fingerprint_ms"] = (time.perf_counter() - t) * 1e3
    import hashlib
    t = time.perf_counter()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    result["full_hash_ms"] = (time.perf_counter() - t) * 1e3
print(json.dumps(result))
"""


def write_synthetic(path: Path, n: int, lo: int, hi: int, seed: int = 0) -> int:
    """A tokenized JSONL of n random samples; returns the token count."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    ids_all = rng.integers(0, 32000, int(lengths.sum())).tolist()
    masked = (rng.random(int(lengths.sum())) < 0.4).tolist()
    pos = 0
    with path.open("wb") as f:
        for k, length in enumerate(lengths.tolist()):
            ids = ids_all[pos : pos + length]
            labels = [-100 if m else t for t, m in zip(ids, masked[pos : pos + length], strict=True)]
            pos += length
            f.write(
                orjson.dumps(
                    {
                        "input_ids": ids,
                        "labels": labels,
                        "len": length,
                        "num_loss_counted_tokens": length - sum(masked[pos - length : pos]),
                        "source_line": k + 1,
                    }
                )
                + b"\n"
            )
    return int(lengths.sum())


def child(mode: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(REPO)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "store.json")
    ap.add_argument("--lists-up-to", type=int, default=100000, help="largest size for the list baseline")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_store.") as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            lo, hi = (8, 64) if n >= 1_000_000 else (16, 1024)
            path = Path(tmp) / f"s{n}.jsonl"
            t = time.perf_counter()
            tokens = write_synthetic(path, n, lo, hi)
            gen = time.perf_counter() - t
            build = child("open", path)
            opens = [child("open", path) for _ in range(3)]
            scan = child("scan", path)
            lists = child("lists", path) if n <= args.lists_up_to else None
            cache = path.with_name(path.stem + ".mtcache") / "store.bin"
            rows.append(
                {
                    "samples": n,
                    "tokens": tokens,
                    "jsonl_mib": path.stat().st_size / 2**20,
                    "cache_mib": cache.stat().st_size / 2**20,
                    "generate_s": gen,
                    "build_s": build["seconds"],
                    "build_peak_rss_mib": build["peak_mib"],
                    "open_ms": 1e3 * min(o["seconds"] for o in opens),
                    "open_anon_rss_mib": opens[0]["rss_open"]["RssAnon"] - opens[0]["base"]["RssAnon"],
                    "scan_s": scan["scan_seconds"],
                    "scan_anon_rss_mib": scan["rss_scan"]["RssAnon"] - scan["base"]["RssAnon"],
                    "scan_file_rss_mib": scan["rss_scan"]["RssFile"] - scan["base"]["RssFile"],
                    "fingerprint_ms": scan["fingerprint_ms"],
                    "full_hash_ms": scan["full_hash_ms"],
                    "lists_s": lists["seconds"] if lists else None,
                    "lists_anon_rss_mib": (lists["rss"]["RssAnon"] - lists["base"]["RssAnon"])
                    if lists
                    else None,
                }
            )
            print(f"{n:,} samples done", file=sys.stderr)
    show(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


def show(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="token store: JSONL -> memory-mapped cache")
    cols = [
        ("samples", "samples", "{:,}"), ("tokens", "tokens", "{:,}"), ("JSONL MiB", "jsonl_mib", "{:.0f}"),
        ("cache MiB", "cache_mib", "{:.0f}"), ("build s", "build_s", "{:.1f}"),
        ("build peak RSS MiB", "build_peak_rss_mib", "{:.0f}"), ("open ms", "open_ms", "{:.1f}"),
        ("open anon RSS MiB", "open_anon_rss_mib", "{:.1f}"), ("scan s", "scan_s", "{:.2f}"),
        ("scan anon / file RSS MiB", None, None), ("fingerprint ms", "fingerprint_ms", "{:.1f}"),
        ("full hash ms", "full_hash_ms", "{:.0f}"), ("lists: load s", "lists_s", "{:.1f}"),
        ("lists: anon RSS MiB", "lists_anon_rss_mib", "{:.0f}"),
    ]  # fmt: skip
    for name, _, _ in cols:
        table.add_column(name, justify="right")
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                cells.append(f"{r['scan_anon_rss_mib']:.1f} / {r['scan_file_rss_mib']:.0f}")
            else:
                cells.append("-" if r[key] is None else fmt.format(r[key]))
        table.add_row(*cells)
    Console(width=200).print(table)
    for r in rows:
        if r["lists_s"]:
            print(
                f"{r['samples']:,}: open is {r['lists_s'] * 1e3 / r['open_ms']:.0f}x faster "
                "than loading lists; "
                f"anon RSS {r['lists_anon_rss_mib'] / max(r['open_anon_rss_mib'], 0.1):.0f}x smaller"
            )


if __name__ == "__main__":
    main()
