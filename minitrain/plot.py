"""Training curves from one or several runs: read metrics safely, pick an x-axis, smooth, draw.

Owns the reading side of the run directory's metrics file and both renderers of `minitrain plot`:

    RUN/training_metrics_0.jsonl   one JSON object per optimizer step, appended and flushed by `minitrain
                                   train` (step, lr, grad_norm, loss, num_total_tokens, time_per_batch,
                                   tokens_per_second, total_samples_accumulated, timestamp, ...); rows that
                                   carry `eval_loss` may hold little else (step, eval_loss, samples).

Reading is incremental and safe against a writer that is still running: only complete lines are
consumed (a last line without its newline is taken only if it parses, and is read again on the next
refresh), a malformed line anywhere else is a `UserError` naming FILE:LINE, and `NaN`/`Infinity` written
by Python's json module are accepted.

Two renderers: an image through matplotlib (imported only when an image is asked for, drawn on a bare
`Figure` with no pyplot, so no global backend is touched; dense lines are decimated to the first, last,
lowest and highest point of 2000 buckets, more than a panel has pixel columns, and a dense faded raw
curve is filled as its min/max band, so the image looks the same and is cheaper to draw at 100k points)
and a terminal plot drawn here with braille characters through rich. Trade-off: the terminal renderer is ~200 lines of our own instead of plotext,
for 2x4 dots per character (plotext's default is 2x2 blocks), a transparent background, 1-2-5 ticks, a
legend outside the data, no global figure state, and a rich renderable that lays itself out at the width
of whatever console prints it. Nothing here imports torch: a 100k-line file takes about 0.9 s of CPU
from the command line to the terminal and 1.8 s to a PNG (benchmarks/bench_plot.py).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from minitrain.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILENAME = "training_metrics_0.jsonl"
DEFAULT_METRICS = ("loss", "lr", "grad_norm", "tokens_per_second")
EVAL_METRIC = "eval_loss"  # drawn on the `loss` panel when present
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
# --x choice -> axis label; the column behind each is in `_x_column`.
X_AXES = {"step": "step", "samples": "samples", "tokens": "tokens", "time": "time"}
X_SOURCES = {  # what each --x reads, for error messages
    "step": "'step'",
    "samples": "'total_samples_accumulated'",
    "tokens": "'num_total_tokens'",
    "time": "'timestamp' or 'time_per_batch'",
}
# lr is a schedule, not a measurement (smoothing it would only add lag); eval_loss is sparse.
UNSMOOTHED = frozenset({"lr", EVAL_METRIC})
# matplotlib's tab10, so a run has the same colour in the image and in the terminal.
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass(frozen=True, kw_only=True)
class PlotConfig:
    """What `minitrain plot` draws: runs, metrics (empty = the defaults), x-axis, smoothing, outputs."""

    runs: tuple[Path, ...]
    metrics: tuple[str, ...] = ()
    x: str = "step"
    smooth: float = 0.0
    output: Path | None = None
    terminal: bool = False

    def __post_init__(self) -> None:
        if not self.runs:
            raise UserError("no run given: pass a training output directory or a metrics .jsonl file")
        if self.x not in X_AXES:
            raise UserError(f"--x {self.x!r} is not an x-axis; choose one of: {', '.join(X_AXES)}")
        if not 0.0 <= self.smooth <= 0.99:
            raise UserError(f"--smooth {self.smooth} is out of range; use a value from 0.0 (off) to 0.99")
        if self.output is not None and self.output.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(
                f"-o {self.output}: unknown image type {self.output.suffix!r}; end it in {', '.join(IMAGE_SUFFIXES)}"
            )
        if self.output is not None and not self.output.parent.is_dir():  # before any run is read or drawn
            raise UserError(
                f"-o {self.output}: directory {self.output.parent} does not exist; create it first"
            )

    @property
    def draws_terminal(self) -> bool:
        """True when the terminal plot is wanted: no image asked for, or --terminal."""
        return self.terminal or self.output is None


# ---------------------------------------------------------------------------------------------------
# Reading


def _parse_line(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        import json  # Python's json writes NaN/Infinity, which orjson rejects; json reads them back

        return json.loads(raw)


class MetricsFile:
    """One metrics JSONL read incrementally: `refresh()` appends the complete lines written since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset = 0  # bytes consumed: always just after a newline
        self._lines = 0  # lines consumed (for FILE:LINE in errors)
        self._provisional = False  # rows[-1] came from a last line without its newline
        self._size = -1
        self._head = b""  # the file's first bytes: a new run rewriting the file changes them

    def refresh(self) -> bool:
        """Read what was appended since the last call; True when the rows changed."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(
                f"{self.path} does not exist; pass a run directory or a metrics .jsonl file"
            ) from None
        if size == self._size:
            return False
        with open(self.path, "rb") as f:
            head = f.read(min(size, 4096))
            if size < self._offset or not head.startswith(self._head):  # a new run rewrote the file
                self.rows, self._offset, self._lines, self._provisional, self._head = [], 0, 0, False, b""
            if not self._head:
                self._head = head[: head.find(b"\n") + 1]  # the first complete line, b"" until there is one
            self._size = size
            if self._provisional:
                self.rows.pop()
                self._provisional = False
            f.seek(self._offset)
            data = f.read(size - self._offset)
        end = data.rfind(b"\n") + 1  # 0 when no complete line was appended
        for raw in data[:end].split(b"\n")[:-1]:
            self._lines += 1
            if not raw.strip():
                continue
            try:
                row = _parse_line(raw)
            except ValueError as err:
                raise UserError(
                    f"{self.path}:{self._lines}: not a JSON line ({err}); fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{self.path}:{self._lines}: expected a JSON object, got {type(row).__name__}"
                )
            self.rows.append(row)
        self._offset += end
        tail = data[end:]
        if tail.strip():  # still being written, or a finished file without a final newline
            try:
                row = _parse_line(tail)
            except ValueError:
                row = None  # incomplete: skipped until its newline arrives
            if isinstance(row, dict):
                self.rows.append(row)
                self._provisional = True
        return True


def metrics_path(run: Path) -> Path:
    """The metrics file of RUN: RUN itself when it is a file, else RUN/training_metrics_0.jsonl."""
    if run.is_dir():
        return run / METRICS_FILENAME
    if run.exists():
        return run
    raise UserError(f"{run} does not exist; pass a training output directory or a metrics .jsonl file")


def run_names(paths: Sequence[Path]) -> list[str]:
    """Legend names: the directory name (or file stem), with parents prepended until they differ."""
    full = []
    for p in paths:
        p = p.resolve()
        if p.is_file() and p.name == METRICS_FILENAME:
            p = p.parent
        parts = [p.name if p.is_dir() or p.suffix != ".jsonl" else p.stem, *reversed(p.parent.parts)]
        full.append([part for part in parts if part not in ("", "/")] or [str(p)])
    depth = [1] * len(full)
    while True:
        names = ["/".join(reversed(parts[:d])) for parts, d in zip(full, depth, strict=True)]
        grow = [  # the same name, a different path: show one more parent
            i
            for i, n in enumerate(names)
            if depth[i] < len(full[i]) and any(m == n and full[j] != full[i] for j, m in enumerate(names))
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # the same path given twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} ({seen[n]})"
    return names


# ---------------------------------------------------------------------------------------------------
# Columns, x-axes, smoothing


def _column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """float64 [len(rows)]: the numeric values of `key`, NaN where absent or not a number."""
    nan = math.nan
    return np.fromiter(
        ((v if (t := type(v)) is float or t is int else nan) for v in (r.get(key) for r in rows)),
        dtype=np.float64,
        count=len(rows),
    )


def _forward_fill(a: np.ndarray) -> np.ndarray:
    """Carry the last finite value over NaNs (eval rows logged between steps sit at the last step)."""
    idx = np.where(np.isfinite(a), np.arange(len(a)), 0)
    np.maximum.accumulate(idx, out=idx)
    return a[idx]


def _timestamps(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """Seconds since the epoch from `timestamp` (a number or an ISO 8601 string), NaN where absent."""
    out = np.full(len(rows), math.nan)
    cache: dict[str, float] = {}
    for i, r in enumerate(rows):
        v = r.get("timestamp")
        if type(v) is float or type(v) is int:
            out[i] = v
        elif isinstance(v, str):
            if v not in cache:
                try:
                    cache[v] = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    cache[v] = math.nan
            out[i] = cache[v]
    return out


def _x_column(rows: Sequence[dict[str, Any]], axis: str) -> np.ndarray | None:
    """float64 [len(rows)] x values for --x `axis`, or None when this run cannot provide that axis."""
    if axis == "step":
        x = _column(rows, "step")
    elif axis == "samples":
        x = _column(rows, "total_samples_accumulated")
    elif axis == "tokens":
        tokens = _column(rows, "num_total_tokens")
        if not np.isfinite(tokens).any():
            return None
        return np.cumsum(np.nan_to_num(tokens, nan=0.0))  # rows without a count (eval rows) add nothing
    else:
        stamps = _timestamps(rows)
        if np.isfinite(stamps).any():
            x = stamps - stamps[np.isfinite(stamps)][0]
        else:
            per_batch = _column(rows, "time_per_batch")
            if not np.isfinite(per_batch).any():
                return None
            return np.cumsum(np.nan_to_num(per_batch, nan=0.0))
    return _forward_fill(x) if np.isfinite(x).any() else None


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's): s_t = w s_{t-1} + (1-w) y_t, / (1 - w^t).

    The debiasing makes the first points an average of what came so far instead of a pull towards 0;
    weight 0 returns y unchanged.
    """
    out = []
    last, debias = 0.0, 1.0
    for v in y.tolist():
        last = weight * last + (1.0 - weight) * v
        debias *= weight
        out.append(last / (1.0 - debias))
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------
# Curves: what both renderers draw


