"""`minitrain plot`: training curves from one or several runs, as an image, in the terminal, or both.

    read.py      which runs: each run's metrics file (minitrain.rundir's reader) and its legend name
    curves.py    rows -> panels of lines: x-axis, finite points, smoothing (pure numpy)
    image.py     the matplotlib renderer (imported only when an image is asked for)
    terminal.py  the braille renderer, a rich renderable

Nothing here imports torch: a 100k-line file takes about 0.9 s of CPU from the command line to the
terminal and 1.8 s to a PNG (benchmarks/bench_plot.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minitrain.config import PlotConfig
from minitrain.errors import UserError
from minitrain.plot.curves import Curves, build_curves
from minitrain.plot.image import draw_image
from minitrain.plot.read import Runs
from minitrain.plot.terminal import TerminalPlot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class PlotResult:
    """What one draw produced: the curves, the image figure (with -o) and the terminal renderable."""

    curves: Curves
    figure: Figure | None = None
    output: Path | None = None
    terminal: TerminalPlot | None = None


def _draw(runs: Runs, config: PlotConfig) -> PlotResult:
    curves = build_curves(runs.rows(), config)
    figure = draw_image(curves, config.output) if config.output is not None else None
    terminal = TerminalPlot(curves) if config.draws_terminal else None
    return PlotResult(curves, figure, config.output, terminal)


def plot(config: PlotConfig) -> PlotResult:
    """Read every run once and draw: the image when `config.output` is set, the terminal plot when wanted."""
    runs = Runs.open(config.runs)
    runs.refresh()
    for f, name in zip(runs.files, runs.names, strict=True):
        if not f.rows:
            raise UserError(
                f"{f.path} is empty: run {name} has not logged a step yet; try again later or use --watch"
            )
    return _draw(runs, config)


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
    runs = Runs.open(config.runs, wait=True)
    polls = 0
    while True:
        if all(f.path.exists() for f in runs.files) and runs.refresh() and all(f.rows for f in runs.files):
            yield _draw(runs, config)
        polls += 1
        if max_iterations is not None and polls >= max_iterations:
            return
        sleep(interval)
