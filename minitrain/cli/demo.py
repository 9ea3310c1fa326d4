"""`minitrain demo`: the whole pipeline on the shipped tiny assets, offline, on the CPU (`minitrain.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the data, the run and the checkpoints go. "
            r"\[default: $XDG_CACHE_HOME/minitrain/demo, else ~/.cache/minitrain/demo]",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a previous demo in --output-dir (only its data/ and run/).")
    ] = False,
    nproc: Annotated[int, typer.Option(help="Training processes (torchrun ranks) on the CPU.")] = 2,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps to train.")] = 300,
) -> None:
    """Tokenize a synthetic arithmetic chat set, train a tiny model from scratch, plot its loss \
(a few minutes).

    Example: minitrain demo --output-dir /tmp/demo --overwrite
    """
    from rich.console import Console

    from minitrain.demo import run_demo

    console = Console()
    result = run_demo(output_dir, overwrite=overwrite, nproc=nproc, max_steps=max_steps, console=console)
    console.rule("[bold]where everything is")
    console.print(f"conversations   {result.dataset}")
    console.print(f"tokenized       {result.tokenized}  (minitrain inspect {result.tokenized})")
    console.print(f"run directory   {result.run_dir}  (training_params.json, training_metrics_0.jsonl)")
    console.print(f"checkpoint      {result.checkpoint}  (AutoModelForCausalLM.from_pretrained loads it)")
    console.print(f"loss curve      minitrain plot {result.run_dir} -o loss.png")
    console.print(
        f"[bold green]loss {result.first_loss:.3f} -> {result.last_loss:.3f}[/] in {result.steps} steps, "
        f"{result.seconds:.0f} s in all"
    )
