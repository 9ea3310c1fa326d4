"""How `minitrain inspect` shows things: trained vs masked spans, token cells, the stats and audit tables.

A sample is shown as its decoded text cut into segments, each a run of tokens that are all trained or all
masked, and all special or all ordinary. In colour, trained text is bold bright green, masked text dim,
and special tokens (`<|im_start|>`, `</s>` ...) reversed so they stand out; reasoning (`<think>...</think>`,
harmony's analysis channel) italic yellow (bright when trained, dim when masked); a trained newline, which
colour cannot show, is drawn as `↵` before the line break. Without colour (`--no-color`,
or output that is not a terminal) the text is printed as it is, with every trained span enclosed in
`SPAN_OPEN` ... `SPAN_CLOSE`:

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n⟦Hello!<|im_end|>⟧\\n

The delimiters are U+27E6/U+27E7 (mathematical white square brackets): one character each, diff- and
grep-friendly, and, unlike `[[ ]]` (bash, wiki links, Lua), practically absent from chat data.

Trade-off: a segment's text is cut out of the decoded prefix (`decode(ids[:end])` minus
`decode(ids[:start])`) instead of decoding the segment alone, because SentencePiece-style decoders drop
the leading space of whatever they decode first; this costs O(segments x tokens) decode work per sample,
which is nothing for the handful of samples a human looks at. The module only presents: it takes a
tokenizer (anything with `decode` and `convert_ids_to_tokens`) and plain results, and reads no files.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minitrain.data.format import IGNORE_INDEX, reasoning_dropped_text, unread_kwargs_text
from minitrain.errors import UserError

if TYPE_CHECKING:
    from minitrain.inspect.audit import AuditReport
    from minitrain.inspect.stats import DatasetStats, PairStats

SPAN_OPEN = "\u27e6"  # ⟦ opens a trained span in plain output
SPAN_CLOSE = "\u27e7"  # ⟧ closes it

TRAINED = "bold bright_green"
MASKED = "dim"
TRAINED_SPECIAL = "bold bright_green reverse"
MASKED_SPECIAL = "dim magenta reverse"
HEADER = "bold cyan"
# reasoning inside a turn (`<think>...</think>`, harmony's analysis channel): its own style, trained or not
TRAINED_REASONING = "italic bright_yellow"
MASKED_REASONING = "dim italic yellow"
REASONING_BLOCKS = (("<think>", "</think>"), ("<|channel|>analysis<|message|>", "<|end|>"))
TRAINED_NEWLINE = "\u21b5"  # ↵ marks a trained newline in colour (plain output shows it inside ⟦ ⟧)


@dataclass(frozen=True)
class Segment:
    """A run of tokens decoded together: all trained or all masked, all special or all ordinary."""

    text: str
    trained: bool
    special: bool
    start: int  # token positions [start, end)
    end: int


def _style(trained: bool, special: bool) -> str:
    if trained:
        return TRAINED_SPECIAL if special else TRAINED
    return MASKED_SPECIAL if special else MASKED


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_segments(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], special_ids: Collection[int]
) -> list[Segment]:
    """Cut a sample into runs of equal (trained, special) and decode each as part of the whole text."""
    segments: list[Segment] = []
    n = len(input_ids)
    start = 0
    before = ""  # decode(input_ids[:start])
    while start < n:
        key = (labels[start] != IGNORE_INDEX, input_ids[start] in special_ids)
        end = start + 1
        while end < n and (labels[end] != IGNORE_INDEX, input_ids[end] in special_ids) == key:
            end += 1
        upto = _decode(tokenizer, input_ids[:end])
        # The prefix property fails only when a multi-byte character is split across the boundary
        # (byte-fallback pieces); then decode the run alone.
        text = upto[len(before) :] if upto.startswith(before) else _decode(tokenizer, input_ids[start:end])
        segments.append(Segment(text, key[0], key[1], start, end))
        before, start = upto, end
    return segments


def sample_header(
    index: int, source_line: int | None, num_tokens: int, num_trained: int, *, color: bool
) -> Text:
    """`=== sample I | source line L | N tokens | T trained (P%) ===`."""
    pct = 100.0 * num_trained / num_tokens if num_tokens else 0.0
    line = "?" if source_line is None else str(source_line)
    return Text(
        f"=== sample {index} | source line {line} | {num_tokens} tokens | "
        f"{num_trained} trained ({pct:.1f}%) ===",
        style=HEADER if color else "",
    )


def reasoning_ranges(text: str) -> list[tuple[int, int]]:
    """Character ranges of the reasoning blocks in `text`, their tags included (`REASONING_BLOCKS`)."""
    ranges = []
    for opener, closer in REASONING_BLOCKS:
        at = text.find(opener)
        while at >= 0:
            end = text.find(closer, at + len(opener))
            end = len(text) if end < 0 else end + len(closer)
            ranges.append((at, end))
            at = text.find(opener, end)
    return sorted(ranges)


def _split_at(text: str, offset: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    """`text` (starting at `offset` of the whole) cut into (piece, inside a reasoning range)."""
    cuts = {0, len(text)}
    for lo, hi in ranges:
        cuts.update(c - offset for c in (lo, hi) if 0 < c - offset < len(text))
    points = sorted(cuts)
    return [
        (text[a:b], any(lo <= offset + a < hi for lo, hi in ranges))
        for a, b in zip(points, points[1:], strict=False)
    ]


def sample_text(segments: Sequence[Segment], *, color: bool) -> Text:
    """The decoded sample: styled spans in colour (reasoning in its own style), `⟦trained⟧` delimiters
    without."""
    out = Text()
    inside = False
    ranges = reasoning_ranges("".join(seg.text for seg in segments)) if color else []
    offset = 0
    for seg in segments:
        if color:
            for piece, reasoning in _split_at(seg.text, offset, ranges):
                # A trained newline would be invisible in colour: show it as TRAINED_NEWLINE before the break.
                text = piece.replace("\n", TRAINED_NEWLINE + "\n") if seg.trained else piece
                style = _style(seg.trained, seg.special)
                if reasoning and not seg.special:
                    style = TRAINED_REASONING if seg.trained else MASKED_REASONING
                out.append(text, style=style)
            offset += len(seg.text)
            continue
        if seg.trained and not inside:
            out.append(SPAN_OPEN)
        elif not seg.trained and inside:
            out.append(SPAN_CLOSE)
        inside = seg.trained
        out.append(seg.text)
    if inside:
        out.append(SPAN_CLOSE)
    return out


def _piece(tokenizer: Any, token_id: int) -> str:
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    piece = "<none>" if piece is None else str(piece)
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def token_cells(
    tokenizer: Any,
    input_ids: Sequence[int],
    labels: Sequence[int],
    special_ids: Collection[int],
    *,
    color: bool,
) -> Text:
    """One `id:piece` cell per token, separated by spaces; a line break after each token that decodes to a
    newline.

    In colour trained cells are green and masked cells dim; without colour each run of trained cells is
    enclosed in `⟦ ⟧` as in the text view.
    """
    out = Text()
    inside = False
    line_start = True  # no separator before the first cell of a line (tracked: `out.plain` copies the text)
    for tok, lab in zip(input_ids, labels, strict=False):
        trained = lab != IGNORE_INDEX
        cell = f"{tok}:{_piece(tokenizer, tok)}"
        newline = "\n" in _decode(tokenizer, [tok])
        sep = "" if line_start else " "
        if color:
            out.append(sep)
            out.append(cell, style=_style(trained, tok in special_ids))
        else:
            if trained and not inside:
                sep += SPAN_OPEN
            elif not trained and inside:
                out.append(SPAN_CLOSE)
            out.append(sep + cell)
            inside = trained
        if newline:
            if inside:
                out.append(SPAN_CLOSE)
                inside = False
            out.append("\n")
        line_start = newline
    if inside:
        out.append(SPAN_CLOSE)
    return out


def render_sample(
    console: Console,
    tokenizer: Any,
    index: int,
    sample: dict[str, Any],
    special_ids: Collection[int],
    *,
    tokens: bool,
    color: bool,
) -> None:
    """Print one sample: its header, then its text (or its token cells with `tokens=True`), then a blank
    line."""
    ids, labels = sample["input_ids"], sample["labels"]
    trained = sum(1 for lab in labels if lab != IGNORE_INDEX)
    console.print(
        sample_header(index, sample.get("source_line"), len(ids), trained, color=color), soft_wrap=True
    )
    labels = list(labels[: len(ids)]) + [IGNORE_INDEX] * (len(ids) - len(labels))  # a broken file still shows
    try:
        if tokens:
            body = token_cells(tokenizer, ids, labels, special_ids, color=color)
        else:
            body = sample_text(decode_segments(tokenizer, ids, labels, special_ids), color=color)
    except Exception as err:  # ids the tokenizer cannot decode (negative, huge, not ints)
        raise UserError(
            f"sample {index}: cannot decode its input_ids ({err}); run --audit to see why"
        ) from None
    # soft_wrap: no hard line breaks inserted by rich, so plain output is exactly the decoded text;
    # then exactly one blank line before the next sample.
    end = "" if body.plain.endswith("\n") else "\n"
    console.print(body, soft_wrap=not color or not tokens, highlight=False, markup=False, end=end)
    console.print()


def render_pair(
    console: Console,
    tokenizer: Any,
    index: int,
    pair: dict[str, Any],
    special_ids: Collection[int],
    *,
    tokens: bool,
    color: bool,
) -> None:
    """Print one preference pair: a header, the shared prompt once, then the chosen and the rejected response.

    Each side is decoded whole and cut at `prompt_len` (a segment boundary: the prompt is masked and the
    response starts trained), so the response text is what it is inside its sequence.
    """
    k = pair["prompt_len"]
    sides = {key: (pair[key]["input_ids"], pair[key]["labels"]) for key in ("chosen", "rejected")}
    counts = {
        key: (len(ids), sum(1 for lab in labels if lab != IGNORE_INDEX))
        for key, (ids, labels) in sides.items()
    }
    line = pair.get("source_line", "?")
    console.print(
        Text(
            f"=== pair {index} | source line {line} | prompt {k} tokens | "
            f"chosen {counts['chosen'][0]} tokens, {counts['chosen'][1]} trained | "
            f"rejected {counts['rejected'][0]} tokens, {counts['rejected'][1]} trained ===",
            style=HEADER if color else "",
        ),
        soft_wrap=True,
    )
    parts = []
    for key, (ids, labels) in sides.items():
        labels = list(labels[: len(ids)]) + [IGNORE_INDEX] * (len(ids) - len(labels))
        try:
            if tokens:
                cut = [(0, k), (k, len(ids))]
                bodies = [
                    token_cells(tokenizer, ids[a:b], labels[a:b], special_ids, color=color) for a, b in cut
                ]
            else:
                segments = decode_segments(tokenizer, ids, labels, special_ids)
                bodies = [
                    sample_text([s for s in segments if s.end <= k], color=color),
                    sample_text([s for s in segments if s.start >= k], color=color),
                ]
        except Exception as err:  # ids the tokenizer cannot decode
            raise UserError(
                f"pair {index}: cannot decode its {key} input_ids ({err}); run --audit to see why"
            ) from None
        parts.append((key, bodies))
    shown = [("prompt (shared, masked)", parts[0][1][0])] + [
        (f"{key} response", bodies[1]) for key, bodies in parts
    ]
    for title, body in shown:
        console.print(Text(f"--- {title}", style=HEADER if color else ""), soft_wrap=True)
        end = "" if body.plain.endswith("\n") else "\n"
        console.print(body, soft_wrap=not color or not tokens, highlight=False, markup=False, end=end)
    console.print()


def render_pair_stats(stats: PairStats, console: Console) -> None:
    """Print `--stats` of a preference file: pairs, lengths of prompt/chosen/rejected, trained tokens,
    margins."""
    console.print(Text(f"statistics of {stats.path} (preference pairs)", style="bold"), soft_wrap=True)
    table = Table()
    table.add_column("", style="bold")
    for title in ("prompt", "chosen", "rejected"):
        table.add_column(title, justify="right")
    parts = (stats.prompt, stats.chosen, stats.rejected)
    table.add_row("tokens", *(f"{p.tokens:,}" for p in parts))
    table.add_row(
        "trained tokens", "-", f"{stats.chosen.trained_tokens:,}", f"{stats.rejected.trained_tokens:,}"
    )
    table.add_row("mean length", *(f"{p.mean_length:,.1f}" for p in parts))
    for q in stats.chosen.percentiles:
        table.add_row(f"length p{q}", *(f"{p.percentiles[q]:,}" for p in parts))
    totals = Table(show_header=False)
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_row("pairs", f"{stats.pairs:,}")
    totals.add_row("length margin, chosen - rejected (mean)", f"{stats.margin_mean:+,.1f}")
    for q, v in stats.margin_percentiles.items():
        totals.add_row(f"length margin p{q}", f"{v:+,}")
    totals.add_row("pairs whose chosen side trains more tokens", f"{stats.chosen_longer:,}")
    totals.add_row("pairs whose rejected side trains more tokens", f"{stats.rejected_longer:,}")
    totals.add_row("pairs with a side that trains nothing", f"{stats.zero_trained:,}")
    _rendering_rows(stats, totals)
    console.print(totals)
    console.print(table)


def _rendering_rows(stats: DatasetStats | PairStats, totals: Table) -> None:
    """What the sidecar counted of the template's rendering: reasoning it dropped, kwargs it never reads."""
    if stats.reasoning_dropped is not None:
        turns, tokens = stats.reasoning_dropped.get("turns", 0), stats.reasoning_dropped.get("tokens", 0)
        totals.add_row("reasoning dropped by the template", reasoning_dropped_text(turns, tokens))
    if stats.template_kwargs_unread:
        totals.add_row(
            "chat_template_kwargs unread by the template", unread_kwargs_text(stats.template_kwargs_unread)
        )