@dataclass(frozen=True, eq=False)  # arrays inside: compare by identity
class Line:
    """One curve: a run's values of one metric, finite points only, with its smoothed version."""

    run: str
    metric: str
    color: str
    x: np.ndarray  # float64 [n]
    y: np.ndarray  # float64 [n], raw
    smoothed: np.ndarray | None  # float64 [n] or None when not smoothed

    @property
    def is_eval(self) -> bool:
        return self.metric == EVAL_METRIC


@dataclass(frozen=True)
class Panel:
    """One metric: a title and a line per run (plus each run's eval_loss on the loss panel)."""

    metric: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Curves:
    """Everything that gets drawn, renderer-independent."""

    panels: tuple[Panel, ...]
    runs: tuple[str, ...]
    x_label: str
    smooth: float

    def x_range(self) -> tuple[float, float]:
        xs = [(float(ln.x[0]), float(ln.x[-1])) for p in self.panels for ln in p.lines if len(ln.x)]
        return (min(a for a, _ in xs), max(b for _, b in xs)) if xs else (0.0, 1.0)


def _available(runs: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    keys: set[str] = set()
    for rows in runs:
        keys.update(k for r in rows for k, v in r.items() if type(v) in (int, float))
    return sorted(keys)


def build_curves(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], config: PlotConfig) -> Curves:
    """Turn (name, rows) per run into panels of lines; every user mistake is a one-line UserError."""
    for name, rows in runs:
        if not rows:
            raise UserError(
                f"run {name} has no complete metrics line yet; wait for its first step (or use --watch)"
            )

    cache: dict[tuple[int, str], np.ndarray] = {}

    def column(i: int, key: str) -> np.ndarray:
        if (i, key) not in cache:
            cache[(i, key)] = _column(runs[i][1], key)
        return cache[(i, key)]

    def present(metric: str) -> bool:
        return any(np.isfinite(column(i, metric)).any() for i in range(len(runs)))

    metrics = list(dict.fromkeys(config.metrics))
    for metric in metrics:
        if not present(metric):
            available = _available([rows for _, rows in runs])
            raise UserError(f"unknown metric {metric!r}; available: {', '.join(available)}")
    if not metrics:
        metrics = [m for m in DEFAULT_METRICS if present(m)]
        if not metrics:
            available = _available([rows for _, rows in runs])
            raise UserError(
                f"none of the default metrics ({', '.join(DEFAULT_METRICS)}) is in these runs; "
                f"pick some with --metric: {', '.join(available)}"
            )

    xs = [_x_column(rows, config.x) for _, rows in runs]
    missing = [name for (name, _), x in zip(runs, xs, strict=True) if x is None]
    if missing:
        shared = [a for a in X_AXES if all(_x_column(rows, a) is not None for _, rows in runs)]
        fix = f"use --x {' or --x '.join(shared)}" if shared else "no x-axis is shared by all of these runs"
        verb = "has" if len(missing) == 1 else "have"
        raise UserError(
            f"no common x-axis for --x {config.x}: {', '.join(missing)} {verb} no {X_SOURCES[config.x]}; {fix}"
        )

    x_label = X_AXES[config.x]
    if config.x == "time":  # one unit for all runs, so they stay comparable
        span = max(float(np.nanmax(x)) for x in xs)
        unit, scale = ("h", 3600.0) if span > 7200 else ("min", 60.0) if span > 180 else ("s", 1.0)
        xs = [x / scale for x in xs]
        x_label = f"time ({unit})"

    with_eval = "loss" in metrics and EVAL_METRIC not in metrics and present(EVAL_METRIC)
    panels = []
    for metric in metrics:
        lines = []
        for i, ((name, _rows), x) in enumerate(zip(runs, xs, strict=True)):
            for m in (metric, EVAL_METRIC) if metric == "loss" and with_eval else (metric,):
                y = column(i, m)
                keep = np.isfinite(x) & np.isfinite(y)
                if not keep.any():
                    continue
                xk, yk = x[keep], y[keep]
                smooth = config.smooth > 0 and m not in UNSMOOTHED
                lines.append(
                    Line(name, m, COLORS[i % len(COLORS)], xk, yk, ema(yk, config.smooth) if smooth else None)
                )
        panels.append(Panel(metric, tuple(lines)))
    return Curves(tuple(panels), tuple(name for name, _ in runs), x_label, config.smooth)


