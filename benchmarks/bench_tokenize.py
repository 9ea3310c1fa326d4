"""Benchmark `minitrain tokenize` against a naive masking pipeline, a no-masking floor and mini_trainer.

    python benchmarks/bench_tokenize.py [--samples 20000] [--naive-samples 2000] [--workers N] [--repeats 3]
                                        [--tokenizer smollm2-135m-instruct|qwen3|...] [--data alpaca|fastchat]
                                        [--mini-trainer-path DIR] [--out PATH]
    python benchmarks/bench_tokenize.py --scale 1499,10000,30000 [--workers N] [--repeats 3] [...]
    python benchmarks/bench_tokenize.py --steps [--samples 1500] [--repeats 6] [--tokenizer ...] [--data ...]

Data: ../shared/fixtures/data/*.messages.jsonl (or only those whose name starts with --data: alpaca is
single-turn, fastchat multi-turn) replicated to --samples lines; tokenizer: a fixture folder (SmolLM2).
Variants, side by side (samples/s, tokens/s, and per CPU-second):
  floor                  one template render + one batched encode per sample (ids only, no offsets:
                         `encode_batch_fast`, the cheapest encode), no mask, nothing written;
                         --repeats passes (the median shown; the least disturbed also compared)
  minitrain (1 worker)   the real stage, `tokenize_file`, in a fresh process (parse, mask, verify, write);
                         the tokenizer load and the once-per-run facts (vocabulary fingerprint, voice
                         tokens) are timed apart and left out of the CPU; each run is followed
                         by a floor pass in the same process, and their CPU ratio printed (paired)
  minitrain (N workers)  the same with N encoding processes; CPU = the parent's + the workers' (reaped
                         from the process or through a forkserver), with the split per sample shown;
                         --repeats: median
  ceiling (printed)      N independent 1-worker runs at once: the most N workers can gain on this machine
  naive                  per sample `apply_chat_template(tokenize=True)` + per-turn prefix renders to find
                         each assistant turn (the approach peers use; it assumes prefix renders are prefixes)
  CLI (end to end)       `python -m minitrain tokenize` as a user runs it: start-up, imports, load, run
  mini_trainer           its `process_data.py` (from --mini-trainer-path; skipped with a note when absent),
                         end to end, with the shims described at `_MINI_TRAINER_DRIVER`; these two rows
                         run --repeats times each, alternating, and show the median
--steps: only the stage built up from the floor one cost at a time (one encode call per text, the
character offsets, the generation-prompt renders, then the whole per-line stage; aside, what encoding
each text right after its render would cost, and the floor as issue 14 words it: one render and
tokenizers' `encode`, which computes character offsets too), in one process, interleaved chunk by chunk:
where the stage's cost beyond the floor goes.
--scale N1,N2,...: only the two end-to-end rows, at each size (alternating, --repeats each), and the
floor. A straight line through each tool's median seconds gives its start-up (the seconds at no data)
and its seconds per sample; their ratio is the end-to-end ratio on a large file. The floor's CPU per
sample, spread perfectly over the cores, and the floor run as one process per core at once (each on its
share of the lines, as this machine runs two busy processes), give what a tool that does nothing but render
and encode each sample once would reach against mini_trainer on a large file.
The trade-off of this benchmark: it measures throughput on whatever else the machine is doing; the
ratios in one run are what to compare (CPU-seconds are steadier than wall), not numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the floor must stay on one core

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO.parent / "shared" / "fixtures"
SMOLLM2 = FIXTURES / "tokenizers" / "smollm2-135m-instruct"
MINI_TRAINER = "mini_trainer process_data.py (end to end)"
ISSUE_FLOOR = "  (one render + tokenizers' `encode`, with offsets)"  # --steps: the floor as issue 14 words it
CLI = "minitrain tokenize CLI (end to end)"


def fixture_lines(data: str = "") -> list[bytes]:
    """The non-blank lines of the fixture's messages files whose name starts with `data` (all: "")."""
    return [
        line
        for f in sorted((FIXTURES / "data").glob(f"{data}*.messages.jsonl"))
        for line in f.read_bytes().splitlines()
        if line.strip()
    ]


