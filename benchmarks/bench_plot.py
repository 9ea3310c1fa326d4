"""Benchmark of `minitrain plot` on a large metrics file (100k optimizer steps by default).

Writes a synthetic training_metrics_0.jsonl shaped like `minitrain train` writes it (every key of the
run-directory contract, ISO timestamps, an eval row every 1000 steps), then measures:

  end to end   `python -m minitrain plot FILE ...` in a fresh process, as a user runs it (median of
               --repeats): terminal default, terminal with --smooth 0.9, --x time, and -o png/svg/pdf
  stages       in-process: reading, building the curves (step / time axis), terminal rendering, the
               PNG with min/max decimation vs every point drawn, and a --watch refresh after 100 more
               lines (incremental read) vs reading the whole file again

    python benchmarks/bench_plot.py [--lines 100000] [--repeats 3] [--out benchmarks/results/plot.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitrain.config import PlotConfig  # noqa: E402
from minitrain.plot.curves import build_curves  # noqa: E402
from minitrain.plot.image import draw_image  # noqa: E402
from minitrain.plot.terminal import TerminalPlot  # noqa: E402
from minitrain.rundir import METRICS_FILE, MetricsFile  # noqa: E402


def write_run(path: Path, n: int, start: int = 1) -> None:
    """n metric rows (steps start..start+n-1) appended to path; an eval row every 1000 steps."""
    rng = np.random.default_rng(start)
    t0 = 1_780_000_000.0
    with open(path, "ab") as f:
        for step in range(start, start + n):
            row = {
                "step": step,
                "lr": 2e-5 * min(1.0, step / 1000),
                "grad_norm": float(1 + rng.random()),
                "loss": float(2 * math.exp(-step / 30000) + 0.3 * rng.random()),
                "num_samples": 8,
                "num_loss_counted_tokens": 3000,
                "num_total_tokens": int(4000 + rng.integers(500)),
                "grad_accum": 1,
                "time_per_batch": 0.5,
                "tokens_per_second": float(8000 + 500 * rng.random()),
                "samples_per_second": 16.0,
                "total_samples_accumulated": 8 * step,
                "peak_memory_usage_GB": 1.5,
                "epoch": step // 10000,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + 0.5 * step)) + ".250000",
            }
            f.write(orjson.dumps(row) + b"\n")
            if step % 1000 == 0:
                f.write(
                    orjson.dumps(
                        {"step": step, "eval_loss": row["loss"], "total_samples_accumulated": 8 * step}
                    )
                )
                f.write(b"\n")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: steadier than wall time on a shared machine."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), cpu_seconds()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(cpu_seconds() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plot.json")
    args = parser.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "run" / METRICS_FILE
        path.parent.mkdir()
        write_run(path, args.lines)
        size_mb = path.stat().st_size / 1e6
        results: dict[str, dict[str, dict[str, float]]] = {"end to end": {}, "stages": {}}

        def cli(*extra: str) -> None:
            env = dict(os.environ, COLUMNS="120")
            cmd = [sys.executable, "-m", "minitrain", "plot", str(path.parent), *extra]
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env=env)

        for name, extra in [
            ("terminal", []),
            ("terminal --smooth 0.9", ["--smooth", "0.9"]),
            ("terminal --x time", ["--x", "time"]),
            ("-o png --smooth 0.9", ["--smooth", "0.9", "-o", str(tmp / "c.png")]),
            ("-o svg --smooth 0.9", ["--smooth", "0.9", "-o", str(tmp / "c.svg")]),
            ("-o pdf --smooth 0.9", ["--smooth", "0.9", "-o", str(tmp / "c.pdf")]),
        ]:
            results["end to end"][name] = timed(lambda extra=extra: cli(*extra), args.repeats)
        results["end to end"]["python -c pass (interpreter floor)"] = timed(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeats
        )

        def read() -> MetricsFile:
            f = MetricsFile(path)
            f.refresh()
            return f

        rows = read().rows
        step = PlotConfig(runs=(path,), smooth=0.9)
        clock = PlotConfig(runs=(path,), smooth=0.9, x="time")
        curves = build_curves([("run", rows)], step)
        stages = results["stages"]
        stages["read + parse (orjson)"] = timed(read, args.repeats)
        stages["curves, --x step, --smooth 0.9"] = timed(
            lambda: build_curves([("run", rows)], step), args.repeats
        )
        stages["curves, --x time (ISO timestamps)"] = timed(
            lambda: build_curves([("run", rows)], clock), args.repeats
        )
        stages["terminal render, 120 columns"] = timed(
            lambda: Console(file=io.StringIO(), width=120).print(TerminalPlot(curves)), args.repeats
        )
        draw_image(curves, tmp / "warm.png")  # imports matplotlib and builds the font cache once
        stages["png, decimated (band + min/max)"] = timed(
            lambda: draw_image(curves, tmp / "d.png"), args.repeats
        )
        stages["png, every point"] = timed(
            lambda: draw_image(curves, tmp / "f.png", buckets=None), args.repeats
        )

        live = read()
        grown = 0

        def grow_and_refresh() -> None:
            nonlocal grown
            write_run(path, 100, start=args.lines + 1 + grown)
            grown += 100
            live.refresh()

        stages["watch refresh, +100 lines (incremental)"] = timed(grow_and_refresh, args.repeats)
        stages["watch refresh, +100 lines (whole file again)"] = timed(read, args.repeats)

    def ratio(a: dict[str, float], b: dict[str, float]) -> float:
        return a["wall_s"] / b["wall_s"]

    ratios = {
        "png: every point / decimated": ratio(
            stages["png, every point"], stages["png, decimated (band + min/max)"]
        ),
        "watch refresh: whole file / incremental": ratio(
            stages["watch refresh, +100 lines (whole file again)"],
            stages["watch refresh, +100 lines (incremental)"],
        ),
        "end to end: png / terminal": ratio(
            results["end to end"]["-o png --smooth 0.9"], results["end to end"]["terminal"]
        ),
    }
    load = os.getloadavg()[0]
    table = Table(
        title=f"minitrain plot: {args.lines} lines ({size_mb:.1f} MB), median of {args.repeats}, "
        f"{os.cpu_count()} CPUs, load {load:.1f}"
    )
    table.add_column("group")
    table.add_column("what")
    table.add_column("wall s", justify="right")
    table.add_column("cpu s", justify="right")
    for group, entries in results.items():
        for what, t in entries.items():
            table.add_row(group, what, f"{t['wall_s']:.3f}", f"{t['cpu_s']:.3f}")
    for what, r in ratios.items():
        table.add_row("ratio (wall)", what, f"{r:.1f}x", "")
    console.print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"lines": args.lines, "file_mb": size_mb, "repeats": args.repeats, **results, "ratios": ratios}
    report["cpu_count"], report["load_average_1min"] = os.cpu_count(), load
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
