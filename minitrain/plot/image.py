"""The image renderer of `minitrain plot`: one panel per metric through matplotlib, written atomically.

matplotlib is imported here only, and only when an image is asked for; the figure is a bare `Figure`
with no pyplot, so no global backend is touched. Dense lines are decimated to the first, last, lowest
and highest point of 2000 buckets, more than a panel has pixel columns, and a dense faded raw curve is
filled as its min/max band, so the image looks the same and is cheaper to draw at 100k points
(benchmarks/bench_plot.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from minitrain.atomic import atomic_write
from minitrain.errors import UserError
from minitrain.plot.curves import COLORS, Curves

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    if (eval_label := curves.eval_legend()) is not None:
        handles.append(Line2D([], [], color="gray", ls="--", marker="o", ms=3, label=eval_label))
    title = f"EMA {curves.smooth:g} (raw faded)" if curves.smooth > 0 else None
    fig.legend(
        handles=handles, loc="outside upper center", ncols=min(len(handles), 5), frameon=False, title=title
    )

    if not output.parent.is_dir():  # atomic_write would create it; an image goes where the user said
        raise UserError(f"-o {output}: cannot write the image (No such file or directory)")
    try:
        with atomic_write(output) as f:  # an image viewer watching the file never sees half of it
            fig.savefig(f, format=output.suffix.lower()[1:], dpi=120)
    except OSError as err:
        raise UserError(f"-o {output}: cannot write the image ({err.strerror})") from None
    return fig
