"""`minitrain train --dry-run`: replay the sampler and the planner of a run without a model or a GPU.

Owns the run plan report. `dry_run(...)` opens the store, draws the same global batches as the training
loop (same sampler, same seed, same stop rule, same skipping of batches with nothing to train), plans each
one with `plan_minibatches`, and summarises: optimizer steps per epoch, minibatches (gradient accumulation)
per step, tokens per rank per minibatch, imbalance, padding-free utilisation, samples dropped as too long
and which ones, trained tokens per step, and - when the model's config.json is readable - the memory per
rank of parameters, gradients and AdamW state for fp32 / bf16 master weights under FULL_SHARD / NO_SHARD.
With `report_path` the per-step plan is written as JSON (sample ids per rank per minibatch).

The memory follows what training holds (`estimate_memory`, a table of `memory.state_bytes`):
  full   every parameter in the master dtype with its gradient and two AdamW states, sharded (FULL_SHARD:
         / ranks; NO_SHARD: whole).
  lora   the base frozen in the master dtype (no gradient, no AdamW state), sharded the same way; the
         adapter, R x (in + out) per targeted linear layer, in the master dtype with gradients and AdamW.
  qlora  as lora, but the decoder blocks' linear weights are NF4 with double-quantized scales
         (NF4_BYTES_PER_WEIGHT) and whole on every rank under any strategy; embeddings, lm_head and norms
         stay frozen in the master dtype, sharded.

Trade-off: the memory estimate counts parameters from the config with the Llama-family formula (embeddings,
attention with grouped KV heads, gated MLP, norms, optional experts) instead of building the model on the
meta device: no torch import and no model code, at the price of ignoring biases and exotic blocks (a few %
off for such models). Experts are counted as one gate/up/down linear each, as transformers 4 builds them;
transformers 5 fuses them into 3-D tensors that bitsandbytes leaves unquantized and PEFT adapts otherwise,
so adapter and QLoRA figures for MoE models are rough (the report's note says so). The whole peak per GPU
(activations with and without checkpointing, FSDP's gathered blocks, the loss head, --cpu-offload) for the
largest minibatch of the plan is `minitrain.train.memory`'s, built from `model_shape(config)` (`peak_rows`).
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

from minitrain.atomic import atomic_write
from minitrain.data.packing import lower_bound, plan_minibatches
from minitrain.data.sampler import InfiniteSampler, StopRule, split_validation
from minitrain.data.store import TokenStore
from minitrain.data.store import truncate as truncate_store
from minitrain.errors import UserError
from minitrain.train.memory import (
    GIB,
    NF4_BYTES_PER_WEIGHT,
    ModelShape,
    RankPlan,
    block_linear_weights,
    block_linears,
    count_parameters,
    estimate_peak,
    lora_parameters,
    model_shape,
    num_experts,
    state_bytes,
)

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
    steps_per_epoch: int  # ceil(samples drawn / batch_size): all but --validation-split's held-out ones
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
    unit: str = "samples"  # what is counted as a sample: "pairs" for --objective dpo
    truncated_samples: int = 0  # with --truncate: samples cut to max_tokens_per_gpu tokens (none dropped)
    truncated_tokens: int = 0  # with --truncate: tokens cut off them
    memory: dict[str, Any] | None = None  # see estimate_memory
    memory_note: str | None = None
    seconds: float = 0.0
    report_path: str | None = None
    compile: bool = False  # --compile: the decoder blocks compile during the first step

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return asdict(self)


def estimate_memory(
    num_params: int, world_size: int, *, trainable_params: int | None = None, nf4_params: int = 0
) -> dict[str, Any]:
    """GiB per rank of params + grads + AdamW's two states, for each master dtype and sharding strategy.

    `num_params` is the model's; `trainable_params` None means full fine-tuning, else the base is frozen
    and an adapter of `trainable_params` trains beside it; `nf4_params` of the base are NF4 weights held
    whole on every rank (QLoRA). Each row splits params_gib into trainable_gib (the trained weights),
    frozen_gib (the frozen base in the master dtype) and nf4_gib.
    """
    mode = "full" if trainable_params is None else "qlora" if nf4_params else "lora"
    out: dict[str, Any] = {
        "mode": mode,
        "num_params": num_params,
        "trainable_params": num_params if trainable_params is None else trainable_params,
        "frozen_params": 0 if trainable_params is None else num_params - nf4_params,
        "nf4_params": nf4_params,
        "rows": [],
    }
    for master, nbytes in (("fp32", 4), ("bf16", 2)):
        for strategy, shards in (("FULL_SHARD", world_size), ("NO_SHARD", 1)):
            state = state_bytes(
                num_params, shards, nbytes, trainable_params=trainable_params, nf4_params=nf4_params
            )
            gib = {k: v / GIB for k, v in state.items()}
            out["rows"].append(
                {
                    "master_dtype": master,
                    "strategy": strategy,
                    "params_gib": gib["weights"],
                    "trainable_gib": gib["trainable"],
                    "frozen_gib": gib["frozen"],
                    "nf4_gib": gib["nf4"],
                    "grads_gib": gib["grads"],
                    "optimizer_gib": gib["optimizer"],
                    "total_gib": gib["weights"] + gib["grads"] + gib["optimizer"],
                }
            )
    return out


def _model_memory(
    model_name_or_path: str | None,
    world_size: int,
    *,
    lora_rank: int | None = None,
    lora_target_modules: str = "all-linear",
    load_in_4bit: bool = False,
    tokens: int = 0,
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
    notes = [
        "the first table: parameters, gradients and AdamW state; the second: the whole peak per GPU "
        "(minitrain.train.memory), validated on the CPU within 10% (benchmarks/bench_memory.py), not on a GPU"
    ]
    try:
        num_params = count_parameters(config)
        shape = model_shape(config)
        if lora_rank is None:
            memory = estimate_memory(num_params, world_size)
            memory["peak"] = peak_rows(shape, world_size, tokens, None, 0)
            return memory, notes[0]
        trainable, targets, unknown = lora_parameters(config, lora_rank, lora_target_modules)
        nf4 = block_linear_weights(config) if load_in_4bit else 0
    except (KeyError, TypeError, ValueError) as err:
        return None, f"model config lacks {err} for the parameter count; no memory estimate"
    memory = estimate_memory(num_params, world_size, trainable_params=trainable, nf4_params=nf4)
    memory["peak"] = peak_rows(shape, world_size, tokens, trainable, nf4)
    memory.update(lora_rank=lora_rank, lora_target_modules=lora_target_modules, lora_targets=targets)
    if not targets:
        notes.append(
            f"--lora-target-modules {lora_target_modules} names no linear layer of a decoder block "
            f"({', '.join(block_linears(config))}): no adapter counted, and training would stop with "
            "PEFT's error"
        )
    elif unknown:
        notes.append(
            f"--lora-target-modules: no decoder-block linear layer named {', '.join(unknown)}; not counted"
        )
    if load_in_4bit:
        notes.append(
            f"the decoder blocks' linear weights in NF4 at {NF4_BYTES_PER_WEIGHT:.3f} bytes a weight, "
            "whole on every rank; embeddings, lm_head and norms frozen in the master dtype"
        )
    if num_experts(config) > 1:
        notes.append(
            "MoE: experts counted as separate linear layers (transformers 4); transformers 5 fuses them, "
            "keeps them out of NF4 and PEFT adapts them otherwise, so the adapter and NF4 figures are rough"
        )
    return memory, "; ".join(notes)


def peak_rows(
    shape: ModelShape, world_size: int, tokens: int, trainable: int | None, nf4: int
) -> list[dict[str, Any]]:
    """The predicted peak per GPU (bf16 compute, FULL_SHARD) of the largest minibatch, for fp32 / bf16 master
    weights, with and without activation checkpointing and with --cpu-offload."""
    rows = []
    for master, nbytes in (("fp32", 4), ("bf16", 2)):
        for ac, offload in ((False, False), (True, False), (True, True)):
            plan = RankPlan(
                tokens=max(tokens, 1), shards=world_size, master_bytes=nbytes, compute_bytes=2,
                checkpointing=ac, trainable_params=trainable, nf4_params=nf4, cpu_offload=offload,
            )  # fmt: skip
            est = estimate_peak(shape, plan)
            rows.append({
                "master_dtype": master, "activation_checkpointing": ac, "cpu_offload": offload,
                "tokens": tokens, "peak_gib": est.total_gib, "peak_at": est.peak_at,
                **{f"{k}_gib": v / GIB for k, v in est.parts.items()},
            })  # fmt: skip
    return rows


def _stop_rule(
    max_steps: int | None,
    max_samples: int | None,
    max_epochs: float | None,
    steps_per_epoch: int,
    max_tokens: int | None = None,
) -> tuple[str, StopRule]:
    """(description, the training loop's stop rule); no criterion = one epoch."""
    rule = StopRule(max_steps, max_samples, max_epochs, max_tokens)
    if max_steps is not None:
        return f"{max_steps} steps (--max-steps)", rule
    if max_samples is not None:
        return f"{max_samples} trained samples (--max-samples)", rule
    if max_epochs is not None:
        return f"{max_epochs:g} epochs (--max-epochs)", rule
    if max_tokens is not None:
        return f"{max_tokens:,} trained tokens (--max-tokens)", rule
    return (
        f"one epoch = {steps_per_epoch} steps (no stop criterion given; training would run until stopped)",
        StopRule(max_steps=steps_per_epoch),
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
    max_tokens: int | None = None,
    lora_rank: int | None = None,
    lora_target_modules: str = "all-linear",
    load_in_4bit: bool = False,
    truncate: bool = False,
    objective: str = "sft",
    validation_split: float | None = None,
    compile: bool = False,
) -> DryRunReport:
    """Replay sampler + planner for the run's steps (one epoch without a stop criterion) and report.

    `lora_rank`, `lora_target_modules` and `load_in_4bit` shape the memory estimate as `train` would run
    (None: full fine-tuning). `truncate` cuts longer samples (pairs) to fit `max_tokens_per_gpu` as
    `train --truncate` does (`minitrain.data.store.truncate`), instead of dropping them. With `objective`
    "dpo" the unit is the preference pair (both sides packed together, as `train --objective dpo` does):
    every count that says samples counts pairs. `validation_split` holds out the samples `train
    --validation-split` would: the plan draws only the others (`num_samples` still counts them all).
    """
    started = time.perf_counter()
    # the values come from a validated TrainConfig (`minitrain.config`): not checked again here
    store = TokenStore.open(Path(data_path), objective)
    truncated_samples = truncated_tokens = 0
    if truncate:
        store, cut = truncate_store(store, int(max_tokens_per_gpu), objective)
        truncated_samples, truncated_tokens = cut.cut, cut.tokens_cut
    n, lengths, budget = len(store), store.lengths, int(max_tokens_per_gpu)
    num_trained, source_lines, unit = store.num_trained, store.source_lines, "samples"
    if objective == "dpo":  # the pair is the unit: both sides' tokens, trained tokens and source line
        n, lengths, unit = store.num_pairs, store.pair_lengths, "pairs"
        num_trained, source_lines = (
            store.num_trained[0::2] + store.num_trained[1::2],
            store.source_lines[0::2],
        )
    too_long = lengths > budget
    if too_long.all():
        raise UserError(
            f"every sample is longer than --max-tokens-per-gpu {budget} (shortest: {int(lengths.min())} "
            "tokens); raise --max-tokens-per-gpu or tokenize with a lower --max-sample-num-tokens"
        )
    if int(num_trained[~too_long].sum()) == 0:
        raise UserError(
            f"{data_path}: no sample that fits has a trained token; check the masking in tokenize"
        )
    trained_ids = None  # --validation-split: the sampler draws only these
    if validation_split is not None:
        trained_ids = split_validation(n, validation_split, seed)[0]
    num_drawn = n if trained_ids is None else len(trained_ids)
    steps_per_epoch = math.ceil(num_drawn / batch_size)
    stop, rule = _stop_rule(max_steps, max_samples, max_epochs, steps_per_epoch, max_tokens)

    sampler = InfiniteSampler(num_samples=num_drawn, seed=seed, ids=trained_ids)
    steps = skipped = samples_seen = tokens_seen = 0
    mb_counts: list[int] = []
    bounds_hit = 0
    rank_tokens: list[np.ndarray] = []
    imbalance: list[float] = []
    busiest_sum = floor_sum = 0.0
    trained_per_step: list[int] = []
    tokens_per_step: list[int] = []
    dropped_occurrences = 0
    plan_json: list[dict[str, Any]] = []
    while not rule.reached(
        steps=steps, samples_seen=samples_seen, epochs=sampler.epochs_consumed, tokens_seen=tokens_seen
    ):
        epoch, position = sampler.epoch, sampler.position
        indices = np.asarray(sampler.next_batch(batch_size), dtype=np.int64)
        lens = lengths[indices]
        plan = plan_minibatches(lens, budget, world_size)
        placed = [i for mb in plan for r in mb for i in r]
        trained = int(num_trained[indices[placed]].sum()) if placed else 0
        dropped_occurrences += int((lens > budget).sum())
        if trained == 0:
            skipped += 1
            continue
        steps += 1
        samples_seen += len(placed)
        loads = np.array([[int(lens[r].sum()) if r else 0 for r in mb] for mb in plan], dtype=np.int64)
        tokens_seen += int(loads.sum())  # the loop's num_total_tokens: every token of the placed samples
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
    memory, memory_note = _model_memory(
        model_name_or_path,
        world_size,
        lora_rank=lora_rank,
        lora_target_modules=lora_target_modules,
        load_in_4bit=load_in_4bit,
        tokens=int(all_ranks.max()) if all_ranks.size else budget,
    )
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
            {"index": int(i), "source_line": int(source_lines[i]), "length": int(lengths[i])}
            for i in drop_idx[:MAX_LISTED_DROPS]
        ],
        truncated_samples=truncated_samples,
        truncated_tokens=truncated_tokens,
        memory=memory,
        memory_note=memory_note,
        report_path=str(report_path) if report_path is not None else None,
        unit=unit,
        compile=compile,
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
        (f"{report.unit} / tokens", f"{report.num_samples:,} / {report.num_tokens:,}"),
        ("ranks x max tokens per rank", f"{report.world_size} x {report.max_tokens_per_gpu:,}"),
        (f"batch size ({report.unit} per step)", f"{report.batch_size:,}"),
        ("stop", report.stop),
        ("optimizer steps planned", f"{report.steps:,} ({report.epochs:.2f} epochs)"),
        ("optimizer steps per epoch", f"{report.steps_per_epoch:,}"),
        ("minibatches per step (min/mean/max)", stats(report.minibatches_per_step, "{:.2f}")),
        ("steps at the lower bound", f"{report.at_lower_bound:.1%}"),
        ("tokens per rank per minibatch", stats(report.tokens_per_rank)),
        (
            "empty ranks (1-token dummies)",
            f"{report.empty_rank_slots:,} of {report.minibatches_total * report.world_size:,}",
        ),
        ("imbalance busiest/mean (min/mean/max)", stats(report.imbalance, "{:.3f}")),
        ("balance (1.0 = no rank waits)", f"{report.balance:.4f}"),
        ("padding-free utilization", f"{report.utilization:.1%}"),
        ("tokens per step", stats(report.tokens_per_step)),
        ("trained tokens per step", stats(report.trained_tokens_per_step)),
        (
            "dropped as too long",
            f"{report.dropped_samples:,} {report.unit} ({report.dropped_occurrences:,} draws)",
        ),
        (
            "cut by --truncate",
            f"{report.truncated_samples:,} {report.unit} ({report.truncated_tokens:,} tokens)",
        ),
    ]  # fmt: skip
    if report.skipped_batches:
        rows.append(("batches skipped (nothing to train)", f"{report.skipped_batches:,}"))
    if report.compile:
        rows.append(("--compile", "each decoder block compiles in the first step (and the first eval)"))
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
        console.print(_memory_table(report.memory, report.world_size, size))
        if report.memory.get("peak"):
            console.print(_peak_table(report.memory["peak"], report.world_size, size))
    if report.memory_note:
        console.print(f"[dim]memory: {report.memory_note}[/]")


