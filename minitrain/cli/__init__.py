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
    """Run the app; every mistake on the command line or in the input is one line on stderr.

    A `UserError` exits 1; a command-line parse error (unknown option, bad value, missing option) exits 2,
    as Click's do, with the message and where to find help; bare `minitrain` prints the help, exit 2.
    """
    try:
        code = app(args=train.expand_bare_resume(sys.argv[1:]), prog_name="minitrain", standalone_mode=False)
    except UserError as err:
        if os.environ.get("MINITRAIN_DEBUG"):
            raise
        print(f"minitrain: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except typer.TyperException as err:  # Typer's public base of every command-line error
        ctx = getattr(err, "ctx", None)
        if ctx is not None and not ctx.args and not sys.argv[1:]:  # bare `minitrain`: the help
            print(ctx.get_help(), end="")
        elif err.exit_code == 2:  # a usage error: where to find help
            message = " ".join(err.format_message().split()).rstrip(".")  # Click wraps long messages
            where = ctx.command_path if ctx is not None else "minitrain"
            print(f"minitrain: error: {message}; see '{where} --help'", file=sys.stderr)
        else:
            print(f"minitrain: error: {' '.join(err.format_message().split())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except (KeyboardInterrupt, typer.Abort):
        print("minitrain: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    _skip_the_last_collection()
    raise SystemExit(code if isinstance(code, int) else 0)


def _skip_the_last_collection() -> None:
    """The command is done and the process exits next: keep the interpreter's final garbage collections
    from walking every object the imports made (0.3 s of a 3 s `tokenize` with transformers loaded),
    only to free memory the OS takes back. Outputs are closed by then; atexit handlers and module
    teardown still run."""
    import gc

    gc.freeze()
