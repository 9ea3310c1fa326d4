"""Benchmark `minitrain tokenize` against a naive masking pipeline and a no-masking floor.

    python benchmarks/bench_tokenize.py [--samples 20000] [--naive-samples 2000] [--workers N] [--out PATH]
                                        [--tokenizer smollm2-135m-instruct|qwen3|...] [--data alpaca|fastchat]

Data: ../shared/fixtures/data/*.messages.jsonl (or only those whose name starts with --data: alpaca is
single-turn, fastchat multi-turn) replicated to --samples lines; tokenizer: a fixture folder (SmolLM2).
Variants, side by side (samples/s, tokens/s, and per core):
  minitrain (1 worker)   the real stage, `tokenize_file`, on one process (parse, mask, verify, write)
  minitrain (N workers)  the same with N worker processes (default: all cores)
  naive                  per sample `apply_chat_template(tokenize=True)` + per-turn prefix renders to find
                         each assistant turn (the approach peers use; it assumes prefix renders are prefixes)
  floor                  one template render + one batched encode per sample, no masking, nothing written
The trade-off of this benchmark: it measures throughput on whatever else the machine is doing; the
ratios in one run are what to compare, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the floor must stay on one core

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO.parent / "shared" / "fixtures"
SMOLLM2 = FIXTURES / "tokenizers" / "smollm2-135m-instruct"


def build_input(path: Path, samples: int, data: str = "") -> list[bytes]:
    lines = [
        line
        for f in sorted((FIXTURES / "data").glob(f"{data}*.messages.jsonl"))
        for line in f.read_bytes().splitlines()
        if line.strip()
    ]
    chosen = list(itertools.islice(itertools.cycle(lines), samples))
    path.write_bytes(b"\n".join(chosen) + b"\n")
    return chosen


def bench_minitrain(inp: Path, out: Path, workers: int, tokenizer: Path = SMOLLM2) -> dict:
    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file

    config = TokenizeConfig(
        input_file=inp, output_file=out, model_name_or_path=str(tokenizer), num_workers=workers
    )

    def cpu() -> float:  # this process and its (finished) worker processes
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    result = tokenize_file(config)
    wall, cpu_seconds = time.perf_counter() - t0, cpu() - c0
    assert result.rejected == 0 and result.dropped == 0
    return {
        "samples": result.written,
        "tokens": result.tokens,
        "seconds": result.elapsed_s,
        "seconds_with_load": wall,
        "cpu_seconds": cpu_seconds,  # includes loading the tokenizer (about 0.3 s): slightly pessimistic
        "cores": workers,
    }


def bench_naive(lines: list[bytes], tokenizer: Path = SMOLLM2) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for raw in lines:
        messages = orjson.loads(raw)["messages"]
        ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
        labels = [-100] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(
                tok.apply_chat_template(
                    messages[:i], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            end = len(tok.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False))
            labels[start:end] = ids[start:end]
        orjson.dumps({"input_ids": ids, "labels": labels})
        tokens += len(ids)
    return {
        "samples": len(lines),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "cores": 1,
    }


def bench_floor(lines: list[bytes], batch: int = 64, tokenizer: Path = SMOLLM2) -> dict:
    from minitrain.data.chat import load_chat_encoder

    encoder = load_chat_encoder(str(tokenizer)).encoder
    tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(lines), batch):
        texts = [encoder.render(orjson.loads(raw)["messages"]) for raw in lines[i : i + batch]]
        tokens += sum(len(e.ids) for e in encoder.backend.encode_batch(texts, add_special_tokens=False))
    return {
        "samples": len(lines),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "cores": 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument(
        "--naive-samples", type=int, default=2000, help="the naive pipeline is slow; time it on a prefix"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenize.json")
    parser.add_argument(
        "--tokenizer", default=SMOLLM2.name, help="a folder under ../shared/fixtures/tokenizers"
    )
    parser.add_argument("--data", default="", help="only fixture files whose name starts with this")
    args = parser.parse_args()
    tokenizer = FIXTURES / "tokenizers" / args.tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "bench.jsonl"
        lines = build_input(inp, args.samples, args.data)
        rows = {
            "floor (render + batched encode, no mask)": bench_floor(lines, tokenizer=tokenizer),
            "minitrain tokenize, 1 worker": bench_minitrain(inp, Path(tmp) / "one.jsonl", 1, tokenizer),
            f"minitrain tokenize, {args.workers} workers": bench_minitrain(
                inp, Path(tmp) / "many.jsonl", args.workers, tokenizer
            ),
            # every k-th line, so the naive subset has the same mix of single- and multi-turn samples
            "naive (apply_chat_template + per-turn prefixes)": bench_naive(
                lines[:: max(1, len(lines) // args.naive_samples)], tokenizer
            ),
        }
    for row in rows.values():
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        # per core: samples per CPU-second of all processes of the variant
        # (robust to other load on the machine)
        row["samples_per_cpu_s"] = row["samples"] / row["cpu_seconds"]
    floor = rows["floor (render + batched encode, no mask)"]["samples_per_cpu_s"]
    for row in rows.values():
        row["floor_over_this_per_core"] = floor / row["samples_per_cpu_s"]

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"tokenize, {args.tokenizer}, {args.data or 'all'} data, {args.samples} samples "
        f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
    )
    for col in (
        "variant",
        "samples",
        "samples/s (wall)",
        "tokens/s (wall)",
        "samples per CPU-s",
        "floor/this per core",
    ):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['samples']:,}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['samples_per_cpu_s']:,.0f}",
            f"{row['floor_over_this_per_core']:.2f}x",
        )
    Console(width=150).print(table)
    one = rows["minitrain tokenize, 1 worker"]
    naive = rows["naive (apply_chat_template + per-turn prefixes)"]
    print(
        "minitrain (1 worker) vs naive, per CPU-second: "
        f"{one['samples_per_cpu_s'] / naive['samples_per_cpu_s']:.1f}x faster"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {"samples": args.samples, "load_average": os.getloadavg(), "rows": rows},
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