def _memory_table(memory: dict[str, Any], world_size: int, size: Any) -> Any:
    """The memory per rank as a rich table whose title and columns say what is estimated."""
    from rich.table import Table

    def count(n: int) -> str:
        return f"{n / 1e6:,.1f}M" if n >= 100_000 else f"{n:,}"

    mode = memory.get("mode", "full")
    if mode == "full":
        what = f"full fine-tuning of {count(memory['num_params'])} parameters"
        parts = [("params", "params_gib")]
    else:
        name = "QLoRA" if mode == "qlora" else "LoRA"
        what = (
            f"{name} r{memory['lora_rank']} on {memory['lora_target_modules']}: "
            f"{count(memory['trainable_params'])} trainable of {count(memory['num_params'])} parameters"
        )
        parts = [("frozen base", "frozen_gib"), ("adapter", "trainable_gib")]
        if mode == "qlora":
            what += f" ({count(memory['nf4_params'])} in NF4 on every rank)"
            parts = [("NF4 base", "nf4_gib"), ("frozen rest", "frozen_gib"), ("adapter", "trainable_gib")]
    table = Table(title=f"memory per rank, {what}, {world_size} ranks", title_justify="left")
    columns = ["master", "sharding", *(label for label, _ in parts), "grads", "AdamW", "total"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in memory["rows"]:
        table.add_row(
            r["master_dtype"], r["strategy"], *(size(r[key]) for _, key in parts), size(r["grads_gib"]),
            size(r["optimizer_gib"]), size(r["total_gib"]),
        )  # fmt: skip
    return table


def _peak_table(rows: list[dict[str, Any]], world_size: int, size: Any) -> Any:
    """The predicted peak per GPU as a rich table (bf16 compute, FULL_SHARD over the ranks)."""
    from rich.table import Table

    tokens = rows[0]["tokens"]
    table = Table(
        title=f"predicted peak per GPU, bf16 compute, FULL_SHARD over {world_size} ranks, largest minibatch "
        f"{tokens:,} tokens",
        title_justify="left",
    )
    for col in (
        "master",
        "activation ckpt",
        "cpu offload",
        "state",
        "activations",
        "loss head",
        "peak",
        "at",
    ):
        table.add_column(col, justify="left" if col in ("master", "at") else "right")
    for r in rows:
        state = sum(r.get(f"{k}_gib", 0.0) for k in ("weights", "grads", "optimizer", "gathered"))
        table.add_row(
            r["master_dtype"],
            "on" if r["activation_checkpointing"] else "off",
            "on" if r["cpu_offload"] else "off",
            size(state), size(r["activations_gib"]), size(r["loss_head_gib"]), size(r["peak_gib"]),
            r["peak_at"],
        )  # fmt: skip
    return table