def build_input(path: Path, samples: int, data: str = "") -> list[bytes]:
    chosen = list(itertools.islice(itertools.cycle(fixture_lines(data)), samples))
    path.write_bytes(b"\n".join(chosen) + b"\n")
    return chosen


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# `minitrain tokenize` sets OPENBLAS_NUM_THREADS=1 (numpy's BLAS pool is a thread; with none, the workers
# fork from the process): the runs of `tokenize_file` here are started as the command starts itself.
_CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}


def run_minitrain(inp: Path, out: Path, workers: int, tokenizer: Path) -> dict:
    """`tokenize_file` in this (fresh) process; the tokenizer load timed apart from the steady run.

    CPU: this process (the parent) and its workers. Forked from this process, the workers are reaped by it
    (their CPU is in RUSAGE_CHILDREN); from a forkserver (when this process has threads), the server reaps
    them, and stopping it after the run (waited for) brings their CPU, with its own,
    into this process's RUSAGE_CHILDREN. The run loads the tokenizer itself; that load is measured on its
    own (a second load, imports and file caches warm), with the fingerprint and voice tokens the stage
    computes once per run, and taken out of the parent's CPU.
    """
    import multiprocessing.forkserver

    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import tokenize_file
    from minitrain.data.probe import load_chat_encoder

    load_chat_encoder(str(tokenizer))  # imports, file caches
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    loaded = load_chat_encoder(str(tokenizer))
    # Computed once per run, whatever the file's size (the stage reads them mid-run): a fixed cost like the
    # load, not a per-sample one. The CLI rows keep both.
    _ = (loaded.fingerprint, loaded.turn_token_ids)
    load_wall, load_cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_SELF) - c0

    config = TokenizeConfig(
        input_file=inp, output_file=out, model_name_or_path=str(tokenizer), num_workers=workers
    )
    self0, kids0, t0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = tokenize_file(config)
    wall = time.perf_counter() - t0
    server = multiprocessing.forkserver._forkserver  # private, but the only way to reap its children
    if getattr(server, "_forkserver_pid", None) is not None:
        server._stop()
    parent_cpu = _cpu(resource.RUSAGE_SELF) - self0 - load_cpu
    workers_cpu = _cpu(resource.RUSAGE_CHILDREN) - kids0
    assert result.rejected == 0 and result.dropped == 0
    # The floor right after, in this process (a fresh tokenizer: its word cache cold, as the run's was):
    # the same machine state as the run, so the pair's ratio is steadier than rows timed minutes apart.
    floor_cpu = floor_pass(inp.read_bytes().splitlines(), tokenizer)[0] if workers == 1 else None
    return {
        "samples": result.written,
        "tokens": result.tokens,
        "seconds": result.elapsed_s,  # the streaming part: after the load, pool start-up included
        "seconds_with_load": wall,
        "load_seconds": load_wall,
        "load_cpu_seconds": load_cpu,
        "parent_cpu_seconds": parent_cpu,
        "workers_cpu_seconds": workers_cpu,
        "cpu_seconds": parent_cpu + workers_cpu,
        "cores": workers,
        "paired_floor_cpu_seconds": floor_cpu,
    }