def _bar(count: int, peak: int, width: int = 40) -> str:
    return "█" * (round(width * count / peak) if peak else 0)


def render_stats(stats: DatasetStats, console: Console) -> None:
    """Print `--stats`: totals, length percentiles, a length histogram, zero-trained and longest samples,
    packing."""
    frac = stats.trained_tokens / stats.tokens if stats.tokens else 0.0
    console.print(
        Text(f"statistics of {stats.path}", style="bold"), soft_wrap=True
    )  # long paths: no wrapping
    totals = Table(show_header=False)
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_row("samples", f"{stats.samples:,}")
    totals.add_row("tokens", f"{stats.tokens:,}")
    totals.add_row("trained tokens", f"{stats.trained_tokens:,}")
    totals.add_row("trained fraction", f"{frac:.1%}")
    totals.add_row("mean length", f"{stats.mean_length:,.1f}")
    for q, v in stats.percentiles.items():
        totals.add_row(f"length p{q}", f"{v:,}")
    totals.add_row("samples with zero trained tokens", f"{stats.zero_trained:,}")
    _rendering_rows(stats, totals)
    console.print(totals)
    if stats.zero_trained:
        console.print(
            f"  zero-trained sample indices (first {len(stats.zero_trained_examples)}): "
            + ", ".join(str(i) for i in stats.zero_trained_examples)
        )

    if stats.histogram:
        hist = Table(title="length histogram (tokens)", title_justify="left", box=None)
        hist.add_column("tokens", justify="right")
        hist.add_column("samples", justify="right")
        hist.add_column("")
        peak = max(c for _, _, c in stats.histogram)
        for lo, hi, count in stats.histogram:
            hist.add_row(f"{lo:,}-{hi:,}", f"{count:,}", Text(_bar(count, peak), style="green"))
        console.print(hist)

    longest = Table(title="longest samples", title_justify="left")
    longest.add_column("index", justify="right")
    longest.add_column("source line", justify="right")
    longest.add_column("tokens", justify="right")
    longest.add_column("trained", justify="right")
    for length, index, line, trained in stats.longest:
        longest.add_row(str(index), "?" if line is None else str(line), f"{length:,}", f"{trained:,}")
    console.print(longest)

    p = stats.packing
    if p is not None:
        console.print(
            Text(
                f"packing (planner, one epoch in sampler order for seed {p.seed}): "
                f"batch size {p.batch_size}, "
                f"{p.max_tokens_per_gpu:,} tokens per GPU, {p.nproc} GPU(s)",
                style="bold",
            ),
            soft_wrap=True,
        )
        pack = Table(show_header=False)
        pack.add_column(style="bold")
        pack.add_column(justify="right")
        pack.add_row("steps per epoch", f"{p.steps:,}")
        pack.add_row(
            "minibatches per step (mean / min / max)",
            f"{p.minibatches_mean:.2f} / {p.minibatches_min} / {p.minibatches_max}",
        )
        pack.add_row("token budget used", f"{p.utilization:.1%}")
        pack.add_row("samples longer than the budget (never trained)", f"{p.too_long:,}")
        console.print(pack)


