"""`minitrain train --dry-run`: replay the sampler and the planner of a run without a model or a GPU.

Owns the run plan report. `dry_run(...)` opens the store, draws the same global batches as the training
loop (same sampler, same seed, same stop rule, same skipping of batches with nothing to train), plans each
one with `plan_minibatches`, and summarises: optimizer steps per epoch, minibatches (gradient accumulation)
per step, tokens per rank per minibatch, imbalance, padding-free utilisation, samples dropped as too long
and which ones, trained tokens per step, and - when the model's config.json is readable - the memory per
rank of parameters, gradients and AdamW state for fp32 / bf16 master weights under FULL_SHARD / NO_SHARD.
With `report_path` the per-step plan is written as JSON (sample ids per rank per minibatch).

Trade-off: the memory estimate counts parameters from the config with the Llama-family formula (embeddings,
attention with grouped KV heads, gated MLP, norms, optional experts) instead of building the model on the
meta device: no torch import and no model code, at the price of ignoring biases and exotic blocks (a few %
off for such models). Activations and the all-gathered block of FSDP are not included.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from minitrain.data.format import atomic_write
from minitrain.data.packing import lower_bound, plan_minibatches
from minitrain.data.sampler import InfiniteSampler
from minitrain.data.store import TokenStore
from minitrain.errors import UserError

MAX_LISTED_DROPS = 1000  # dropped samples listed in the report (all are counted)


@dataclass
class Stats:
    """min / mean / max of one quantity."""

    min: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: list[float] | np.ndarray) -> Stats:
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return cls(0.0, 0.0, 0.0)
        return cls(float(arr.min()), float(arr.mean()), float(arr.max()))


@dataclass
class DryRunReport:
    """What a run would do, step by step, summarised (see the module docstring)."""

    data_path: str
    num_samples: int
    num_tokens: int
    batch_size: int
    max_tokens_per_gpu: int
    world_size: int
    seed: int
    stop: str  # the stop criterion in words
    steps: int  # optimizer steps planned
    steps_per_epoch: int  # ceil(num_samples / batch_size)
    epochs: float  # passes over the data the planned steps make
    skipped_batches: int  # global batches with no trained token (the loop skips them without a step)
    minibatches_per_step: Stats
    minibatches_total: int
    at_lower_bound: float  # fraction of steps whose minibatch count equals the lower bound
    tokens_per_rank: Stats  # tokens of one rank in one minibatch (empty ranks count as 0)
    empty_rank_slots: int  # (minibatch, rank) pairs with no sample: the rank runs a 1-token dummy
    imbalance: Stats  # per minibatch: busiest rank's tokens / mean rank's tokens (1.0 = perfect)
    balance: (
        float  # sum of max(tokens/ranks, longest) over steps / sum of busiest-rank tokens (1.0 = perfect)
    )
    utilization: float  # tokens / (minibatches x ranks x max_tokens_per_gpu): the padding-free fill
    trained_tokens_per_step: Stats  # labels trained after the shift, summed over the global batch
    tokens_per_step: Stats
    dropped_samples: int  # distinct samples longer than max_tokens_per_gpu (never trained)
    dropped_occurrences: int  # times such samples were drawn in the planned steps
    dropped: list[dict[str, int]] = field(default_factory=list)  # {index, source_line, length}, sorted
    memory: dict[str, Any] | None = None  # see estimate_memory
    memory_note: str | None = None
    seconds: float = 0.0
    report_path: str | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return asdict(self)


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama-family decoder from its config.json (biases ignored)."""
    text = config.get("text_config") or config
    h = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    vocab = int(text["vocab_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)
    inter = int(text.get("intermediate_size") or 4 * h)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    moe_inter = int(text.get("moe_intermediate_size") or inter)
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * h * (moe_inter if experts > 1 else inter) * experts + (h * experts if experts > 1 else 0)
    per_layer = attention + mlp + 2 * h  # two RMSNorms
    embeddings = vocab * h * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return embeddings + layers * per_layer + h


def estimate_memory(num_params: int, world_size: int) -> dict[str, Any]:
    """GiB per rank of params + grads + AdamW's two states, for each master dtype and sharding strategy."""
    gib = 1024**3
    out: dict[str, Any] = {"num_params": num_params, "rows": []}
    for master, nbytes in (("fp32", 4), ("bf16", 2)):
        for strategy, shards in (("FULL_SHARD", world_size), ("NO_SHARD", 1)):
            params = num_params * nbytes / shards / gib
            grads = num_params * nbytes / shards / gib
            optim = 2 * num_params * nbytes / shards / gib
            out["rows"].append(
                {
                    "master_dtype": master,
                    "strategy": strategy,
                    "params_gib": params,
                    "grads_gib": grads,
                    "optimizer_gib": optim,
                    "total_gib": params + grads + optim,
                }
            )
    return out


def _model_memory(
    model_name_or_path: str | None, world_size: int
) -> tuple[dict[str, Any] | None, str | None]:
    if not model_name_or_path:
        return None, "no model given"
    path = Path(model_name_or_path).expanduser()
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        try:  # a Hub id: the config may be in the local cache (nothing downloads)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=True).to_dict()
        except Exception as err:  # noqa: BLE001 - any failure only means "no estimate"
            return None, f"model config not readable ({type(err).__name__}); no memory estimate"
    else:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            return None, f"{config_file}: not readable ({err}); no memory estimate"
    try:
        num_params = count_parameters(config)
    except (KeyError, TypeError, ValueError) as err:
        return None, f"model config lacks {err} for the parameter count; no memory estimate"
    return estimate_memory(num_params, world_size), (
        "parameters, gradients and AdamW state only; activations and FSDP's all-gathered block come on top"
    )


def _stop_rule(
    max_steps: int | None, max_samples: int | None, max_epochs: float | None, steps_per_epoch: int
) -> tuple[str, int | None]:
    """(description, step cap) mirroring the training loop's stop rule; no criterion = one epoch."""
    if max_steps is not None:
        return f"{max_steps} steps (--max-steps)", max_steps
    if max_samples is not None:
        return f"{max_samples} trained samples (--max-samples)", None
    if max_epochs is not None:
        return f"{max_epochs:g} epochs (--max-epochs)", None
    return (
        f"one epoch = {steps_per_epoch} steps (no stop criterion given; training would run until stopped)",
        (steps_per_epoch),
    )


def dry_run(
    *,
    data_path: Path,
    batch_size: int,
    max_tokens_per_gpu: int,
    world_size: int,
    seed: int,
    max_steps: int | None,
    max_samples: int | None,
    max_epochs: float | None,
    model_name_or_path: str | None,
    report_path: Path | None,
) -> DryRunReport:
    """Replay sampler + planner for the run's steps (one epoch without a stop criterion) and report."""
    started = time.perf_counter()
    if batch_size <= 0:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_tokens_per_gpu <= 0:
        raise UserError(f"--max-tokens-per-gpu must be >= 1, got {max_tokens_per_gpu}")
    if world_size <= 0:
        raise UserError(f"the number of ranks must be >= 1, got {world_size}")
    for flag, value in (
        ("--max-steps", max_steps),
        ("--max-samples", max_samples),
        ("--max-epochs", max_epochs),
    ):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    store = TokenStore.open(Path(data_path))
    n, lengths, budget = len(store), store.lengths, int(max_tokens_per_gpu)
    too_long = lengths > budget
    if too_long.all():
        raise UserError(
            f"every sample is longer than --max-tokens-per-gpu {budget} (shortest: {int(lengths.min())} "
            "tokens); raise --max-tokens-per-gpu or tokenize with a lower --max-seq-len"
        )
    if int(store.num_trained[~too_long].sum()) == 0:
        raise UserError(
            f"{data_path}: no sample that fits has a trained token; check the masking in tokenize"
        )
    steps_per_epoch = math.ceil(n / batch_size)
    stop, step_cap = _stop_rule(max_steps, max_samples, max_epochs, steps_per_epoch)

    sampler = InfiniteSampler(num_samples=n, seed=seed)
    steps = skipped = samples_seen = 0
    mb_counts: list[int] = []
    bounds_hit = 0
    rank_tokens: list[np.ndarray] = []
    imbalance: list[float] = []
    busiest_sum = floor_sum = 0.0
    trained_per_step: list[int] = []
    tokens_per_step: list[int] = []
    dropped_occurrences = 0
    plan_json: list[dict[str, Any]] = []
    while True:
        if step_cap is not None and steps >= step_cap:
            break
        if max_samples is not None and samples_seen >= max_samples:
            break
        if max_epochs is not None and sampler.epochs_consumed >= max_epochs - 1e-12:
            break
        epoch, position = sampler.epoch, sampler.position
        indices = np.asarray(sampler.next_batch(batch_size), dtype=np.int64)
        lens = lengths[indices]
        plan = plan_minibatches(lens, budget, world_size)
        placed = [i for mb in plan for r in mb for i in r]
        trained = int(store.num_trained[indices[placed]].sum()) if placed else 0
        dropped_occurrences += int((lens > budget).sum())
        if trained == 0:
            skipped += 1
            continue
        steps += 1
        samples_seen += len(placed)
        loads = np.array([[int(lens[r].sum()) if r else 0 for r in mb] for mb in plan], dtype=np.int64)
        mb_counts.append(len(plan))
        bounds_hit += len(plan) == lower_bound(lens, budget, world_size)
        rank_tokens.append(loads.ravel())
        imbalance += (loads.max(1) / np.maximum(loads.mean(1), 1e-9)).tolist()
        fit = lens[lens <= budget]
        busiest_sum += float(loads.max(1).sum())
        floor_sum += max(float(fit.sum()) / world_size, float(fit.max()))
        trained_per_step.append(trained)
        tokens_per_step.append(int(fit.sum()))
        if report_path is not None:
            plan_json.append(
                {
                    "step": steps,
                    "epoch": epoch,
                    "position": position,
                    "samples": indices.tolist(),
                    "minibatches": [[indices[r].tolist() for r in mb] for mb in plan],
                    "tokens": loads.tolist(),
                    "trained_tokens": trained,
                }
            )
    all_ranks = np.concatenate(rank_tokens) if rank_tokens else np.zeros(0, dtype=np.int64)
    drop_idx = np.flatnonzero(too_long)
    memory, memory_note = _model_memory(model_name_or_path, world_size)
    report = DryRunReport(
        data_path=str(data_path),
        num_samples=n,
        num_tokens=int(store.num_tokens),
        batch_size=batch_size,
        max_tokens_per_gpu=budget,
        world_size=world_size,
        seed=seed,
        stop=stop,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        epochs=sampler.epochs_consumed,
        skipped_batches=skipped,
        minibatches_per_step=Stats.of(mb_counts),
        minibatches_total=int(sum(mb_counts)),
        at_lower_bound=bounds_hit / steps if steps else 1.0,
        tokens_per_rank=Stats.of(all_ranks),
        empty_rank_slots=int((all_ranks == 0).sum()),
        imbalance=Stats.of(imbalance),
        balance=floor_sum / busiest_sum if busiest_sum else 1.0,
        utilization=float(all_ranks.sum()) / (all_ranks.size * budget) if all_ranks.size else 0.0,
        trained_tokens_per_step=Stats.of(trained_per_step),
        tokens_per_step=Stats.of(tokens_per_step),
        dropped_samples=int(drop_idx.size),
        dropped_occurrences=dropped_occurrences,
        dropped=[
            {"index": int(i), "source_line": int(store.source_lines[i]), "length": int(lengths[i])}
            for i in drop_idx[:MAX_LISTED_DROPS]
        ],
        memory=memory,
        memory_note=memory_note,
        report_path=str(report_path) if report_path is not None else None,
    )
    report.seconds = time.perf_counter() - started
    if report_path is not None:
        with atomic_write(Path(report_path)) as f:
            f.write(
                orjson.dumps({"summary": report.summary(), "steps": plan_json}, option=orjson.OPT_INDENT_2)
            )
    return report


def render_dry_run(report: DryRunReport, console: Any) -> None:
    """Print the report as rich tables on `console` (a rich.console.Console)."""
    from rich.table import Table

    def size(gib: float) -> str:
        return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"

    def stats(s: Stats, fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(s.min)} / {fmt.format(s.mean)} / {fmt.format(s.max)}"

    run = Table(title=f"dry run: {report.data_path}", show_header=False, title_justify="left")
    run.add_column(style="bold")
    run.add_column()
    rows = [
        ("samples / tokens", f"{report.num_samples:,} / {report.num_tokens:,}"),
        ("ranks x max tokens per rank", f"{report.world_size} x {report.max_tokens_per_gpu:,}"),
        ("batch size (samples per step)", f"{report.batch_size:,}"),
        ("stop", report.stop),
        ("optimizer steps planned", f"{report.steps:,} ({report.epochs:.2f} epochs)"),
        ("optimizer steps per epoch", f"{report.steps_per_epoch:,}"),
        ("minibatches per step (min/mean/max)", stats(report.minibatches_per_step, "{:.2f}")),
        ("steps at the lower bound", f"{report.at_lower_bound:.1%}"),
        ("tokens per rank per minibatch", stats(report.tokens_per_rank)),
        ("empty ranks (1-token dummies)", f"{report.empty_rank_slots:,} of {report.minibatches_total * report.world_size:,}"),
        ("imbalance busiest/mean (min/mean/max)", stats(report.imbalance, "{:.3f}")),
        ("balance (1.0 = no rank waits)", f"{report.balance:.4f}"),
        ("padding-free utilization", f"{report.utilization:.1%}"),
        ("tokens per step", stats(report.tokens_per_step)),
        ("trained tokens per step", stats(report.trained_tokens_per_step)),
        ("dropped as too long", f"{report.dropped_samples:,} samples ({report.dropped_occurrences:,} draws)"),
    ]  # fmt: skip
    if report.skipped_batches:
        rows.append(("batches skipped (nothing to train)", f"{report.skipped_batches:,}"))
    rows.append(("planned in", f"{report.seconds:.2f} s"))
    if report.report_path:
        rows.append(("per-step plan written to", report.report_path))
    for row in rows:
        run.add_row(*row)
    console.print(run)
    if report.dropped:
        drops = Table(title="samples longer than --max-tokens-per-gpu (never trained)", title_justify="left")
        for col in ("index", "JSONL line", "tokens"):
            drops.add_column(col, justify="right")
        for d in report.dropped[:10]:
            drops.add_row(f"{d['index']:,}", f"{d['source_line']:,}", f"{d['length']:,}")
        if report.dropped_samples > 10:
            drops.add_row("...", f"{report.dropped_samples - 10:,} more", "")
        console.print(drops)
    if report.memory:
        mem = Table(
            title=f"memory per rank, {report.memory['num_params'] / 1e6:,.1f}M parameters, "
            f"{report.world_size} ranks",
            title_justify="left",
        )
        for col in ("master", "sharding", "params", "grads", "AdamW", "total"):
            mem.add_column(col, justify="right")
        for r in report.memory["rows"]:
            mem.add_row(
                r["master_dtype"], r["strategy"], size(r["params_gib"]), size(r["grads_gib"]),
                size(r["optimizer_gib"]), size(r["total_gib"]),
            )  # fmt: skip
        console.print(mem)
    if report.memory_note:
        console.print(f"[dim]memory: {report.memory_note}[/]")