def bench_minitrain(inp: Path, out: Path, workers: int, tokenizer: Path = SMOLLM2, repeats: int = 1) -> dict:
    """`run_minitrain` in a fresh process per repeat (no warm pool, no CPU of earlier runs); the median
    run by wall time."""
    runs = []
    job = orjson.dumps([str(inp), str(out), workers, str(tokenizer)])
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", job],
            capture_output=True,
            check=True,
            env=_CHILD_ENV,
        )
        runs.append(orjson.loads(proc.stdout.splitlines()[-1]))
    runs.sort(key=lambda run: run["seconds"])
    median = dict(runs[len(runs) // 2])
    median["repeats_seconds"] = [run["seconds"] for run in runs]
    median["best_cpu_seconds"] = min(run["cpu_seconds"] for run in runs)  # the least disturbed run
    if workers == 1:  # each run's CPU over its paired floor's
        median["paired_floor_ratios"] = sorted(
            run["cpu_seconds"] / run["paired_floor_cpu_seconds"] for run in runs
        )
    return median


def bench_ceiling(inp: Path, tmp: Path, workers: int, tokenizer: Path, repeats: int = 1) -> list[float]:
    """`workers` independent 1-worker runs started together (no pipes, nothing shared): the streaming
    seconds of the slowest, per repeat. What N encoders at once cost on this machine, whatever the code:
    N x (1 worker alone) / this is the most N workers could gain here (shared caches, SMT siblings,
    neighbours of a virtual machine)."""
    slowest = []
    env = _CHILD_ENV
    for _ in range(repeats):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    orjson.dumps([str(inp), str(tmp / f"ceiling{i}.jsonl"), 1, str(tokenizer)]).decode(),
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            for i in range(workers)
        ]
        runs = [orjson.loads(proc.communicate()[0].splitlines()[-1]) for proc in procs]
        slowest.append(max(run["seconds"] for run in runs))
    return sorted(slowest)


# `python -m minitrain ARGS`, then the forkserver stopped and waited for, so that its CPU and its
# workers' reach this process's RUSAGE_CHILDREN (a server left to exit on its own is never reaped).
_CLI_DRIVER = """
import runpy, sys
from multiprocessing import forkserver
sys.argv = ["minitrain", *sys.argv[1:]]
try:
    runpy.run_module("minitrain", run_name="__main__")
finally:
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        forkserver._forkserver._stop()
"""


def bench_cli(inp: Path, out: Path, workers: int, tokenizer: Path) -> dict:
    """`minitrain tokenize` as a user runs it, end to end (start-up, imports, load, run), in a fresh
    process; CPU from RUSAGE_CHILDREN (the process, its forkserver and the workers it reaped)."""
    args = ["-o", str(out), "--model-name-or-path", str(tokenizer), "--num-workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    c0, t0 = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER, "tokenize", str(inp), *args],
        env=env,
        check=True,
        capture_output=True,
    )
    wall, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0
    samples = tokens = 0
    for line in out.read_bytes().splitlines():
        samples += 1
        tokens += orjson.loads(line)["len"]
    return {"samples": samples, "tokens": tokens, "seconds": wall, "cpu_seconds": cpu, "cores": workers}


# Runs mini_trainer's process_data command with four shims, each printed. Three are needed on this machine:
# its special-token inference asserts on all three fixture tokenizers, so the ChatML delimiters it would
# find are given; transformers 5 returns a dict from apply_chat_template(tokenize=True), where it
# expects ids; its hard-coded num_proc=64 is capped at the cores given (64 processes on 2 cores would
# measure process start-up, not tokenizing). The fourth is in its favour: its gpt-oss check
# (`is_gpt_oss_tokenizer`, 0.7.1-0.9.0) is true for every tokenizer, since it only asks that three strings
# encode, so its labelling calls `tokenizer.encode` four times per token (about 12 ms of CPU per Qwen3
# alpaca sample, 300x its labelling otherwise); the check is given the answer it means (are the three
# gpt-oss tokens in the vocabulary). Its own code is not copied: it is imported from FOLDER.
_MINI_TRAINER_DRIVER = """
import functools, sys
import datasets, transformers
import process_data

def chatml_delimiters(tok):
    delimiters = ("<|im_start|>assistant\\n", "<|im_start|>user\\n")
    return [tok.encode(s, add_special_tokens=False) for s in delimiters]

process_data.infer_special_token_sequences = chatml_delimiters
@functools.cache  # asked once per sample; the vocabulary read once per process
def has_gpt_oss_tokens(tok):
    vocab = tok.get_vocab()
    return all(t in vocab for t in ("<|start|>", "<|channel|>", "<|message|>"))
process_data.is_gpt_oss_model = has_gpt_oss_tokens
base = transformers.PreTrainedTokenizerBase.apply_chat_template
def ids_not_dict(self, *args, **kwargs):
    kwargs.setdefault("return_dict", False)
    return base(self, *args, **kwargs)
transformers.PreTrainedTokenizerBase.apply_chat_template = ids_not_dict
cores = int(sys.argv.pop(1))
for name in ("map", "filter"):
    def capped(self, *args, _f=getattr(datasets.Dataset, name), **kwargs):
        kwargs["num_proc"] = min(kwargs.get("num_proc") or 1, cores)
        return _f(self, *args, **kwargs)
    setattr(datasets.Dataset, name, capped)
sys.argv[0] = "process_data.py"
process_data.app()
"""


def bench_mini_trainer(inp: Path, out: Path, tokenizer: Path, folder: Path, cores: int) -> dict | None:
    """mini_trainer's `process_data.py` command (with the shims above) in a fresh process, end to end:
    tokenizer load, `datasets` map/filter on `cores` processes, to_json.

    None when FOLDER/process_data.py is absent or fails (printed). Its CPU: the process and its pool
    workers (forked and reaped by it), from RUSAGE_CHILDREN.
    """
    script = folder / "process_data.py"
    if not script.is_file():
        print(f"mini_trainer row skipped: no {script} (--mini-trainer-path: the folder holding it)")
        return None
    if not (tokenizer / "tokenizer_config.json").read_text().count("<|im_start|>"):
        print(f"mini_trainer row skipped: {tokenizer.name} is not a ChatML template (the shim gives ChatML)")
        return None
    cache = Path(tempfile.mkdtemp(dir=out.parent))  # fresh per run: no map results cached from an earlier one
    env = {**os.environ, "PYTHONPATH": str(folder), "HF_DATASETS_CACHE": str(cache)}
    args = ["--input-file", str(inp), "--output-file", str(out), "--model-name-or-path", str(tokenizer)]
    c0, t0 = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MINI_TRAINER_DRIVER, str(cores), *args],
        env=env,
        capture_output=True,
        cwd=out.parent,
    )
    wall, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0
    if proc.returncode:
        print(f"mini_trainer row skipped: process_data.py failed ({proc.stderr.decode()[-300:].strip()})")
        return None
    samples = tokens = 0
    for line in out.read_bytes().splitlines():
        samples += 1
        tokens += orjson.loads(line)["len"]
    return {"samples": samples, "tokens": tokens, "seconds": wall, "cpu_seconds": cpu, "cores": cores}


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