def render_audit(report: AuditReport, console: Console, *, color: bool) -> None:
    """Print `--audit`: one row per kind of finding (severity, samples, example indices), then a verdict."""
    from minitrain.inspect.audit import CHECKS

    console.print(Text(f"audit of {report.path}: {report.samples:,} samples", style="bold"), soft_wrap=True)
    table = Table()
    table.add_column("check")
    table.add_column("severity")
    table.add_column("samples", justify="right")
    table.add_column("examples (index: detail)")
    for kind, check in CHECKS.items():
        count = report.counts.get(kind, 0)
        if count == 0:
            continue
        sev_style = ("bold red" if check.severity == "error" else "yellow") if color else ""
        examples = "\n".join(
            (f"{'file' if ex.index is None else ex.index}: {ex.detail}" if ex.detail else str(ex.index))
            for ex in report.examples[kind]
        )
        table.add_row(kind, Text(check.severity, style=sev_style), f"{count:,}", Text(examples))
    if report.counts:
        console.print(table)
    for note in report.notes:
        console.print(Text(note), soft_wrap=True)
    errors, warnings = report.num_errors, report.num_warnings
    if errors:
        verdict = Text(
            f"FAIL: {errors:,} error finding(s), {warnings:,} warning(s)", style="bold red" if color else ""
        )
    elif warnings:
        verdict = Text(f"OK with {warnings:,} warning(s)", style="yellow" if color else "")
    else:
        verdict = Text(f"OK: {report.samples:,} samples, no findings", style="bold green" if color else "")
    console.print(verdict, soft_wrap=True)
