"""The `minitrain` console command: one Typer app assembled from one module per subcommand.

Each subcommand module parses its flags, builds a config, calls one library function and renders the
result. Importing this package must stay free: no torch, transformers or matplotlib at import time (the
commands import them inside their bodies), so `minitrain --help` and shell completion answer at once.
A `UserError` from the library becomes one red line on stderr and exit code 1; set `MINITRAIN_DEBUG=1`
to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

from minitrain import __version__
from minitrain.cli import demo, inspect, plot, tokenize, train
from minitrain.errors import UserError

app = typer.Typer(
    name="minitrain",
    help="Supervised fine-tuning of causal language models: tokenize, inspect, train, plot.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"minitrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Supervised fine-tuning of causal language models: tokenize, inspect, train, plot."""


app.command("tokenize")(tokenize.tokenize)
app.command("inspect")(inspect.inspect)
app.command("train")(train.train)
app.command("plot")(plot.plot)
app.command("demo")(demo.demo)


def main() -> None:
    """Run the app; user errors become one line and exit code 1."""
    try:
        app(args=train.expand_bare_resume(sys.argv[1:]), prog_name="minitrain")
    except UserError as err:
        if os.environ.get("MINITRAIN_DEBUG"):
            raise
        print(f"minitrain: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("minitrain: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
