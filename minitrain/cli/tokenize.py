"""`minitrain tokenize`: conversations -> tokenized JSONL with exact loss masks (+ sidecar, rejects).

Thin: parses flags (both minitrain's `INPUT -o OUT` and mini_trainer's `--input-file/--output-file`
spellings), builds a `TokenizeConfig`, calls `minitrain.data.pipeline.tokenize_file`, renders the summary.
The heavy imports (transformers, tokenizers, pyarrow, datasets) happen inside the command, so `minitrain
--help` stays fast. The input shapes and the field mapping flags are documented in `minitrain.data.sources`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from minitrain.cli.configopt import apply_config_file
from minitrain.errors import UserError


def _read_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """--config FILE: the file's values become the flags' defaults (the command line wins)."""
    apply_config_file(ctx, value, command=tokenize)
    return value


def tokenize(
    input_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="INPUT",
            help="JSONL (messages, ShareGPT, Alpaca, pretrain or prompt/generation lines), a Parquet or "
            "Arrow file, or a datasets.save_to_disk folder.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            "--output-file",
            help="Tokenized JSONL to write (sidecar and rejects beside it).",
            show_default=False,
        ),
    ] = None,
    model_name_or_path: Annotated[
        str | None,
        typer.Option(
            "--model-name-or-path",
            help="Tokenizer or model folder whose tokenizer (and chat template) to use.",
            show_default=False,
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input-file", help="Same as INPUT (mini_trainer's spelling).", show_default=False),
    ] = None,
    max_sample_num_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-sample-num-tokens",
            help="Drop samples longer than this many tokens (listed in the rejects file).",
            show_default=False,
        ),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            help="Template to use instead of the tokenizer's: 'chatml' or a path to a Jinja file.",
            show_default=False,
        ),
    ] = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers",
            help="Processes that tokenize: this one and N-1 workers (default: all cores).",
            show_default=False,
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Stop at the first rejected line with FILE:LINE: reason (exit 1)."),
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            metavar="NAME[:SPLIT]",
            help="Read a datasets-library dataset instead of a file (from its cache when offline).",
            show_default=False,
        ),
    ] = None,
    messages_field: Annotated[
        str | None,
        typer.Option("--messages-field", help="Key holding the list of turns.", show_default=False),
    ] = None,
    role_field: Annotated[
        str | None,
        typer.Option(
            "--role-field", help="Key of a turn's role (default: role, else from).", show_default=False
        ),
    ] = None,
    content_field: Annotated[
        str | None,
        typer.Option(
            "--content-field", help="Key of a turn's text (default: content, else value).", show_default=False
        ),
    ] = None,
    user_role: Annotated[
        list[str] | None,
        typer.Option(
            "--user-role", help="A role name in the data that means user (repeatable).", show_default=False
        ),
    ] = None,
    assistant_role: Annotated[
        list[str] | None,
        typer.Option(
            "--assistant-role",
            help="A role name in the data that means assistant (repeatable).",
            show_default=False,
        ),
    ] = None,
    system_role: Annotated[
        list[str] | None,
        typer.Option(
            "--system-role",
            help="A role name in the data that means system (repeatable).",
            show_default=False,
        ),
    ] = None,
    train_on: Annotated[
        str,
        typer.Option(
            "--train-on",
            help="Assistant turns to train: all, or last (the final answer only).",
            autocompletion=lambda: ["all", "last"],
        ),
    ] = "all",
    split_turns: Annotated[
        bool,
        typer.Option(
            "--split-turns",
            help="One sample per assistant turn, rendered as at inference and trained on that turn: keeps "
            "the reasoning of every turn when the template drops earlier reasoning "
            "(Qwen3, DeepSeek-R1, gpt-oss).",
        ),
    ] = False,
    chat_template_kwargs: Annotated[
        str | None,
        typer.Option(
            "--chat-template-kwargs",
            metavar="JSON",
            help="""Extra names for every render of the template, as a JSON object, e.g. """
            """'{"enable_thinking": false}' (Qwen3's non-thinking mode): as your inference passes them. """
            """A name the template never reads is an error.""",
            show_default=False,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Run the tokenizer repository's own code; only for ones you trust."
        ),
    ] = False,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML or JSON file of flag values (keys as the flags, e.g. max_sample_num_tokens, "
            "input_file); flags given here override it.",
            show_default=False,
            is_eager=True,
            callback=_read_config,
        ),
    ] = None,
) -> None:
    """Tokenize conversations with exact loss masks (what the model generates in each assistant turn).

    Examples:

      minitrain tokenize data.jsonl -o data.tok.jsonl --model-name-or-path ./my-model

      minitrain tokenize sharegpt.parquet -o data.tok.jsonl --model-name-or-path ./my-model

      minitrain tokenize --dataset tatsu-lab/alpaca:train -o alpaca.tok.jsonl --model-name-or-path ./my-model

      minitrain tokenize chats.jsonl -o out.jsonl --model-name-or-path M --messages-field dialog \
--role-field speaker --content-field text --user-role customer --assistant-role agent

      minitrain tokenize --input-file in.jsonl --output-file out.jsonl --model-name-or-path M \
--max-sample-num-tokens 32768

      minitrain tokenize reasoning.jsonl -o r.tok.jsonl --model-name-or-path ./qwen3 --split-turns

      minitrain tokenize chats.jsonl -o c.tok.jsonl --model-name-or-path ./qwen3 \
--chat-template-kwargs '{"enable_thinking": false}'
    """
    if input_path is not None and input_file is not None:
        raise UserError("give the input once: either INPUT.jsonl or --input-file, not both")
    source = input_path if input_path is not None else input_file
    if source is not None and dataset is not None:
        raise UserError(f"give one input: either the file {source} or --dataset {dataset}, not both")
    if source is None and dataset is None:
        raise UserError("no input: pass INPUT.jsonl (or --input-file INPUT.jsonl, or --dataset NAME[:split])")
    if output is None:
        raise UserError("no output: pass -o OUT.jsonl (or --output-file OUT.jsonl)")
    if model_name_or_path is None:
        raise UserError("no tokenizer: pass --model-name-or-path with a tokenizer or model folder")

    # numpy's OpenBLAS (imported with transformers) starts a thread per extra core when imported; tokenize
    # does no linear algebra, and a process with one thread forks its workers (`workers.worker_context`)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # the workers are processes: tokenizers' own thread pool would only contend with them, and with it off
    # each text's ids come without the offsets conversion where that is exact (minitrain/data/offsets.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    from minitrain.config import TokenizeConfig
    from minitrain.data.pipeline import render_summary, tokenize_file

    config = TokenizeConfig(
        input_file=source,
        output_file=output,
        model_name_or_path=model_name_or_path,
        max_sample_num_tokens=max_sample_num_tokens,
        chat_template=chat_template,
        num_workers=num_workers,
        strict=strict,
        dataset=dataset,
        messages_field=messages_field,
        role_field=role_field,
        content_field=content_field,
        user_role=tuple(user_role or ()),
        assistant_role=tuple(assistant_role or ()),
        system_role=tuple(system_role or ()),
        train_on=train_on,
        split_turns=split_turns,
        trust_remote_code=trust_remote_code,
        chat_template_kwargs=chat_template_kwargs,
    )
    console = Console(stderr=True)
    result = tokenize_file(config, console=console)
    render_summary(result, Console())