# ---------------------------------------------------------------------------------------------------
# Image (matplotlib, imported here only)

IMAGE_BUCKETS = 2000  # > the pixel columns of a panel (about 700 at 120 dpi), so decimation is invisible


def decimate(x: np.ndarray, y: np.ndarray, buckets: int = IMAGE_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per run of consecutive points, the first, last, lowest and highest (in their order).

    A line drawn through these covers the same pixels as the full line when `buckets` exceeds the pixel
    columns, at a fraction of the cost: a PNG of four panels of 100k points takes about 1.7 s of CPU with
    every point drawn and 0.5 s decimated (benchmarks/results/plot.json).
    """
    n = len(x)
    if n <= 4 * buckets:
        return x, y
    k = math.ceil(n / buckets)
    full = (n // k) * k
    base = np.arange(0, full, k)
    blocks = y[:full].reshape(-1, k)
    keep = [base, base + k - 1, base + blocks.argmin(axis=1), base + blocks.argmax(axis=1)]
    if full < n:
        rest = y[full:]
        keep.append(np.array([full, n - 1, full + rest.argmin(), full + rest.argmax()]))
    idx = np.unique(np.concatenate(keep))  # sorted: the line keeps its order
    return x[idx], y[idx]


def envelope(x: np.ndarray, y: np.ndarray, buckets: int = IMAGE_BUCKETS) -> tuple[np.ndarray, ...]:
    """(x, low, high) per run of consecutive points, closed at the last x: a dense line's band.

    Filling it draws the pixels a dense faded line would cover, about twice as fast as the line itself.
    """
    starts = np.arange(0, len(x), math.ceil(len(x) / buckets))
    lo, hi = np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts)
    return np.r_[x[starts], x[-1]], np.r_[lo, lo[-1]], np.r_[hi, hi[-1]]


def draw_image(curves: Curves, output: Path, *, buckets: int | None = IMAGE_BUCKETS) -> Figure:
    """Draw one panel per metric, one line per run, and write it to `output` (.png/.svg/.pdf) atomically.

    `buckets`: decimate dense lines to that many min/max buckets (None: draw every point).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    def thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x, y) if buckets is None else decimate(x, y, buckets)

    n = len(curves.panels)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.4 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    for ax, panel in zip(axes, curves.panels, strict=False):
        ax.set_title(panel.metric)
        ax.set_xlabel(curves.x_label)
        ax.grid(True, alpha=0.3)
        for line in panel.lines:
            gid = f"{line.run}:{line.metric}"  # tests and scripts find the lines by it
            if line.is_eval:
                ax.plot(line.x, line.y, color=line.color, ls="--", marker="o", ms=3, lw=1.0, gid=gid)
            elif len(line.x) == 1:  # a run one step old: a line through one point would draw nothing
                ax.plot(line.x, line.y, color=line.color, marker="o", ms=4, gid=gid)
            elif line.smoothed is not None:
                if buckets is not None and len(line.x) > 4 * buckets:  # dense: the raw cloud as a band
                    band = ax.fill_between(
                        *envelope(line.x, line.y, buckets), color=line.color, alpha=0.25, lw=0
                    )
                    band.set_gid(gid + ":raw")
                else:
                    ax.plot(line.x, line.y, color=line.color, alpha=0.25, lw=0.8, gid=gid + ":raw")
                ax.plot(*thin(line.x, line.smoothed), color=line.color, lw=1.5, gid=gid)
            else:
                ax.plot(*thin(line.x, line.y), color=line.color, lw=1.2, gid=gid)
        if not panel.lines:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    handles = [
        Line2D([], [], color=COLORS[i % len(COLORS)], lw=1.5, label=r) for i, r in enumerate(curves.runs)
    ]
    if any(line.is_eval for p in curves.panels for line in p.lines):
        handles.append(Line2D([], [], color="gray", ls="--", marker="o", ms=3, label=EVAL_METRIC))
    title = f"EMA {curves.smooth:g} (raw faded)" if curves.smooth > 0 else None
    fig.legend(
        handles=handles, loc="outside upper center", ncols=min(len(handles), 5), frameon=False, title=title
    )

    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format=output.suffix.lower()[1:], dpi=120)
        os.replace(tmp, output)  # an image viewer watching the file never sees half of it
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"-o {output}: cannot write the image ({err.strerror})") from None
    return fig


