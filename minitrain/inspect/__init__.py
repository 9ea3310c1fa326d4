"""The `inspect` stage: pick samples to view, compute `--stats`, run the `--audit` checks on a tokenized file.

    select.py     which samples to show (first n, indices, reservoir sample, grep)
    tokenizer.py  the tokenizer to decode with; special and end-of-turn ids
    stats.py      --stats: lengths, trained fraction, histogram, packing with the training planner
    audit.py      --audit [--source]: mechanical checks, batch by batch
    render.py     how it is shown: trained vs masked spans, token cells, the stats and audit tables

Everything streams the tokenized JSONL (format in `minitrain.data.format`) once, front to back. A preference
file (pairs) is shown pair by pair (the shared prompt once, then each response), `--stats` gives its prompt,
chosen and rejected lengths and margins, `--audit` checks both sides of every pair plus the pair checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.config import InspectConfig
from minitrain.data.format import is_pair_file, read_sidecar
from minitrain.errors import UserError
from minitrain.inspect.audit import AuditReport, audit_file
from minitrain.inspect.select import SelectedSample, first_sample, select_samples
from minitrain.inspect.stats import (
    DatasetStats,
    PairStats,
    StatsAccumulator,
    compute_pair_stats,
    compute_stats,
)
from minitrain.inspect.tokenizer import load_tokenizer, special_token_ids

# ---------------------------------------------------------------------------------------------- the stage


@dataclass
class InspectResult:
    """What `inspect_file` found; the CLI renders it."""

    config: InspectConfig
    meta: dict[str, Any] | None
    tokenizer: Any | None
    special_ids: frozenset[int]
    samples: list[SelectedSample] | None = None
    stats: DatasetStats | PairStats | None = None
    audit: AuditReport | None = None
    pairs: bool = False  # a preference file: each selected "sample" is a pair


def inspect_file(config: InspectConfig) -> InspectResult:
    """Run what the config asks for: the sample view's selection, `--stats`, `--audit`."""
    path = Path(config.path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the OUT.jsonl written by `minitrain tokenize`")
    meta = read_sidecar(path)
    pairs = is_pair_file(path, meta)
    first_sample(path, pairs)
    if pairs and config.source is not None:
        raise UserError(
            f"--source {config.source}: compares SFT samples with their messages; {path} holds preference "
            "pairs, audited without it (drop --source)"
        )
    tokenizer = None
    special: frozenset[int] = frozenset()
    if config.shows_samples or config.audit:
        tokenizer = load_tokenizer(path, meta, config.model_name_or_path)
        special = special_token_ids(tokenizer)
    result = InspectResult(config=config, meta=meta, tokenizer=tokenizer, special_ids=special, pairs=pairs)
    if config.shows_samples:
        grep = None
        if config.grep is not None:
            needle = config.grep

            def grep(sample: dict[str, Any]) -> bool:
                sides = (sample["chosen"], sample["rejected"]) if pairs else (sample,)
                return any(
                    needle
                    in tokenizer.decode(
                        side["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False
                    )
                    for side in sides
                )

        result.samples = select_samples(
            path,
            n=config.n,
            indices=config.indices,
            random_k=config.random_k,
            seed=config.seed,
            grep=grep,
            pairs=pairs,
        )
    acc = StatsAccumulator() if config.stats and config.audit and not pairs else None
    if config.audit:
        result.audit = audit_file(path, tokenizer, meta, source=config.source, stats=acc, pairs=pairs)
    if config.stats and pairs:
        result.stats = compute_pair_stats(path)
    elif config.stats:
        result.stats = compute_stats(
            path,
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            batch_size=config.batch_size,
            nproc=config.nproc,
            seed=config.seed,
            collected=acc,  # with --audit, its pass collected them
        )
    if result.stats is not None:  # what the sidecar counted of the rendering (absent in older sidecars)
        dropped = (meta or {}).get("reasoning_dropped_by_template")
        unread = (meta or {}).get("chat_template_kwargs_unread")
        result.stats = dataclasses.replace(
            result.stats,
            reasoning_dropped=dropped if isinstance(dropped, dict) else None,
            template_kwargs_unread=unread if isinstance(unread, dict) and unread else None,
        )
    return result
