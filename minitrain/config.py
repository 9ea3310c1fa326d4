"""Stage configurations: one frozen, keyword-only dataclass per stage, validated once, saved with the run.

Each config checks every value in `__post_init__` and raises `UserError` with a message that names the flag
and the fix, so the CLI can refuse bad input before anything heavy starts (torch, a model, torchrun).
Derived values are methods, not fields. The trade-off: validation here is only what can be checked from
the values themselves; checks that need files (the data, the model's vocabulary) live with the stage that
opens those files (`minitrain.train.launch.preflight` for training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.errors import UserError

# ------------------------------------------------------------------------------------------- tokenize

RESUME_LATEST = "latest"  # --resume with no path: the latest complete checkpoint
TRAIN_ON = ("all", "last")  # tokenize --train-on values
# names the chat template render sets itself: --chat-template-kwargs may not give them
TEMPLATE_OWN_NAMES = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")


def own_template_name(kwargs: dict[str, Any]) -> str | None:
    """The first name of `kwargs` that the chat template render sets itself (TEMPLATE_OWN_NAMES), if any."""
    return next((name for name in kwargs if name in TEMPLATE_OWN_NAMES), None)


def json_object(flag: str, text: str, example: str) -> dict[str, Any]:
    """A flag's JSON-object value (`--lr-scheduler-kwargs '{"num_cycles": 0.5}'`), parsed; else a UserError
    naming the flag and showing `example`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{flag} is not valid JSON ({err.msg} at column {err.colno}); "
            f"write a JSON object such as '{example}'"
        ) from None
    if not isinstance(value, dict):
        raise UserError(
            f"{flag} must be a JSON object of names to values, such as '{example}', got {value!r}"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """Everything `minitrain tokenize` needs; saved in the sidecar (OUT.meta.json) of the file it writes.

    Files are checked by the stage (`minitrain.data.pipeline.tokenize_file`), not here.
    """

    input_file: Path | None = None  # JSONL, Parquet, Arrow or a save_to_disk folder; None with `dataset`
    output_file: Path
    model_name_or_path: str
    max_sample_num_tokens: int | None = None  # longer samples are dropped (listed in OUT.rejects.jsonl)
    chat_template: str | None = None  # None: the tokenizer's own; "chatml"; or a path to a Jinja file
    num_workers: int | None = None  # None: every core this process may use
    strict: bool = False  # stop at the first rejected line instead of listing it
    # input: a `datasets` name instead of a file, and where odd layouts keep their turns (data/sources.py)
    dataset: str | None = None  # NAME or NAME:split, loaded with datasets.load_dataset
    messages_field: str | None = None  # the key holding the list of turns
    role_field: str | None = None  # the key of a turn's role (default: role, else from)
    content_field: str | None = None  # the key of a turn's text (default: content, else value)
    user_role: tuple[str, ...] = ()  # data role names that mean user (beside human, user)
    assistant_role: tuple[str, ...] = ()  # ... assistant (beside gpt, assistant)
    system_role: tuple[str, ...] = ()  # ... system
    train_on: str = "all"  # "all" assistant turns, or the "last" one only
    split_turns: bool = False  # one sample per trained assistant turn, each rendered as at inference
    trust_remote_code: bool = False  # let the tokenizer repository's own code run (AutoTokenizer)
    # JSON object of extra names every render of the template sees, as apply_chat_template(**kwargs) and
    # inference servers' chat_template_kwargs pass them, e.g. {"enable_thinking": false} (Qwen3)
    chat_template_kwargs: str | None = None

    def __post_init__(self) -> None:
        _check_tokenize_input(self)
        self.template_kwargs()
        if self.train_on not in TRAIN_ON:
            raise UserError(f"--train-on {self.train_on}: expected one of {', '.join(TRAIN_ON)}")
        if self.split_turns and self.train_on == "last":
            raise UserError(
                "--split-turns trains every turn in its own sample and --train-on last only the final turn;"
                " pass one of them"
            )
        object.__setattr__(self, "output_file", Path(self.output_file))
        object.__setattr__(self, "model_name_or_path", str(self.model_name_or_path))
        if not self.model_name_or_path:
            raise UserError("--model-name-or-path is empty; give a tokenizer or model folder")
        for flag, value in (
            ("--max-sample-num-tokens", self.max_sample_num_tokens),
            ("--num-workers", self.num_workers),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{flag} must be a positive integer, got {value!r}")
        if self.input_file is not None and self.output_file.resolve() == self.input_file.resolve():
            raise UserError(f"the output {self.output_file} is the input file; choose another path with -o")
        if self.output_file.suffix != ".jsonl":
            raise UserError(
                f"the output {self.output_file} must end in .jsonl (the sidecar and rejects sit beside it)"
            )
        if self.chat_template is not None and not self.chat_template.strip():
            raise UserError("--chat-template is empty; give a built-in name (chatml) or a Jinja file")

    def template_kwargs(self) -> dict[str, Any]:
        """--chat-template-kwargs as a dict, checked: a JSON object whose names the render does not set
        itself (TEMPLATE_OWN_NAMES)."""
        if self.chat_template_kwargs is None:
            return {}
        kwargs = json_object(
            "--chat-template-kwargs", self.chat_template_kwargs, '{"enable_thinking": false}'
        )
        taken = own_template_name(kwargs)
        if taken:
            raise UserError(
                f"--chat-template-kwargs: {taken!r} is set by tokenize itself for every render "
                f"({', '.join(TEMPLATE_OWN_NAMES)}); drop it"
            )
        return kwargs

    def workers(self) -> int:
        """Processes that tokenize (this one and N-1 workers): `num_workers`, or every usable core."""
        return self.num_workers if self.num_workers is not None else usable_cores()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (paths as strings)."""
        return {
            f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
            for f in dataclasses.fields(self)
        }


def _check_tokenize_input(config: TokenizeConfig) -> None:
    """Exactly one input (a file or --dataset), and field mapping values a record could match."""
    if (config.input_file is None) == (config.dataset is None):
        raise UserError("give one input: a file (INPUT or --input-file) or --dataset NAME[:split], not both")
    if config.input_file is not None:
        object.__setattr__(config, "input_file", Path(config.input_file))
    if config.dataset is not None and not config.dataset.strip(":"):
        raise UserError("--dataset is empty; give NAME or NAME:split")
    for flag in ("messages_field", "role_field", "content_field"):
        value = getattr(config, flag)
        if value is not None and not value.strip():
            raise UserError(f"--{flag.replace('_', '-')} is empty; give the key name, or leave the flag out")
    seen: dict[str, str] = {}
    for role in ("user", "assistant", "system"):
        names = tuple(getattr(config, f"{role}_role"))
        object.__setattr__(config, f"{role}_role", names)
        for name in names:
            if not name.strip():
                raise UserError(f"--{role}-role is empty; give the role name your data uses for {role}")
            if seen.setdefault(name, role) != role:
                raise UserError(
                    f"role {name!r} given to both --{seen[name]}-role and --{role}-role; give it to one"
                )


# ---------------------------------------------------------------------------------------------- train

LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear", "constant")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
MASTER_DTYPES = ("fp32", "bf16")
SAVE_DTYPES = ("fp32", "bf16", "fp16")  # --save-dtype: the dtype of the hf_format/ exports
# --lr-scheduler-kwargs: the keyword arguments each schedule takes beyond the warm-up and the length
# (transformers' get_*_schedule_with_warmup; tests/train/test_config.py checks them against transformers)
LR_SCHEDULER_KWARGS = {"constant_with_warmup": (), "cosine": ("num_cycles",), "linear": (), "constant": ()}
LOGGING_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")  # --report-to (minitrain/train/trackers.py)
OBJECTIVES = ("sft", "dpo")  # --objective: token cross-entropy, or preference pairs (minitrain/train/dpo.py)
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")  # --preference-loss (train/preference.py)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `minitrain train` needs; written to OUT/training_params.json and read back by each worker.

    Paths are stored absolute (the parent resolves them) so workers started elsewhere read the same files.
    """

    data_path: Path
    model_name_or_path: str
    output_dir: Path
    # launch: processes per node and the multi-node rendezvous (torchrun's c10d backend)
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "minitrain"
    # batch: a global batch of `batch_size` samples, packed into minibatches of at most this many tokens
    # per rank
    batch_size: int = 128
    max_tokens_per_gpu: int = 16384
    truncate: bool = False  # samples (pairs) longer than max_tokens_per_gpu: cut to fit (else: skipped)
    # optimisation
    learning_rate: float = 5e-6
    num_warmup_steps: int = 10
    lr_scheduler: str = "constant_with_warmup"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta1: float = 0.9  # AdamW's betas and epsilon (mini_trainer's names)
    beta2: float = 0.95
    eps: float = 1e-8
    lr_scheduler_kwargs: str | None = (
        None  # JSON object of extra schedule arguments, e.g. {"num_cycles": 0.5}
    )
    # when to stop (none: train until interrupted) and when to save
    max_steps: int | None = None
    max_samples: int | None = None
    max_epochs: float | None = None
    max_tokens: int | None = None  # total tokens of the trained samples (the metrics' num_total_tokens)
    min_samples_per_checkpoint: int | None = None
    seed: int = 42
    # model and memory
    use_liger_kernels: bool = False
    fsdp_sharding_strategy: str = "FULL_SHARD"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block (minitrain/train/compile.py)
    from_scratch: bool = False
    master_dtype: str = "fp32"
    save_dtype: str | None = None  # None: the compute dtype (bf16 on GPU, the master dtype on CPU)
    trust_remote_code: bool = (
        False  # run the model repository's own code (AutoConfig/AutoModel/AutoTokenizer)
    )
    cpu_offload: bool = False
    logging_level: str = "INFO"
    # reliability: resume ("latest" or a checkpoint folder) and how many training states to keep
    resume: str | None = None
    keep_last: int | None = None
    overwrite: bool = False  # start afresh in an output dir that already holds a run
    # adapters (PEFT LoRA; QLoRA with load_in_4bit): a new adapter on top of frozen base adapters
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False
    base_adapters: tuple[str, ...] = ()
    load_in_4bit: bool = False
    # evaluation: mean token loss over a held-out tokenized file
    eval_data_path: Path | None = None
    eval_every_samples: int | None = None
    # mini_trainer's eval and export flags: hold out a fraction of --data-path as the eval set, keep the
    # export with the lowest eval_loss (hf_format/best), an export at each epoch's end
    validation_split: float | None = None  # 0 < F < 1 (minitrain/data/sampler.py: split_validation)
    save_best_val_loss: bool = False
    checkpoint_at_epoch: bool = False
    save_final_checkpoint: bool = False  # accepted: minitrain always exports the final weights
    # experiment trackers fed by rank 0 beside the metrics JSONL (minitrain/train/trackers.py)
    report_to: tuple[str, ...] = ()
    # objective: SFT, or preference pairs with one of the losses of minitrain/train/preference.py
    objective: str = "sft"
    preference_loss: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_path", Path(self.data_path))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        object.__setattr__(self, "model_name_or_path", str(self.model_name_or_path))
        object.__setattr__(self, "lr_scheduler", str(self.lr_scheduler).lower())
        object.__setattr__(self, "fsdp_sharding_strategy", str(self.fsdp_sharding_strategy).upper())
        object.__setattr__(self, "master_dtype", str(self.master_dtype).lower())
        object.__setattr__(self, "logging_level", str(self.logging_level).upper())
        _positive("--nproc", self.nproc)
        _positive("--nnodes", self.nnodes)
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(
                f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, "
                f"got {self.node_rank}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(
                "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node), e.g. node0:29500"
            )
        if self.rdzv_endpoint and not _is_endpoint(self.rdzv_endpoint):
            raise UserError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        _positive("--batch-size", self.batch_size)
        _positive("--max-tokens-per-gpu", self.max_tokens_per_gpu)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if self.num_warmup_steps < 0:
            raise UserError(f"--num-warmup-steps must be >= 0, got {self.num_warmup_steps}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(
                f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler!r}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not (self.max_grad_norm > 0):
            raise UserError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        _check_optimizer(self)
        stops = [
            f
            for f in ("max_steps", "max_samples", "max_epochs", "max_tokens")
            if getattr(self, f) is not None
        ]
        if len(stops) > 1:
            flags = " and ".join("--" + f.replace("_", "-") for f in stops)
            raise UserError(f"give at most one stop criterion, not {flags}")
        if self.max_steps is not None:
            _positive("--max-steps", self.max_steps)
        if self.max_samples is not None:
            _positive("--max-samples", self.max_samples)
        if self.max_epochs is not None and not (math.isfinite(self.max_epochs) and self.max_epochs > 0):
            raise UserError(f"--max-epochs must be a positive number, got {self.max_epochs}")
        if self.max_tokens is not None:
            _positive("--max-tokens", self.max_tokens)
        if self.lr_scheduler in ("cosine", "linear") and not set(stops) - {"max_tokens"}:
            raise UserError(
                f"--lr-scheduler {self.lr_scheduler} decays to 0 at the end of training, so it needs "
                "--max-steps, --max-samples or --max-epochs (or use constant_with_warmup)"
                + ("; --max-tokens gives no step count in advance" if stops else "")
            )
        self.scheduler_kwargs()  # validates --lr-scheduler-kwargs against the schedule
        if self.min_samples_per_checkpoint is not None:
            _positive("--min-samples-per-checkpoint", self.min_samples_per_checkpoint)
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.fsdp_sharding_strategy not in SHARDING_STRATEGIES:
            raise UserError(
                f"--fsdp-sharding-strategy must be one of {', '.join(SHARDING_STRATEGIES)}; "
                f"got {self.fsdp_sharding_strategy!r}"
            )
        if self.master_dtype not in MASTER_DTYPES:
            raise UserError(f"--master-dtype must be fp32 or bf16, got {self.master_dtype!r}")
        if self.save_dtype is not None:
            object.__setattr__(self, "save_dtype", str(self.save_dtype).lower())
            if self.save_dtype not in SAVE_DTYPES:
                raise UserError(
                    f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}; got {self.save_dtype!r}"
                )
        if self.logging_level not in LOGGING_LEVELS:
            raise UserError(
                f"--logging-level must be one of {', '.join(LOGGING_LEVELS)}; got {self.logging_level!r}"
            )
        if self.keep_last is not None:
            _positive("--keep-last", self.keep_last)
        if self.resume is not None and self.overwrite:
            raise UserError(
                "--resume continues the run in --output-dir and --overwrite replaces it; give one"
            )
        object.__setattr__(self, "base_adapters", tuple(str(p) for p in self.base_adapters))
        if self.lora_rank is None:
            needs_lora = [
                flag
                for flag, given in (
                    ("--merge-lora", self.merge_lora),
                    ("--base-adapter", bool(self.base_adapters)),
                    ("--load-in-4bit", self.load_in_4bit),
                    ("--lora-alpha", self.lora_alpha is not None),
                    ("--lora-dropout", self.lora_dropout != 0.0),
                )
                if given
            ]
            if needs_lora:
                raise UserError(f"{needs_lora[0]} trains an adapter: add --lora-rank R (e.g. 16)")
        else:
            self.lora_settings()  # validates rank, dropout, target modules and base adapter folders
        if self.load_in_4bit:
            clash = [
                (flag, why)
                for flag, given, why in (
                    (
                        "--merge-lora",
                        self.merge_lora,
                        "merging into a 4-bit base would round the merged weights to 4 bits; merge the saved "
                        "adapter into the full-precision base afterwards (docs/training.md: QLoRA)",
                    ),
                    ("--from-scratch", self.from_scratch, "QLoRA quantizes pretrained weights; drop one"),
                    (
                        "--cpu-offload",
                        self.cpu_offload,
                        "the 4-bit base stays on the GPU; drop --cpu-offload",
                    ),
                )  # fmt: skip
                if given
            ]
            if clash:
                raise UserError(f"--load-in-4bit with {clash[0][0]}: {clash[0][1]}")
        if self.eval_data_path is not None:
            object.__setattr__(self, "eval_data_path", Path(self.eval_data_path))
        _check_eval(self)
        if not self.model_name_or_path:
            raise UserError("--model-name-or-path is empty; give a local model folder or a Hub id")
        _check_report_to(self)
        _check_objective(self)

    def lora_settings(self):
        """The adapter to train (`LoraSettings`), or None for full fine-tuning."""
        if self.lora_rank is None:
            return None
        return LoraSettings(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=parse_target_modules(self.lora_target_modules),
            base_adapters=tuple(Path(p) for p in self.base_adapters),
        )

    def scheduler_kwargs(self) -> dict[str, Any]:
        """--lr-scheduler-kwargs as a dict, checked: a JSON object of the schedule's own arguments."""
        if self.lr_scheduler_kwargs is None:
            return {}
        kwargs = json_object("--lr-scheduler-kwargs", self.lr_scheduler_kwargs, '{"num_cycles": 0.5}')
        allowed = LR_SCHEDULER_KWARGS[self.lr_scheduler]
        for key in kwargs:
            if key not in allowed:
                takes = ", ".join(allowed) if allowed else "no extra arguments"
                raise UserError(
                    f"--lr-scheduler-kwargs: {self.lr_scheduler} has no argument {key!r}; it takes {takes}"
                )
        return kwargs

    def world_size(self) -> int:
        """Total number of training processes (ranks) over all nodes."""
        return self.nproc * self.nnodes

    def total_steps(self, num_samples: int) -> int | None:
        """Optimizer steps until the stop criterion (None: train until interrupted); the LR schedule's
        length."""
        if self.max_steps is not None:
            return self.max_steps
        if self.max_samples is not None:
            return math.ceil(self.max_samples / self.batch_size)
        if self.max_epochs is not None:
            return math.ceil(self.max_epochs * num_samples / self.batch_size)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (paths as strings)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint folder `--resume` names; None for the latest one (or without --resume)."""
        return None if self.resume in (None, RESUME_LATEST) else Path(self.resume)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; extra keys (versions, world size) are ignored, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _check_optimizer(config: TrainConfig) -> None:
    """--beta1, --beta2 in [0, 1) and --eps > 0, as torch.optim.AdamW requires."""
    for flag, value in (("--beta1", config.beta1), ("--beta2", config.beta2)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if not (math.isfinite(config.eps) and config.eps > 0):
        raise UserError(f"--eps must be a positive number, got {config.eps}")


def _check_objective(config: TrainConfig) -> None:
    """--objective and the preference flags: known names, finite values, no preference flag with sft."""
    object.__setattr__(config, "objective", str(config.objective).lower())
    object.__setattr__(config, "preference_loss", str(config.preference_loss).lower())
    if config.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {config.objective!r}")
    if config.preference_loss not in PREFERENCE_LOSSES:
        raise UserError(
            f"--preference-loss must be one of {', '.join(PREFERENCE_LOSSES)}; got {config.preference_loss!r}"
        )
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise UserError(f"--beta must be a positive number, got {config.beta}")
    if not math.isfinite(config.simpo_gamma):
        raise UserError(f"--simpo-gamma must be a finite number, got {config.simpo_gamma}")
    if not (math.isfinite(config.sft_weight) and config.sft_weight >= 0):
        raise UserError(f"--sft-weight must be >= 0, got {config.sft_weight}")
    if config.objective == "sft":
        given = [
            flag
            for flag, changed in (
                ("--preference-loss", config.preference_loss != "sigmoid"),
                ("--beta", config.beta != 0.1),
                ("--simpo-gamma", config.simpo_gamma != 0.5),
                ("--sft-weight", config.sft_weight != 0.0),
            )
            if changed
        ]
        if given:
            raise UserError(f"{given[0]} sets a preference loss: add --objective dpo")
        return
    if config.simpo_gamma != 0.5 and config.preference_loss != "simpo":
        raise UserError("--simpo-gamma is SimPO's margin: add --preference-loss simpo, or drop it")
    if config.sft_weight and config.preference_loss == "orpo":
        raise UserError("--preference-loss orpo has its own SFT term; drop --sft-weight")


def _check_eval(config: TrainConfig) -> None:
    """The eval set (--eval-data-path or --validation-split, not both) and what needs one."""
    split = config.validation_split
    if split is not None:
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
            raise UserError(
                f"--validation-split must be a fraction between 0 and 1 (exclusive), got {split!r}; "
                "e.g. 0.05 holds out 5% of --data-path"
            )
        object.__setattr__(config, "validation_split", float(split))
        if config.eval_data_path is not None:
            raise UserError(
                "--validation-split holds out part of --data-path as the eval set and --eval-data-path "
                "gives one; pass one of them"
            )
        if str(config.objective).lower() == "dpo":
            raise UserError(
                "--validation-split does not split preference pairs yet; tokenize the held-out pairs into "
                "their own file and pass --eval-data-path"
            )
    has_eval = config.eval_data_path is not None or split is not None
    if config.eval_every_samples is not None:
        if not has_eval:
            raise UserError("--eval-every-samples needs --eval-data-path TOK.jsonl or --validation-split F")
        _positive("--eval-every-samples", config.eval_every_samples)
    if config.save_best_val_loss and not has_eval:
        raise UserError(
            "--save-best-val-loss keeps the export with the lowest eval loss: it needs an eval set, "
            "--eval-data-path TOK.jsonl or --validation-split F"
        )


def _check_report_to(config: TrainConfig) -> None:
    """--report-to: known tracker names, `none` alone."""
    names = tuple(str(n).lower() for n in config.report_to)
    object.__setattr__(config, "report_to", names)
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--report-to must be one of {', '.join(TRACKERS)}; got {name!r}")
    if "none" in names and len(set(names)) > 1:
        raise UserError("--report-to none with another tracker; give none alone, or only trackers")


# --------------------------------------------------------------------------------------------- inspect


@dataclass(frozen=True, kw_only=True)
class InspectConfig:
    """What `minitrain inspect` was asked to do, validated once."""

    path: Path
    model_name_or_path: str | None = None
    n: int | None = None
    indices: tuple[int, ...] = ()
    random_k: int | None = None
    seed: int = 42  # train's default, so --stats packs in the order training would
    grep: str | None = None
    tokens: bool = False
    stats: bool = False
    audit: bool = False
    source: Path | None = None
    max_tokens_per_gpu: int | None = None
    batch_size: int | None = None
    nproc: int | None = None

    def __post_init__(self) -> None:
        chosen = [
            f
            for f, v in (("-n", self.n), ("--index", self.indices or None), ("--random", self.random_k))
            if v is not None
        ]
        if len(chosen) > 1:
            raise UserError(f"{' and '.join(chosen)} choose samples in different ways; pass only one of them")
        if self.n is not None and self.n < 1:
            raise UserError(f"-n {self.n}: pass a number of samples >= 1")
        if self.random_k is not None and self.random_k < 1:
            raise UserError(f"--random {self.random_k}: pass a number of samples >= 1")
        if any(i < 0 for i in self.indices):
            raise UserError(f"--index {min(self.indices)}: sample indices start at 0")
        if self.source is not None and not self.audit:
            raise UserError("--source is only used by --audit; add --audit")
        if self.source is not None and not Path(self.source).is_file():
            raise UserError(f"--source {self.source}: no such file")
        packing = {
            "--max-tokens-per-gpu": self.max_tokens_per_gpu,
            "--batch-size": self.batch_size,
            "--nproc": self.nproc,
        }
        given = [k for k, v in packing.items() if v is not None]
        if given and not self.stats:
            raise UserError(f"{', '.join(given)} describe packing for --stats; add --stats")
        if given and (self.max_tokens_per_gpu is None or self.batch_size is None):
            raise UserError(
                "packing statistics need both --max-tokens-per-gpu and --batch-size (--nproc defaults to 1)"
            )
        for k, v in packing.items():
            if v is not None and v < 1:
                raise UserError(f"{k} {v}: must be >= 1")

    @property
    def shows_samples(self) -> bool:
        """The sample view runs unless only --stats/--audit were asked for."""
        explicit = (
            self.n is not None
            or self.indices
            or self.random_k is not None
            or self.grep is not None
            or self.tokens
        )
        return bool(explicit) or not (self.stats or self.audit)


# -------------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """What to train: a new LoRA adapter, optionally on top of frozen earlier ones."""

    rank: int
    alpha: float | None = None  # None: 2 x rank
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    base_adapters: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise UserError(f"--lora-rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise UserError("--lora-target-modules is empty: name modules (q_proj,v_proj) or all-linear")
        for path in self.base_adapters:
            if not (Path(path) / "adapter_config.json").is_file():
                raise UserError(
                    f"--base-adapter {path}: no adapter_config.json there (not a PEFT adapter directory)"
                )

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


def parse_target_modules(text: str) -> str | tuple[str, ...]:
    """`all-linear` or a comma-separated list of module names."""
    text = text.strip()
    if text == "all-linear":
        return text
    return tuple(name.strip() for name in text.split(",") if name.strip())


# ------------------------------------------------------------------------------------------------ plot

PLOT_X_AXES = ("step", "samples", "tokens", "time")  # --x choices; the column behind each: plot.curves
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass(frozen=True, kw_only=True)
class PlotConfig:
    """What `minitrain plot` draws: runs, metrics (empty = the defaults), x-axis, smoothing, outputs."""

    runs: tuple[Path, ...]
    metrics: tuple[str, ...] = ()
    x: str = "step"
    smooth: float = 0.0
    output: Path | None = None
    terminal: bool = False

    def __post_init__(self) -> None:
        if not self.runs:
            raise UserError("no run given: pass a training output directory or a metrics .jsonl file")
        if self.x not in PLOT_X_AXES:
            raise UserError(f"--x {self.x!r} is not an x-axis; choose one of: {', '.join(PLOT_X_AXES)}")
        if not 0.0 <= self.smooth <= 0.99:
            raise UserError(f"--smooth {self.smooth} is out of range; use a value from 0.0 (off) to 0.99")
        if self.output is not None and self.output.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(
                f"-o {self.output}: unknown image type {self.output.suffix!r}; "
                f"end it in {', '.join(IMAGE_SUFFIXES)}"
            )
        if self.output is not None and not self.output.parent.is_dir():  # before any run is read or drawn
            raise UserError(
                f"-o {self.output}: directory {self.output.parent} does not exist; create it first"
            )

    @property
    def draws_terminal(self) -> bool:
        """True when the terminal plot is wanted: no image asked for, or --terminal."""
        return self.terminal or self.output is None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _positive(flag: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def _is_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