# ---------------------------------------------------------------------------------------------------
# Terminal (braille through rich)

# Braille dot bits, indexed [row 0..3][col 0..1] within one character cell.
_BRAILLE_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint8)


def nice_ticks(lo: float, hi: float, max_ticks: int) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) inside [lo, hi], at most `max_ticks` of them."""
    if not hi > lo or max_ticks < 2:
        return [lo]
    raw = (hi - lo) / (max_ticks - 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _decimals(step: float) -> int:
    """Digits after the point that show multiples of `step` exactly (0.25 -> 2, 0.5 -> 1, 20 -> 0)."""
    d = max(0, -math.floor(math.log10(step) + 1e-9))
    while d < 12 and abs(round(step, d) - step) > step * 1e-6:
        d += 1
    return d


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Short labels, one style per axis, at the precision the spacing needs: 0.25, 12.5k, 2M, 3e-5."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else abs(ticks[0]) or 1.0
    top = max(abs(t) for t in ticks)
    for div, suffix, threshold in ((1e9, "B", 1e9), (1e6, "M", 1e6), (1e3, "k", 1e4)):
        if top >= threshold:
            d = min(_decimals(step / div), 3)
            return ["0" if t == 0 else f"{t / div:.{d}f}{suffix}" for t in ticks]
    if step < 1e-3:
        out = []
        for t in ticks:
            mantissa, exp = f"{t:.2e}".split("e")
            out.append("0" if t == 0 else f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}")
        return out
    d = _decimals(step)
    return ["0" if t == 0 else f"{t:.{d}f}" for t in ticks]


class _Canvas:
    """A width x height grid of braille cells; each cell shows the style of the last series drawn in it."""

    def __init__(
        self, width: int, height: int, x_range: tuple[float, float], y_range: tuple[float, float]
    ) -> None:
        self.width, self.height = width, height
        self.bits = np.zeros((height, width), dtype=np.uint8)
        self.style = np.full((height, width), -1, dtype=np.int32)
        self.layer = np.zeros((height, width), dtype=np.int8)  # 0: empty or faded, 1: a main line
        self.marks: dict[tuple[int, int], int] = {}  # (row, col) -> style: a marker character instead of dots
        self.styles: list[str] = []
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range

    def _dots(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dot coordinates (col in 0..2W-1, row in 0..4H-1 from the top) of data points."""
        cols, rows = 2 * self.width, 4 * self.height
        fx = (x - self.x0) / (self.x1 - self.x0) if self.x1 > self.x0 else np.full(len(x), 0.5)
        fy = (self.y1 - y) / (self.y1 - self.y0) if self.y1 > self.y0 else np.full(len(y), 0.5)
        return (np.clip(fx, 0, 1) * (cols - 1), np.clip(fy, 0, 1) * (rows - 1))

    def line(self, x: np.ndarray, y: np.ndarray, style: str, *, faded: bool = False) -> None:
        """Draw the polyline through (x, y), sorted by x: per dot column the min..max of its points, plus
        the segments between neighbouring columns, so 100k points cost O(columns) Python work."""
        dx, dy = self._dots(x, y)
        order = np.argsort(dx, kind="stable")
        cx = np.rint(dx[order]).astype(np.int64)
        ry = dy[order]
        starts = np.flatnonzero(np.r_[True, cx[1:] != cx[:-1]])
        col = cx[starts]
        lo, hi = np.minimum.reduceat(ry, starts), np.maximum.reduceat(ry, starts)
        first, last = ry[starts], ry[np.r_[starts[1:], len(ry)] - 1]
        dots = np.zeros((4 * self.height, 2 * self.width), dtype=bool)

        def span(c: int, a: float, b: float) -> None:
            dots[int(round(min(a, b))) : int(round(max(a, b))) + 1, c] = True

        for k in range(len(col)):
            span(int(col[k]), lo[k], hi[k])
            if k:  # segment from the previous column's last point to this column's first
                c0, c1, r0, r1 = int(col[k - 1]), int(col[k]), last[k - 1], first[k]

                def at(t: float, c0: int = c0, c1: int = c1, r0: float = r0, r1: float = r1) -> float:
                    return r0 + (r1 - r0) * (t - c0) / (c1 - c0)

                for c in range(c0, c1 + 1):
                    span(c, at(max(c - 0.5, c0)), at(min(c + 0.5, c1)))
        self._stamp(dots, style, layer=0 if faded else 1)

    def points(self, x: np.ndarray, y: np.ndarray, style: str) -> None:
        """A marker character at each point (sparse series such as eval_loss)."""
        dx, dy = self._dots(x, y)
        index = self._style_index(style)
        for c, r in zip((dx // 2).astype(int), (dy // 4).astype(int), strict=True):
            self.marks[(int(r), int(c))] = index

    def _style_index(self, style: str) -> int:
        self.styles.append(style)
        return len(self.styles) - 1

    def _stamp(self, dots: np.ndarray, style: str, *, layer: int) -> None:
        """Merge a series' dots into the cells; a main line replaces the faded dots of the cells it crosses
        (so it stays a crisp line over the raw cloud) and merges with other main lines."""
        cells = dots.reshape(self.height, 4, self.width, 2)
        bits = np.einsum("hrwc,rc->hw", cells.astype(np.uint8), _BRAILLE_BITS).astype(np.uint8)
        hit = bits > 0
        self.bits[hit & (self.layer < layer)] = 0
        self.bits |= bits
        self.layer[hit] = layer
        self.style[hit] = self._style_index(style)

    def rows(self) -> list[Text]:
        out = []
        for r in range(self.height):
            text = Text()
            for c in range(self.width):
                if (r, c) in self.marks:
                    text.append("●", self.styles[self.marks[(r, c)]])
                elif self.bits[r, c]:
                    text.append(chr(0x2800 + int(self.bits[r, c])), self.styles[self.style[r, c]])
                else:
                    text.append(" ")
            out.append(text)
        return out


def _panel_rows(panel: Panel, curves: Curves, width: int, height: int) -> list[Text]:
    """The text rows of one panel, each exactly `width` cells: title, canvas with y ticks, x ticks, x label."""
    x_range = curves.x_range()
    ys = [a for line in panel.lines for a in (line.y, line.smoothed) if a is not None]
    y0 = min((float(a.min()) for a in ys), default=0.0)
    y1 = max((float(a.max()) for a in ys), default=1.0)
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    y_ticks = nice_ticks(y0, y1, max(2, height // 2 + 1))  # a label every 2 rows at most
    y_labels = tick_labels(y_ticks)
    label_w = max(len(s) for s in y_labels)
    plot_w = max(8, width - label_w - 1)

    canvas = _Canvas(plot_w - 1, height, x_range, (y0, y1))  # -1: the right border
    for line in panel.lines:  # faded raw curves first, so the smoothed ones are drawn over them
        if line.smoothed is not None:
            canvas.line(line.x, line.y, f"dim {line.color}", faded=True)
    for line in panel.lines:
        if line.is_eval or len(line.x) == 1:  # a single point would be one dot: mark it
            canvas.points(line.x, line.y, f"bold {line.color}")
        else:
            canvas.line(line.x, line.y if line.smoothed is None else line.smoothed, line.color)

    tick_at = {}  # canvas row -> label, rows placed as the canvas places dots
    for t, s in zip(y_ticks, y_labels, strict=True):
        tick_at[round((y1 - t) / (y1 - y0) * (4 * height - 1)) // 4] = s
    rows = [Text(panel.metric.center(width)[:width], style="bold")]
    rows.append(Text(" " * label_w + "┌" + "─" * (plot_w - 1) + "┐"))
    for r, body in enumerate(canvas.rows() if panel.lines else _empty_rows(plot_w - 1, height)):
        label = tick_at.get(r)
        rows.append(Text.assemble((label or "").rjust(label_w), "┤" if label else "│", body, "│"))

    x0, x1 = x_range
    x_ticks = nice_ticks(x0, x1, max(2, plot_w // 12))
    border = ["─"] * (plot_w - 1)
    labels = [" "] * (width + 8)
    free = 0
    for t, s in zip(x_ticks, tick_labels(x_ticks), strict=True):
        c = round((t - x0) / (x1 - x0) * (2 * plot_w - 3)) // 2 if x1 > x0 else (plot_w - 1) // 2
        border[c] = "┬"
        start = max(label_w + 1 + c - len(s) // 2, free)
        if start + len(s) <= width:
            labels[start : start + len(s)] = s
            free = start + len(s) + 1
    rows.append(Text(" " * label_w + "└" + "".join(border) + "┘"))
    rows.append(Text("".join(labels[:width])))
    rows.append(Text(curves.x_label.center(width)[:width], style="dim"))
    for t in rows:
        t.truncate(width, pad=True)
    return rows


def _empty_rows(width: int, height: int) -> list[Text]:
    rows = [Text(" " * width) for _ in range(height)]
    rows[height // 2] = Text("no data".center(width), style="dim")
    return rows


@dataclass
class TerminalPlot:
    """A rich renderable: the legend, then the panels (two per row on wide consoles), at render width."""

    curves: Curves
    height: int | None = None  # canvas rows per panel; None: fit the console when it is a terminal
    columns: int | None = None  # panels side by side; None: 2 when the console is at least 120 wide

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        panels = self.curves.panels
        cols = self.columns or (2 if width >= 120 and len(panels) > 1 else 1)
        grid_rows = math.ceil(len(panels) / cols)
        height = self.height
        if height is None:
            fit = (console.size.height - 3) // max(1, grid_rows) - 5 if console.is_terminal else 12
            height = max(6, min(16, fit))
        yield self.legend()
        panel_w = (width - (cols - 1) * 2) // cols
        for g in range(grid_rows):
            chunk = [_panel_rows(p, self.curves, panel_w, height) for p in panels[g * cols : (g + 1) * cols]]
            for parts in zip(*chunk, strict=True):
                yield Text("  ").join(parts)

    def legend(self) -> Text:
        text = Text()
        for i, run in enumerate(self.curves.runs):
            text.append("  " if i else "").append("━━ ", COLORS[i % len(COLORS)]).append(run)
        if any(line.is_eval for p in self.curves.panels for line in p.lines):
            text.append("   ● ", "bold").append(EVAL_METRIC)
        if self.curves.smooth > 0:
            text.append(f"   EMA {self.curves.smooth:g}, raw dimmed", "dim")
        return text


# ---------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class PlotResult:
    """What one draw produced: the curves, the image figure (with -o) and the terminal renderable."""

    curves: Curves
    figure: Figure | None = None
    output: Path | None = None
    terminal: TerminalPlot | None = None


@dataclass
class _Runs:
    files: list[MetricsFile]
    names: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, paths: Sequence[Path], *, wait: bool = False) -> _Runs:
        files = []
        for run in paths:
            path = metrics_path(run)
            if not wait and not path.exists():
                raise UserError(
                    f"{run} has no {METRICS_FILENAME}; pass a directory written by 'minitrain train' or a metrics .jsonl"
                )
            files.append(MetricsFile(path))
        return cls(files, run_names(paths))

    def refresh(self) -> bool:
        return any([f.refresh() for f in self.files])  # a list: refresh every file, not the first changed

    def draw(self, config: PlotConfig) -> PlotResult:
        curves = build_curves(list(zip(self.names, [f.rows for f in self.files], strict=True)), config)
        figure = draw_image(curves, config.output) if config.output is not None else None
        terminal = TerminalPlot(curves) if config.draws_terminal else None
        return PlotResult(curves, figure, config.output, terminal)


def plot(config: PlotConfig) -> PlotResult:
    """Read every run once and draw: the image when `config.output` is set, the terminal plot when wanted."""
    runs = _Runs.open(config.runs)
    runs.refresh()
    for f, name in zip(runs.files, runs.names, strict=True):
        if not f.rows:
            raise UserError(
                f"{f.path} is empty: run {name} has not logged a step yet; try again later or use --watch"
            )
    return runs.draw(config)


def watch(
    config: PlotConfig,
    *,
    interval: float = 2.0,
    max_iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[PlotResult]:
    """Yield a fresh `PlotResult` whenever a run's file grows, polling every `interval` seconds.

    Waits quietly while a run directory has no metrics file yet or a file is empty (a run starting up);
    stops after `max_iterations` polls (None: until interrupted).
    """
    runs = _Runs.open(config.runs, wait=True)
    polls = 0
    while True:
        if all(f.path.exists() for f in runs.files) and runs.refresh() and all(f.rows for f in runs.files):
            yield runs.draw(config)
        polls += 1
        if max_iterations is not None and polls >= max_iterations:
            return
        sleep(interval)
