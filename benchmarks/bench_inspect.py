"""Benchmark of `minitrain inspect` on a large tokenized file: --stats, --audit, and the sample view.

Builds the file once: the fixture conversations (../shared/fixtures/data/*.messages.jsonl) tokenized with
the SmolLM2 fixture tokenizer by `minitrain.data.pipeline.tokenize_file`, replicated to N samples (default
100,000), with the input replicated alongside and `source_line` renumbered so that `--audit --source` can
read both in step. Then times, side by side on the same file:

  parse floor         read every line and orjson-parse it (nothing else): the cost any full pass pays
  --stats             compute_stats
  --stats + packing   compute_stats with --max-tokens-per-gpu 8192 --batch-size 128 --nproc 8 (the planner)
  --audit             audit_file (tokenizer load not counted)
  --audit --stats     one pass doing both
  --audit --source    audit_file with the original input compared as text
  view: first 3       select_samples(n=3): stops after 3 lines
  view: --index N-1   streams to the last line, parses one
  view: --random 3    reservoir sampling: one pass over raw lines, parses 3

and reports, best of 3, wall seconds and CPU seconds of this process (the honest number on a shared
machine), samples per CPU second, and the CPU-time ratio to the parse floor.

    python benchmarks/bench_inspect.py [--samples 100000] [--out benchmarks/results/inspect.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitrain.config import TokenizeConfig  # noqa: E402
from minitrain.data.format import read_sidecar, sidecar_path  # noqa: E402
from minitrain.data.pipeline import tokenize_file  # noqa: E402
from minitrain.inspect.audit import audit_file  # noqa: E402
from minitrain.inspect.select import select_samples  # noqa: E402
from minitrain.inspect.stats import StatsAccumulator, compute_stats  # noqa: E402
from minitrain.inspect.tokenizer import load_tokenizer  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "smollm2-135m-instruct"


def build(workdir: Path, samples: int) -> tuple[Path, Path]:
    """Tokenize the fixture conversations, then replicate tokenized lines and input lines to `samples`."""
    src_lines: list[bytes] = []
    for f in sorted((FIXTURES / "data").glob("*.messages.jsonl")):
        src_lines += [line for line in f.read_bytes().splitlines() if line.strip()]
    base_in = workdir / "base.in.jsonl"
    base_in.write_bytes(b"\n".join(src_lines) + b"\n")
    base_out = workdir / "base.jsonl"
    tokenize_file(TokenizeConfig(input_file=base_in, output_file=base_out, model_name_or_path=str(TOKENIZER)))
    rows = [orjson.loads(line) for line in base_out.read_bytes().splitlines()]
    big_in, big_out = workdir / "big.in.jsonl", workdir / "big.jsonl"
    with big_in.open("wb") as fi, big_out.open("wb") as fo:
        copy = 0
        written = 0
        while written < samples:
            fi.write(b"\n".join(src_lines) + b"\n")
            for row in rows:
                if written == samples:
                    break
                fo.write(
                    orjson.dumps(dict(row, source_line=row["source_line"] + copy * len(src_lines))) + b"\n"
                )
                written += 1
            copy += 1
    meta = json.loads(sidecar_path(base_out).read_text())
    meta["counts"]["written"] = samples
    meta.pop("tokens", None)
    meta.pop("trained_tokens", None)
    sidecar_path(big_out).write_text(json.dumps(meta))
    return big_in, big_out


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds of `repeat` runs (CPU time: this process only, so it stays
    meaningful on a machine shared with other jobs)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def parse_floor(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for line in f:
            orjson.loads(line)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inspect.json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = build(Path(tmp), args.samples)
        size_mb = out.stat().st_size / 1e6
        meta = read_sidecar(out)
        tok = load_tokenizer(out, meta, None)
        n = args.samples
        variants: list[tuple[str, Callable[[], object]]] = [
            ("parse floor", lambda: parse_floor(out)),
            ("--stats", lambda: compute_stats(out)),
            (
                "--stats + packing (8192 tok/GPU, bs 128, 8 GPUs)",
                lambda: compute_stats(out, max_tokens_per_gpu=8192, batch_size=128, nproc=8),
            ),
            ("--audit", lambda: audit_file(out, tok, meta)),
            (
                "--audit --stats (one pass)",
                lambda: audit_file(out, tok, meta, stats=StatsAccumulator()),
            ),
            ("--audit --source", lambda: audit_file(out, tok, meta, source=src)),
            ("view: first 3", lambda: select_samples(out, n=3)),
            (f"view: --index {n - 1}", lambda: select_samples(out, indices=(n - 1,))),
            ("view: --random 3", lambda: select_samples(out, random_k=3, seed=0)),
        ]
        report = audit_file(out, tok, meta, source=src)
        assert report.counts == {}, report.counts  # the benchmark file must be clean, or we time error paths
        results = []
        for name, fn in variants:
            wall, cpu = timed(fn)
            results.append({"variant": name, "seconds": wall, "cpu_seconds": cpu})
    floor = results[0]["cpu_seconds"]
    table = Table(
        title=f"minitrain inspect on {n:,} samples ({size_mb:,.0f} MB, SmolLM2 fixture tokenization)"
    )
    table.add_column("variant")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("samples/CPU s", justify="right")
    table.add_column("CPU x parse floor", justify="right")
    for r in results:
        r["samples_per_cpu_s"] = n / r["cpu_seconds"] if not r["variant"].startswith("view: first") else None
        r["cpu_ratio_to_floor"] = r["cpu_seconds"] / floor
        table.add_row(
            r["variant"],
            f"{r['seconds']:.3f}",
            f"{r['cpu_seconds']:.3f}",
            "-" if r["samples_per_cpu_s"] is None else f"{r['samples_per_cpu_s']:,.0f}",
            f"{r['cpu_ratio_to_floor']:.2f}",
        )
    console.print(table)
    console.print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"samples": n, "file_mb": size_mb, "results": results, "loadavg": os.getloadavg()[0]}, indent=2
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