def floor_pass(lines: list[bytes], tokenizer: Path, batch: int = 64) -> tuple[float, float, int]:
    """(CPU-s, wall s, tokens) of one render and one batched encode per line, with a freshly loaded
    tokenizer (the load not timed)."""
    from minitrain.data.probe import load_chat_encoder

    encoder = load_chat_encoder(str(tokenizer)).encoder
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = floor_work(encoder, lines, batch)
    return time.process_time() - c0, time.perf_counter() - t0, tokens


def floor_work(encoder: Any, lines: list[bytes], batch: int = 64) -> int:
    """The floor itself: one render and one batched encode per line, no mask; returns the token count."""
    tokens = 0
    for i in range(0, len(lines), batch):
        texts = [encoder.render(orjson.loads(raw)["messages"]) for raw in lines[i : i + batch]]
        # ids only (`encode_batch_fast`: no offsets), the cheapest encode tokenizers offers; on one thread
        encoded = encoder.backend.encode_batch_fast(texts, add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encoded)
    return tokens


def bench_floor(lines: list[bytes], batch: int = 64, tokenizer: Path = SMOLLM2, repeats: int = 1) -> dict:
    """One render and one (batched) encode per sample, nothing else; `repeats` passes, each with a freshly
    loaded tokenizer (its word cache cold, as in a minitrain run's fresh process: a second pass over the
    same texts would encode from a warm cache); the row is the median pass by CPU, `best_cpu_seconds` the
    least disturbed one."""
    passes = sorted(floor_pass(lines, tokenizer, batch) for _ in range(repeats))
    cpu, wall, tokens = passes[len(passes) // 2]
    return {
        "samples": len(lines),
        "tokens": tokens,
        "seconds": wall,
        "cpu_seconds": cpu,
        "best_cpu_seconds": passes[0][0],
        "cores": 1,
    }


def step_work(encoder: Any) -> dict[str, Any]:
    """The stage built up from the floor one cost at a time, each step doing what the ones above it do and
    one thing more: {name: work on a chunk of raw lines}. As the stage does (`pipeline.encode_lines`), each
    step renders all the chunk's lines first and then encodes them; "interleaved" is the one step that
    encodes each text right after its render, for what that order costs."""
    from minitrain.data.offsets import TokenBytes, encode_with_offsets
    from minitrain.data.pipeline import Policy, encode_lines

    backend, tokens = encoder.backend, TokenBytes.of(encoder.backend)

    def rendered(lines: list[bytes], prompts: bool = False) -> list[str]:
        texts = []
        for raw in lines:
            messages = orjson.loads(raw)["messages"]
            texts.append(encoder.render(messages))
            for i, message in enumerate(messages if prompts else ()):
                if message["role"] == "assistant":
                    encoder.render(messages[:i], None, True)
        return texts

    def one_call_each(texts: list[str]) -> int:
        return sum(len(backend.encode_batch_fast([text], add_special_tokens=False)[0].ids) for text in texts)

    def plain_encode(lines: list[bytes]) -> int:  # tokenizers' `encode`: ids and character offsets
        return sum(len(backend.encode(text, add_special_tokens=False).ids) for text in rendered(lines))

    def interleaved(lines: list[bytes]) -> int:
        return sum(one_call_each(rendered([raw])) for raw in lines)

    def with_offsets(lines: list[bytes], prompts: bool = False) -> None:
        for text in rendered(lines, prompts):
            encode_with_offsets(backend, text, tokens)

    return {
        "floor: one render + batched ids-only encode": lambda lines: floor_work(encoder, lines),
        "+ one encode call per text": lambda lines: one_call_each(rendered(lines)),
        ISSUE_FLOOR: plain_encode,
        "  (interleaved: each text encoded right after its render)": interleaved,
        "+ character offsets (minitrain/data/offsets.py)": with_offsets,
        "+ a generation-prompt render per assistant turn": lambda lines: with_offsets(lines, prompts=True),
        "the stage (encode_lines: parse, checks, masks, JSON)": lambda lines: encode_lines(
            encoder, Policy(), list(enumerate(lines, 1))
        ),
    }


def bench_steps(lines: list[bytes], tokenizer: Path, repeats: int, chunk: int = 64) -> dict[str, float]:
    """CPU ms per line of each step of `step_work`, in one process, interleaved chunk by chunk (the order
    reversed every pass, so a disturbance hits every step alike; every step's word cache equally warm)."""
    from minitrain.data.probe import load_chat_encoder

    steps = step_work(load_chat_encoder(str(tokenizer)).encoder)
    for work in steps.values():  # warm-up: the word cache and the per-id tables, for all alike
        work(lines[:chunk])
    spent = dict.fromkeys(steps, 0.0)
    chunks = [lines[i : i + chunk] for i in range(0, len(lines), chunk)]
    for rep in range(repeats):
        for part in chunks:
            for name in list(steps) if rep % 2 else reversed(list(steps)):
                start = time.process_time()
                steps[name](part)
                spent[name] += time.process_time() - start
    return {name: seconds * 1000 / (repeats * len(lines)) for name, seconds in spent.items()}


def floors_at_once(inp: Path, processes: int, tokenizer: Path) -> float:
    """Seconds of the slowest of `processes` floor passes started together in fresh processes, each on
    every `processes`-th line of `inp` (each timed once its tokenizer is loaded: the loads take about the
    same time, so the passes run side by side)."""
    jobs = [orjson.dumps([str(inp), k, processes, str(tokenizer)]) for k in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--floor-child", job], stdout=subprocess.PIPE, env=_CHILD_ENV
        )
        for job in jobs
    ]
    return max(orjson.loads(proc.communicate()[0].splitlines()[-1])["seconds"] for proc in procs)


