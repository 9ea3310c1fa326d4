"""`minitrain plot`: training curves of one or several runs, in the terminal or as an image.

Thin: parses flags into a `PlotConfig`, calls `minitrain.plot.plot` (or iterates `minitrain.plot.watch`)
and prints the result with rich. `minitrain.plot` (numpy) and matplotlib are imported inside the
function, so importing the CLI stays free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer


def plot(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Training output directories (reads RUN/training_metrics_0.jsonl) or metrics .jsonl files.",
            metavar="RUN",
            show_default=False,
        ),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="Metric to plot, one panel each; repeat for several. "
            "\\[default: loss (with eval_loss), lr, grad_norm, tokens_per_second]",
            show_default=False,
        ),
    ] = None,
    x: Annotated[
        Literal["step", "samples", "tokens", "time"],
        typer.Option("--x", help="x-axis: optimizer step, samples seen, tokens seen, or wall time."),
    ] = "step",
    smooth: Annotated[
        float,
        typer.Option(
            "--smooth",
            help="EMA weight from 0.0 (off) to 0.99; the raw curve stays faded behind. lr is never smoothed.",
        ),
    ] = 0.0,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write an image: FILE.png, FILE.svg or FILE.pdf.", show_default=False
        ),
    ] = None,
    terminal: Annotated[
        bool, typer.Option("--terminal", help="Also draw in the terminal when -o is given.")
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Redraw whenever a run appends lines; Ctrl+C stops.")
    ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between checks with --watch.")] = 2.0,
) -> None:
    """Plot training curves of one or several runs.

    Examples: `minitrain plot out/` ; `minitrain plot out-lr1 out-lr2 --smooth 0.9 -o curves.png` ;
    `minitrain plot out/ --x tokens -m loss -m grad_norm --watch`.
    """
    from rich.console import Console

    from minitrain import plot as lib
    from minitrain.config import PlotConfig

    config = PlotConfig(
        runs=tuple(runs), metrics=tuple(metric or ()), x=x, smooth=smooth, output=output, terminal=terminal
    )
    console = Console()

    def show(result: lib.PlotResult, *, clear: bool) -> None:
        if clear and console.is_terminal:
            console.clear()
        if result.terminal is not None:
            console.print(result.terminal)
        if result.output is not None:
            console.print(f"wrote [bold]{result.output}[/bold]")
        elif not watch:
            console.print("[dim]hint: -o curves.png (or .svg, .pdf) writes an image[/dim]")

    if not watch:
        show(lib.plot(config), clear=False)
        return
    console.print(f"[dim]watching {len(runs)} run(s) every {interval:g} s; Ctrl+C stops[/dim]")
    try:
        for result in lib.watch(config, interval=interval):
            show(result, clear=True)
            console.print(f"[dim]watching every {interval:g} s; Ctrl+C stops[/dim]")
    except KeyboardInterrupt:
        console.print("[dim]stopped watching[/dim]")
