"""`minitrain train`: parse the flags into a `TrainConfig`, check everything, launch torchrun, report.

Flag names are mini_trainer's (`--data-path`, `--max-tokens-per-gpu`, `--min-samples-per-checkpoint`, ...),
so its users' command works with `torchrun --nnodes=1 --nproc-per-node=8 train.py` replaced by
`minitrain train --nproc 8`. Every value is validated here, in the parent, before any process is spawned
(`TrainConfig.__post_init__`, then `minitrain.train.launch.check_inputs`, which needs no torch, so a user
error answers in well under a second; then `preflight`, which reads the model's config).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from minitrain.cli.configopt import apply_config_file
from minitrain.config import (
    LOGGING_LEVELS,
    LR_SCHEDULERS,
    MASTER_DTYPES,
    OBJECTIVES,
    PREFERENCE_LOSSES,
    RESUME_LATEST,
    SAVE_DTYPES,
    SHARDING_STRATEGIES,
    TrainConfig,
)
from minitrain.configfile import TRAINING_PARAMS_EXTRAS

_LAUNCH = "Launch"
_BATCH = "Batch"
_OPTIM = "Optimisation"
_STOP = "Stop and save"
_MODEL = "Model and memory"
_RESUME = "Resume and checkpoints"
_LORA = "Adapters (LoRA)"
_EVAL = "Evaluation"
_PREF = "Objective (preference pairs)"


def one_of(values: tuple[str, ...]):
    """Shell completion of an option's fixed values; the config validates them (a one-line error naming
    all)."""

    def complete(incomplete: str) -> list[str]:
        return [value for value in values if value.startswith(incomplete)]

    return complete


def _read_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """--config FILE: the file's values become the flags' defaults (the command line wins)."""
    apply_config_file(ctx, value, command=train, aliases=CONFIG_ALIASES, ignored=TRAINING_PARAMS_EXTRAS)
    return value


# training_params.json spells these TrainConfig fields differently from their flags
CONFIG_ALIASES = {"base_adapters": "base_adapter"}


def train(
    data_path: Annotated[
        Path,
        typer.Option(
            help="Tokenized JSONL written by `minitrain tokenize` (or mini_trainer).", show_default=False
        ),
    ],
    model_name_or_path: Annotated[
        str,
        typer.Option(
            help="Model folder, or Hub id (read from the local cache when there).",
            show_default=False,
        ),
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            help="Run directory: training_params.json, training_metrics_0.jsonl, hf_format/.",
            show_default=False,
        ),
    ],
    nproc: Annotated[
        int | None,
        typer.Option(
            help=r"Processes (GPUs) per node. \[default: the visible GPUs, or 1 without a GPU]",
            show_default=False,
            rich_help_panel=_LAUNCH,
        ),
    ] = None,
    nnodes: Annotated[int, typer.Option(help="Number of nodes.", rich_help_panel=_LAUNCH)] = 1,
    node_rank: Annotated[
        int, typer.Option(help="This node's rank (0..nnodes-1).", rich_help_panel=_LAUNCH)
    ] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of the rendezvous (node 0), the same on every node.", rich_help_panel=_LAUNCH
        ),
    ] = None,
    rdzv_id: Annotated[
        str, typer.Option(help="Job id shared by all nodes.", rich_help_panel=_LAUNCH)
    ] = "minitrain",
    batch_size: Annotated[
        int,
        typer.Option(help="Samples per optimizer step (the global batch, all GPUs).", rich_help_panel=_BATCH),
    ] = 128,
    max_tokens_per_gpu: Annotated[
        int,
        typer.Option(
            help="Token budget of one GPU's minibatch; changes speed and memory, never the result.",
            rich_help_panel=_BATCH,
        ),
    ] = 16384,
    truncate: Annotated[
        bool,
        typer.Option(
            help="Keep the first --max-tokens-per-gpu tokens of a longer sample instead of skipping it.",
            rich_help_panel=_BATCH,
        ),
    ] = False,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=_OPTIM)] = 5e-6,
    num_warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", rich_help_panel=_OPTIM)] = 10,
    lr_scheduler: Annotated[
        str,
        typer.Option(
            help="constant_with_warmup, cosine, linear or constant.",
            autocompletion=one_of(LR_SCHEDULERS),
            rich_help_panel=_OPTIM,
        ),
    ] = "constant_with_warmup",
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (matrices only).", rich_help_panel=_OPTIM)
    ] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option(help="Gradient clipping norm.", rich_help_panel=_OPTIM)
    ] = 1.0,
    beta1: Annotated[float, typer.Option(help="AdamW beta1.", rich_help_panel=_OPTIM)] = 0.9,
    beta2: Annotated[float, typer.Option(help="AdamW beta2.", rich_help_panel=_OPTIM)] = 0.95,
    eps: Annotated[float, typer.Option(help="AdamW epsilon.", rich_help_panel=_OPTIM)] = 1e-8,
    lr_scheduler_kwargs: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help="""The schedule's own arguments as a JSON object, e.g. '{"num_cycles": 0.5}' (cosine).""",
            show_default=False,
            rich_help_panel=_OPTIM,
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps.", rich_help_panel=_STOP)
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Stop after training this many samples.", rich_help_panel=_STOP)
    ] = None,
    max_epochs: Annotated[
        float | None,
        typer.Option(
            help="Stop after this many passes over the data (fractions allowed).", rich_help_panel=_STOP
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Stop after training this many tokens (all tokens of the trained samples).",
            show_default=False,
            rich_help_panel=_STOP,
        ),
    ] = None,
    checkpoint_at_epoch: Annotated[
        bool,
        typer.Option(
            help="Also save a checkpoint (hf_format/samples_N and its training state) after the step that "
            "ends each pass over the data.",
            rich_help_panel=_STOP,
        ),
    ] = False,
    save_final_checkpoint: Annotated[
        bool,
        typer.Option(
            "--save-final-checkpoint",
            help="Accepted for mini_trainer's command lines: minitrain always saves the final weights.",
            rich_help_panel=_STOP,
        ),
    ] = False,
    min_samples_per_checkpoint: Annotated[
        int | None,
        typer.Option(
            help="Save a checkpoint each time this many more samples are trained (always one at the end).",
            rich_help_panel=_STOP,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and of --from-scratch weights.")] = 42,
    use_liger_kernels: Annotated[
        bool, typer.Option(help="Liger's fused linear cross-entropy (GPU only).", rich_help_panel=_MODEL)
    ] = False,
    fsdp_sharding_strategy: Annotated[
        str,
        typer.Option(
            help="FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD.",
            autocompletion=one_of(SHARDING_STRATEGIES),
            rich_help_panel=_MODEL,
        ),
    ] = "FULL_SHARD",
    activation_checkpointing: Annotated[
        bool,
        typer.Option(
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Recompute each decoder block in backward (less memory, ~30% more compute).",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    compile: Annotated[
        bool,
        typer.Option(
            help="torch.compile each decoder block (faster steps after a compile of a minute or more "
            "at the first step).",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    from_scratch: Annotated[
        bool,
        typer.Option(
            help="Initialise the weights from the model's config (pretraining).", rich_help_panel=_MODEL
        ),
    ] = False,
    master_dtype: Annotated[
        str,
        typer.Option(
            help="fp32 or bf16 master weights and optimizer state (GPU).",
            autocompletion=one_of(MASTER_DTYPES),
            rich_help_panel=_MODEL,
        ),
    ] = "fp32",
    save_dtype: Annotated[
        str | None,
        typer.Option(
            help=r"dtype of the hf_format/ exports: fp32, bf16 or fp16. \[default: bf16 on GPU, else "
            "--master-dtype]",
            autocompletion=one_of(SAVE_DTYPES),
            show_default=False,
            rich_help_panel=_MODEL,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            help="Run the model repository's own code (config, model, tokenizer); only for ones you trust.",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    cpu_offload: Annotated[
        bool, typer.Option(help="Keep parameters and optimizer state in CPU memory.", rich_help_panel=_MODEL)
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Plan the run (steps, minibatches, balance) without training, then exit.")
    ] = False,
    dry_run_report: Annotated[
        Path | None,
        typer.Option(help="With --dry-run: also write the plan as JSON here.", show_default=False),
    ] = None,
    logging_level: Annotated[
        str,
        typer.Option(help="DEBUG, INFO, WARNING, ERROR or CRITICAL.", autocompletion=one_of(LOGGING_LEVELS)),
    ] = "INFO",
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue the run in --output-dir: bare --resume takes the latest complete checkpoint, "
            "--resume OUT/checkpoints/samples_N a given one.",
            show_default=False,
            rich_help_panel=_RESUME,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace a run already in --output-dir (only minitrain's files: params, metrics, "
            "checkpoints, exports).",
            rich_help_panel=_RESUME,
        ),
    ] = False,
    keep_last: Annotated[
        int | None,
        typer.Option(
            help="Keep only the K newest checkpoints, training state and hf_format/ export alike (older "
            "ones go once a newer one is complete).",
            show_default=False,
            rich_help_panel=_RESUME,
        ),
    ] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            help="Train a LoRA adapter of this rank instead of all weights.",
            show_default=False,
            rich_help_panel=_LORA,
        ),
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(
            help=r"LoRA scaling numerator. \[default: 2 x rank]", show_default=False, rich_help_panel=_LORA
        ),
    ] = None,
    lora_dropout: Annotated[
        float, typer.Option(help="Dropout on the LoRA input.", rich_help_panel=_LORA)
    ] = 0.0,
    lora_target_modules: Annotated[
        str,
        typer.Option(
            help="Comma-separated module names (q_proj,v_proj) or all-linear.", rich_help_panel=_LORA
        ),
    ] = "all-linear",
    merge_lora: Annotated[
        bool,
        typer.Option(
            help="Also write the base model with the adapters merged in (hf_format/samples_N/merged).",
            rich_help_panel=_LORA,
        ),
    ] = False,
    base_adapter: Annotated[
        list[Path] | None,
        typer.Option(
            help="A trained PEFT adapter to load frozen under the new one (repeatable; applied in order).",
            show_default=False,
            rich_help_panel=_LORA,
        ),
    ] = None,
    load_in_4bit: Annotated[
        bool,
        typer.Option(
            help="QLoRA: the frozen base in 4-bit NF4 (CUDA GPU and the qlora extra).", rich_help_panel=_LORA
        ),
    ] = False,
    eval_data_path: Annotated[
        Path | None,
        typer.Option(
            help="Tokenized JSONL to measure eval_loss on (every trained token, no gradients).",
            show_default=False,
            rich_help_panel=_EVAL,
        ),
    ] = None,
    eval_every_samples: Annotated[
        int | None,
        typer.Option(
            help="Measure eval_loss each time this many more samples are trained (and at the end).",
            show_default=False,
            rich_help_panel=_EVAL,
        ),
    ] = None,
    validation_split: Annotated[
        float | None,
        typer.Option(
            metavar="F",
            help="Hold out this fraction of --data-path (0 < F < 1, drawn from --seed) as the eval set; "
            "never trained. Measured at the end, and every --eval-every-samples.",
            show_default=False,
            rich_help_panel=_EVAL,
        ),
    ] = None,
    save_best_val_loss: Annotated[
        bool,
        typer.Option(
            help="Keep hf_format/best: the export with the lowest eval_loss so far (with "
            "best_val_loss.json: its step and samples).",
            rich_help_panel=_EVAL,
        ),
    ] = False,
    report_to: Annotated[
        list[str] | None,
        typer.Option(
            help="Also log metrics to: none, tensorboard, wandb, mlflow (repeatable; rank 0 only).",
            show_default=False,
            rich_help_panel=_EVAL,
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="sft: token cross-entropy; dpo: preference pairs (a file tokenized from chosen/rejected).",
            autocompletion=one_of(OBJECTIVES),
            rich_help_panel=_PREF,
        ),
    ] = "sft",
    preference_loss: Annotated[
        str,
        typer.Option(
            help="With --objective dpo: sigmoid (DPO), ipo, hinge, simpo or orpo (the last two: no "
            "reference).",
            autocompletion=one_of(PREFERENCE_LOSSES),
            rich_help_panel=_PREF,
        ),
    ] = "sigmoid",
    beta: Annotated[
        float,
        typer.Option(help="Preference strength beta (rewards are beta x log-ratio).", rich_help_panel=_PREF),
    ] = 0.1,
    simpo_gamma: Annotated[
        float,
        typer.Option(help="SimPO's target margin gamma (--preference-loss simpo).", rich_help_panel=_PREF),
    ] = 0.5,
    sft_weight: Annotated[
        float,
        typer.Option(
            help="Add this weight x the chosen side's per-token NLL to the preference loss (not orpo).",
            rich_help_panel=_PREF,
        ),
    ] = 0.0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML or JSON file of flag values (keys as the flags, e.g. max_tokens_per_gpu); flags given "
            "here override it. A run's training_params.json is one.",
            show_default=False,
            is_eager=True,
            callback=_read_config,
        ),
    ] = None,
) -> None:
    """Train a causal LM on tokenized data with FSDP2, no padding, on every visible GPU (or the CPU).

    Example: minitrain train --data-path tok.jsonl --model-name-or-path Qwen/Qwen2.5-1.5B-Instruct
    --output-dir runs/qwen --max-epochs 3 --learning-rate 6e-6
    """
    from minitrain.errors import UserError
    from minitrain.train.launch import default_nproc, run_training
    from minitrain.train.preflight import check_inputs, is_rank0

    console = Console(stderr=False)
    config = train_config(locals())
    if dry_run_report is not None and not dry_run:
        raise UserError("--dry-run-report needs --dry-run")
    inputs = None if dry_run else check_inputs(config)  # files and folders, before anything imports torch
    if nproc is None:
        config = dataclasses.replace(config, nproc=default_nproc())  # imports torch: after validation
    if dry_run:
        from minitrain.train.dryrun import dry_run as plan_run
        from minitrain.train.dryrun import render_dry_run

        report = plan_run(
            data_path=config.data_path,
            batch_size=config.batch_size,
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            truncate=config.truncate,
            world_size=config.world_size(),
            seed=config.seed,
            max_steps=config.max_steps,
            max_samples=config.max_samples,
            max_epochs=config.max_epochs,
            max_tokens=config.max_tokens,
            model_name_or_path=config.model_name_or_path,
            report_path=dry_run_report,
            lora_rank=config.lora_rank,
            lora_target_modules=config.lora_target_modules,
            load_in_4bit=config.load_in_4bit,
            objective=config.objective,
            validation_split=config.validation_split,
            compile=config.compile,
        )
        render_dry_run(report, console)
        return
    is_main = is_rank0()
    code = run_training(config, inputs)
    if code == 0:
        if is_main:
            console.print(
                f"[green]done[/]: checkpoints in {config.output_dir / 'hf_format'}, metrics in "
                f"{config.output_dir / 'training_metrics_0.jsonl'} (plot: minitrain plot {config.output_dir})"
            )
        return
    if code in (130, 143):
        print(f"minitrain: training interrupted (exit {code})", file=sys.stderr)
    else:
        print(
            f"minitrain: error: training failed (exit {code}); the failing rank's message is above",
            file=sys.stderr,
        )
    raise typer.Exit(code)


def train_config(flags: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` of the command's flags: each flag is the field of the same name, paths made absolute.

    Flags that are not fields (`--dry-run`, `--dry-run-report`) are left out; `--base-adapter` (repeatable)
    is the field `base_adapters`; `--nproc` left unset is 1 here and resolved after the cheap checks.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in flags.items() if name in fields}
    model = Path(flags["model_name_or_path"]).expanduser()
    eval_data = flags["eval_data_path"]
    values.update(
        data_path=flags["data_path"].expanduser().resolve(),
        model_name_or_path=str(model.resolve()) if model.exists() else flags["model_name_or_path"],
        output_dir=flags["output_dir"].expanduser().resolve(),
        nproc=flags["nproc"] if flags["nproc"] is not None else 1,
        resume=_resolve_resume(flags["resume"]),
        base_adapters=tuple(str(p.expanduser().resolve()) for p in flags["base_adapter"] or ()),
        eval_data_path=eval_data.expanduser().resolve() if eval_data else None,
        report_to=tuple(flags["report_to"] or ()),
    )
    return TrainConfig(**values)


def _resolve_resume(value: str | None) -> str | None:
    """`latest` (bare --resume) stays; a checkpoint path becomes absolute for the workers."""
    if value is None or value == RESUME_LATEST:
        return value
    return str(Path(value).expanduser().resolve())


def expand_bare_resume(argv: list[str]) -> list[str]:
    """`minitrain train ... --resume` with no value means the latest checkpoint: spell it out for the
    parser."""
    if "train" not in argv:
        return argv
    out = list(argv)
    for i in range(len(out) - 1, -1, -1):
        if out[i] == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, RESUME_LATEST)
    return out
