"""Curves: what both renderers draw, built from metrics rows: x-axis, finite points, smoothing, panels.

Renderer-independent and pure (numpy only): `build_curves` turns each run's rows into one panel per
metric with a line per run (and each run's `eval_loss` on the loss panel), and turns every user mistake
(an unknown metric, no shared x-axis) into a one-line `UserError`. A preference run (`--objective dpo`)
also gets `rewards/margins` and `rewards/accuracies` panels right after the loss by default, with its
eval pairs' `eval_rewards/...` on them; an SFT run's default panels do not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from minitrain.config import PLOT_X_AXES, PlotConfig
from minitrain.errors import UserError

DEFAULT_METRICS = ("loss", "lr", "grad_norm", "tokens_per_second")
PREFERENCE_METRICS = ("rewards/margins", "rewards/accuracies")  # default panels after loss, when present
EVAL_METRIC = "eval_loss"  # drawn on the `loss` panel when present
EVAL_OF = {  # each eval metric is drawn on its training metric's panel
    "loss": EVAL_METRIC,
    "rewards/margins": "eval_rewards/margins",
    "rewards/accuracies": "eval_rewards/accuracies",
}
X_SOURCES = {  # what each --x reads, for error messages
    "step": "'step'",
    "samples": "'total_samples_accumulated'",
    "tokens": "'num_total_tokens'",
    "time": "'timestamp' or 'time_per_batch'",
}
# lr is a schedule, not a measurement (smoothing it would only add lag); eval_loss is sparse.
UNSMOOTHED = frozenset({"lr", *EVAL_OF.values()})
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
        return self.metric in EVAL_OF.values()


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

    def eval_legend(self) -> str | None:
        """The legend entry of the eval markers: `eval_loss`, `eval_*` when eval rewards are drawn too, or
        None without an eval line."""
        drawn = {line.metric for p in self.panels for line in p.lines if line.is_eval}
        return None if not drawn else EVAL_METRIC if drawn == {EVAL_METRIC} else "eval_*"

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
        defaults = (DEFAULT_METRICS[0], *PREFERENCE_METRICS, *DEFAULT_METRICS[1:])
        metrics = [m for m in defaults if present(m)]
        if not metrics:
            available = _available([rows for _, rows in runs])
            raise UserError(
                f"none of the default metrics ({', '.join(DEFAULT_METRICS)}) is in these runs; "
                f"pick some with --metric: {', '.join(available)}"
            )

    xs = [_x_column(rows, config.x) for _, rows in runs]
    missing = [name for (name, _), x in zip(runs, xs, strict=True) if x is None]
    if missing:
        shared = [a for a in PLOT_X_AXES if all(_x_column(rows, a) is not None for _, rows in runs)]
        fix = f"use --x {' or --x '.join(shared)}" if shared else "no x-axis is shared by all of these runs"
        verb = "has" if len(missing) == 1 else "have"
        raise UserError(
            f"no common x-axis for --x {config.x}: "
            f"{', '.join(missing)} {verb} no {X_SOURCES[config.x]}; {fix}"
        )

    x_label = config.x
    if config.x == "time":  # one unit for all runs, so they stay comparable
        span = max(float(np.nanmax(x)) for x in xs)
        unit, scale = ("h", 3600.0) if span > 7200 else ("min", 60.0) if span > 180 else ("s", 1.0)
        xs = [x / scale for x in xs]
        x_label = f"time ({unit})"

    panels = []
    for metric in metrics:
        lines = []
        eval_of = EVAL_OF.get(metric)  # its eval counterpart, unless asked for as a panel of its own
        drawn = (metric, eval_of) if eval_of and eval_of not in metrics and present(eval_of) else (metric,)
        for i, ((name, _rows), x) in enumerate(zip(runs, xs, strict=True)):
            for m in drawn:
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