def _sizes(text: str) -> list[int]:
    """--scale's value: distinct positive sizes, ascending (a line needs two; the floor runs on the last)."""
    try:
        sizes = sorted({int(size) for size in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes such as 1499,10000,30000") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give two or more different positive sizes")
    return sizes


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (samples, seconds)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def bench_scale(sizes: list[int], args: argparse.Namespace, tokenizer: Path) -> None:
    """The end-to-end rows at each size, the floor once: start-up, seconds per sample, the large-file ratio
    and the floor's ceiling against mini_trainer (see the module docstring)."""
    from rich.console import Console
    from rich.table import Table

    per_size: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            inp = Path(tmp) / f"bench_{size}.jsonl"
            lines = build_input(inp, size, args.data)
            runs: dict[str, list[dict]] = {CLI: [], MINI_TRAINER: []}
            for _ in range(args.repeats):
                runs[CLI].append(bench_cli(inp, Path(tmp) / "cli.jsonl", args.workers, tokenizer))
                mini = bench_mini_trainer(
                    inp, Path(tmp) / "mini_trainer.jsonl", tokenizer, args.mini_trainer_path, args.workers
                )
                if mini is None:
                    return
                runs[MINI_TRAINER].append(mini)
            per_size[size] = {}
            for name, done in runs.items():
                done.sort(key=lambda run: run["seconds"])
                seconds = [run["seconds"] for run in done]
                per_size[size][name] = dict(done[len(done) // 2], repeats_seconds=seconds)
            print(
                f"{size:,} samples: minitrain {per_size[size][CLI]['repeats_seconds']} s, mini_trainer "
                f"{per_size[size][MINI_TRAINER]['repeats_seconds']} s",
                flush=True,
            )
        floor = bench_floor(lines, tokenizer=tokenizer, repeats=args.repeats)  # the largest size (last)
        together = sorted(floors_at_once(inp, args.workers, tokenizer) for _ in range(args.repeats))
    floor_per_sample = floor["cpu_seconds"] / floor["samples"] / args.workers  # perfectly spread: wall
    # the floor as it runs on this machine: one process per core at once, each on its share of the lines
    floor_at_once = together[len(together) // 2] / len(lines)

    table = Table(
        title=f"tokenize end to end, {args.tokenizer}, {args.data or 'all'} data, {args.workers} cores "
        f"(load {os.getloadavg()[0]:.1f}); seconds: median of {args.repeats}"
    )
    for col in ("samples", "minitrain s", "mini_trainer s", "minitrain / mini_trainer throughput"):
        table.add_column(col, justify="right")
    for size, rows in per_size.items():
        ours, theirs = rows[CLI]["seconds"], rows[MINI_TRAINER]["seconds"]
        table.add_row(f"{size:,}", f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x")
    Console(width=170).print(table)
    fits = {
        name: _line([(size, rows[name]["seconds"]) for size, rows in per_size.items()])
        for name in (CLI, MINI_TRAINER)
    }
    for name, (start, per) in fits.items():
        print(f"{name}: start-up {start:.2f} s, then {per * 1000:.3f} ms per sample")
    ours, theirs = fits[CLI][1], fits[MINI_TRAINER][1]
    rises = ours > 0 and theirs > 0  # sizes too close for the machine's noise can give a falling line
    if rises:
        print(
            f"on a large file (per-sample seconds only): minitrain {theirs / ours:.2f}x mini_trainer's "
            f"throughput; the floor (one render + one batched encode per sample, "
            f"{floor_per_sample * 1000:.3f} ms per sample: its CPU over {args.workers} cores, nothing else) "
            f"would be {theirs / floor_per_sample:.2f}x; run as {args.workers} processes at once on this "
            f"machine ({floor_at_once * 1000:.3f} ms per sample, median of {args.repeats}) "
            f"{theirs / floor_at_once:.2f}x"
        )
    else:
        print("no per-sample ratio: a fitted line falls (give sizes further apart, e.g. 1499,10000,30000)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {
                "sizes": per_size,
                "fits": {name: {"startup_s": a, "s_per_sample": b} for name, (a, b) in fits.items()},
                "floor": floor,
                "floor_wall_s_per_sample": floor_per_sample,
                "large_file_ratio": theirs / ours if rises else None,
                "floor_ceiling_ratio": theirs / floor_per_sample if rises else None,
                "floor_at_once_s_per_sample": floor_at_once,
                "floor_at_once_ratio": theirs / floor_at_once if rises else None,
                "load_average": os.getloadavg(),
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
        )
    )
    print(f"wrote {args.out}")


def report_steps(args: argparse.Namespace, tokenizer: Path) -> None:
    """--steps: the table and the JSON of bench_steps."""
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        lines = build_input(Path(tmp) / "bench.jsonl", args.samples, args.data)
    spent = bench_steps(lines, tokenizer, max(args.repeats, 1))
    floor = next(iter(spent.values()))
    table = Table(title=f"tokenize built up from the floor, {tokenizer.name}, {args.data or 'all'} data")
    columns = ("step (each does the ones above it too)", "CPU ms per line", "vs the floor", "the step adds")
    for column in columns:
        table.add_column(column, justify="left" if column.startswith("step") else "right")
    before = 0.0
    for name, ms in spent.items():
        added = f"{(ms - before) / floor:+.0%}" if before else ""
        table.add_row(name, f"{ms:.4f}", f"{ms / floor:.2f}x", added)
        if not name.startswith(" "):  # an aside ("  (interleaved ...)") is not built upon
            before = ms
    Console(width=130).print(table)
    stage = list(spent.values())[-1]
    issue = stage / spent[ISSUE_FLOOR]
    print(f"the stage against the issue's floor (one render + tokenizers' encode): {issue:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {
                "tokenizer": tokenizer.name,
                "data": args.data or "all",
                "lines": len(lines),
                "repeats": args.repeats,
                "cpu_ms_per_line": spent,
                "load_average": os.getloadavg(),
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"wrote {args.out}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--floor-child":  # one share of floors_at_once
        inp, k, processes, tokenizer = orjson.loads(sys.argv[2])
        lines = Path(inp).read_bytes().splitlines()[k::processes]
        print(orjson.dumps({"seconds": floor_pass(lines, Path(tokenizer))[1]}).decode())
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # one minitrain run, for bench_minitrain
        inp, out, workers, tokenizer = orjson.loads(sys.argv[2])
        print(orjson.dumps(run_minitrain(Path(inp), Path(out), workers, Path(tokenizer))).decode())
        return
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
    parser.add_argument("--repeats", type=int, default=1, help="minitrain runs per row; the median is shown")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tokenize.json")
    parser.add_argument(
        "--tokenizer", default=SMOLLM2.name, help="a folder under ../shared/fixtures/tokenizers"
    )
    parser.add_argument("--data", default="", help="only fixture files whose name starts with this")
    parser.add_argument(
        "--mini-trainer-path",
        type=Path,
        default=Path("/work/mt-pkgs"),
        help="a folder with mini_trainer's process_data.py (run with it on PYTHONPATH); absent: row skipped",
    )
    parser.add_argument(
        "--scale",
        type=_sizes,
        default=None,
        help="two or more comma-separated sizes: only the end-to-end rows at each, and their start-up and "
        "per-sample fit",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="only the stage built up from the floor one cost at a time, in one process (--samples lines)",
    )
    args = parser.parse_args()
    tokenizer = FIXTURES / "tokenizers" / args.tokenizer
    if args.steps:
        if args.out == parser.get_default("out"):
            args.out = args.out.with_name("tokenize_steps.json")
        report_steps(args, tokenizer)
        return
    if args.scale:
        if args.out == parser.get_default("out"):
            args.out = args.out.with_name("tokenize_scale.json")
        bench_scale(args.scale, args, tokenizer)
        return

    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "bench.jsonl"
        lines = build_input(inp, args.samples, args.data)
        one, many = "minitrain tokenize, 1 worker", f"minitrain tokenize, {args.workers} workers"
        rows = {
            "floor (render + batched encode, no mask)": bench_floor(
                lines, tokenizer=tokenizer, repeats=args.repeats
            ),
            one: bench_minitrain(inp, Path(tmp) / "one.jsonl", 1, tokenizer, args.repeats),
            many: bench_minitrain(inp, Path(tmp) / "many.jsonl", args.workers, tokenizer, args.repeats),
            # every k-th line, so the naive subset has the same mix of single- and multi-turn samples
            "naive (apply_chat_template + per-turn prefixes)": bench_naive(
                lines[:: max(1, len(lines) // args.naive_samples)], tokenizer
            ),
        }
        ceiling = bench_ceiling(inp, Path(tmp), args.workers, tokenizer, args.repeats)
        # end to end, --repeats runs of each, alternating (a disturbance hits both sides alike): the median
        ends: dict[str, list[dict]] = {CLI: [], MINI_TRAINER: []}
        for _ in range(args.repeats):
            ends[CLI].append(bench_cli(inp, Path(tmp) / "cli.jsonl", args.workers, tokenizer))
            mini = bench_mini_trainer(
                inp, Path(tmp) / "mini_trainer.jsonl", tokenizer, args.mini_trainer_path, args.workers
            )
            if mini is not None:
                ends[MINI_TRAINER].append(mini)
        if ends[MINI_TRAINER]:
            print(
                "mini_trainer process_data.py ran with shims: ChatML delimiters given (its inference "
                "asserts on these tokenizers), apply_chat_template ids (transformers 5), num_proc 64 "
                f"capped at {args.workers}, its gpt-oss check answered by the vocabulary (as published it "
                "holds for every tokenizer and encodes four strings per token)"
            )
        for name, runs in ends.items():
            if runs:
                runs.sort(key=lambda run: run["seconds"])
                rows[name] = dict(runs[len(runs) // 2], repeats_seconds=[run["seconds"] for run in runs])
    for row in rows.values():
        row["samples_per_s"] = row["samples"] / row["seconds"]
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        # per core: samples per CPU-second of all processes of the variant, the tokenizer load excluded
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
    columns = (
        "variant",
        "samples",
        "samples/s (wall)",
        "tokens/s (wall)",
        "samples per CPU-s",
        "floor/this per core",
        "CPU ms/sample: parent | workers",
    )
    for col in columns:
        table.add_column(col, justify="right" if col != "variant" else "left")
    for name, row in rows.items():
        split = ""
        if "parent_cpu_seconds" in row:
            per = 1000 / row["samples"]
            split = f"{row['parent_cpu_seconds'] * per:.3f} | {row['workers_cpu_seconds'] * per:.3f}"
        table.add_row(
            name,
            f"{row['samples']:,}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['samples_per_cpu_s']:,.0f}",
            f"{row['floor_over_this_per_core']:.2f}x",
            split,
        )
    Console(width=170).print(table)
    naive = rows["naive (apply_chat_template + per-turn prefixes)"]
    print(
        f"tokenizer load, fingerprint and voice tokens (once per run; not in the CPU of the rows above): "
        f"{rows[one]['load_seconds']:.2f} s wall, "
        f"{rows[one]['load_cpu_seconds']:.2f} CPU-s"
    )
    print(
        f"{args.workers} workers vs 1, wall throughput (median of {args.repeats}): "
        f"{rows[many]['samples_per_s'] / rows[one]['samples_per_s']:.2f}x "
        f"(streaming seconds, 1 worker {rows[one]['repeats_seconds']}, "
        f"{args.workers} workers {rows[many]['repeats_seconds']})"
    )
    floor_row = rows["floor (render + batched encode, no mask)"]
    print(
        f"cost vs the floor per CPU-second, the least disturbed of {args.repeats} runs each (this shared "
        f"machine's CPU-seconds swing by a third between runs): 1 worker "
        f"{rows[one]['best_cpu_seconds'] / floor_row['best_cpu_seconds']:.2f}x, {args.workers} workers "
        f"{rows[many]['best_cpu_seconds'] / floor_row['best_cpu_seconds']:.2f}x"
    )
    paired = rows[one]["paired_floor_ratios"]
    print(
        f"cost vs the floor per CPU-second, each 1-worker run over a floor pass right after it in the same "
        f"process: median {paired[len(paired) // 2]:.2f}x (runs: {[round(x, 2) for x in paired]})"
    )
    alone, together = rows[one]["seconds"], ceiling[len(ceiling) // 2]
    print(
        f"this machine's ceiling for {args.workers} workers: {args.workers} independent 1-worker runs at "
        f"once took {together:.2f} s (median of {args.repeats}: {[round(x, 2) for x in ceiling]}) where one "
        f"alone took {alone:.2f} s, so at most {args.workers * alone / together:.2f}x for any code"
    )
    if MINI_TRAINER in rows:
        mini, cli = rows[MINI_TRAINER], rows[CLI]
        print(
            f"minitrain tokenize vs mini_trainer process_data.py, both end to end on the same cores (median "
            f"of {args.repeats} each): wall {cli['samples_per_s'] / mini['samples_per_s']:.2f}x, per "
            f"CPU-second {cli['samples_per_cpu_s'] / mini['samples_per_cpu_s']:.2f}x (seconds: minitrain "
            f"{[round(x, 2) for x in cli['repeats_seconds']]}, mini_trainer "
            f"{[round(x, 2) for x in mini['repeats_seconds']]})"
        )
    print(
        "minitrain (1 worker) vs naive, per CPU-second: "
        f"{rows[one]['samples_per_cpu_s'] / naive['samples_per_cpu_s']:.1f}x faster"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {
                "samples": args.samples,
                "load_average": os.getloadavg(),
                "rows": rows,
                "ceiling": {"workers": args.workers, "slowest_seconds": ceiling},
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
