"""`minitrain inspect`: see and audit what the model will be trained on.

Thin by design: the flags become an `InspectConfig`, `minitrain.inspect.inspect_file` does the
reading, `minitrain.inspect.render` does the drawing. numpy, rich and transformers are imported inside the
command so that importing the CLI stays free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="TOKENIZED.jsonl", help="Tokenized JSONL written by `minitrain tokenize` (OUT.jsonl)."
        ),
    ],
    model_name_or_path: Annotated[
        str | None,
        typer.Option(
            "--model-name-or-path", help="Tokenizer to decode with (default: the one in OUT.meta.json)."
        ),
    ] = None,
    n: Annotated[int | None, typer.Option("-n", help="Show the first N samples (default 3).")] = None,
    index: Annotated[
        list[int] | None, typer.Option("--index", help="Show sample I (0-based; repeat for several).")
    ] = None,
    random: Annotated[
        int | None, typer.Option("--random", help="Show K samples drawn uniformly (one pass over the file).")
    ] = None,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seed for --random and the --stats packing order (as train's --seed)."),
    ] = 42,
    grep: Annotated[
        str | None, typer.Option("--grep", help="Only samples whose decoded text contains TEXT.")
    ] = None,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="One cell per token (id:piece) instead of decoded text.")
    ] = False,
    no_color: Annotated[
        bool,
        typer.Option(
            "--no-color", help="Plain text: trained spans enclosed in ⟦ ⟧ (also when not a terminal)."
        ),
    ] = False,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Samples, tokens, trained fraction, length percentiles and histogram, zero-trained and "
            "longest samples.",
        ),
    ] = False,
    audit: Annotated[
        bool,
        typer.Option(
            "--audit", help="Check every sample (checks above); table of findings; exit 1 if any is an error."
        ),
    ] = False,
    source: Annotated[
        Path | None,
        typer.Option(
            "--source", help="With --audit: the tokenize INPUT.jsonl, to compare trained text with it."
        ),
    ] = None,
    max_tokens_per_gpu: Annotated[
        int | None, typer.Option("--max-tokens-per-gpu", help="With --stats: token budget per GPU minibatch.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="With --stats: samples per optimizer step.")
    ] = None,
    nproc: Annotated[
        int | None, typer.Option("--nproc", help="With --stats: number of GPUs (default 1).")
    ] = None,
) -> None:
    """See and audit what the model will be trained on.

    Trained text is bright green, masked text dim, special tokens reversed, reasoning (<think>...</think>,
    analysis channel) italic yellow, bright when trained; with --no-color or when piped,
    trained spans are enclosed in ⟦ ⟧ and nothing else is added.

    Audit checks (severity) - each counts samples and shows the first example indices:
      malformed_line      (error)   a line that is not JSON, or input_ids/labels not lists of ints
      len_mismatch        (error)   `len` != len(input_ids), or len(labels) != len(input_ids)
      loss_count_mismatch (error)   num_loss_counted_tokens != number of labels that are not -100
      label_not_input     (error)   a label that is neither -100 nor the input id at its position
      token_out_of_vocab  (error)   an input id outside the tokenizer's vocabulary
      zero_trained        (warning) a sample with no trained token
      trained_special     (error)   a trained special token that is not end-of-turn (role header, BOS ...)
      eot_not_trained     (error)   a trained span that does not end with an end-of-turn token
      text_mismatch       (error)   --source: a trained span does not end with its assistant content \
(+ end-of-turn)
      reasoning_masked    (error)   --source: a turn's reasoning is rendered in the sample but masked
      source_unmatched    (error)   --source: a sample's source_line is missing, out of order or past the end
      prompt_mismatch     (error)   pairs: the first prompt_len ids differ between chosen and rejected
      trained_in_prompt   (error)   pairs: a side's first trained token is not at prompt_len
      sidecar_mismatch    (error)   the sidecar's written/tokens/trained_tokens disagree with the file

    Examples:
      minitrain inspect out.jsonl                        # first 3 samples
      minitrain inspect out.jsonl --index 7 --tokens     # one sample, token by token
      minitrain inspect out.jsonl --stats --max-tokens-per-gpu 8192 --batch-size 64 --nproc 8
      minitrain inspect out.jsonl --audit --source in.jsonl   # CI: exit 1 on any error finding
    """
    from rich.console import Console

    from minitrain.config import InspectConfig
    from minitrain.inspect import inspect_file
    from minitrain.inspect.render import (
        render_audit,
        render_pair,
        render_pair_stats,
        render_sample,
        render_stats,
    )

    config = InspectConfig(
        path=path,
        model_name_or_path=model_name_or_path,
        n=n,
        indices=tuple(index or ()),
        random_k=random,
        seed=seed,
        grep=grep,
        tokens=tokens,
        stats=stats,
        audit=audit,
        source=source,
        max_tokens_per_gpu=max_tokens_per_gpu,
        batch_size=batch_size,
        nproc=nproc,
    )
    result = inspect_file(config)
    console = Console(highlight=False)
    color = console.is_terminal and not no_color and not console.no_color
    if not color:
        console = Console(highlight=False, no_color=True, color_system=None)
    if result.samples is not None:
        if not result.samples:
            message = f"no sample matches --grep {grep!r}" if grep is not None else "no samples selected"
            console.print(message, markup=False, soft_wrap=True)
        show = render_pair if result.pairs else render_sample
        for s in result.samples:
            show(console, result.tokenizer, s.index, s.sample, result.special_ids, tokens=tokens, color=color)
    if result.pairs and result.stats is not None:
        render_pair_stats(result.stats, console)
    elif result.stats is not None:
        render_stats(result.stats, console)
    if result.audit is not None:
        render_audit(result.audit, console, color=color)
        if not result.audit.ok:
            raise typer.Exit(1)
