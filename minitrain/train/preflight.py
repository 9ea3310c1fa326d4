"""Everything `minitrain train` checks in the parent before anything is spawned, in two stages.

`check_inputs` needs no torch or transformers: the data file and its over-long samples, the model folder
and its weights, the output folder, the previous run and `--resume`, `--report-to`'s packages; so those
mistakes answer in well under a second. `preflight` then reads the model's config (token ids against the
vocabulary, the tokenizer fingerprint, QLoRA's GPU, the GPU count) and, with every check passed, clears
the previous run for `--overwrite`. `fit_to_gpus` turns on activation checkpointing or lowers the token
budget when the memory model predicts an OOM on the GPUs (`minitrain.train.memory`).

Trade-off: the parent pays for opening the data once (it also builds the store's cache, so the ranks do
not race to build it) and for reading the model's config, so a wrong flag or file fails in seconds with
one line instead of after N processes have imported torch and loaded a model. `causal_lm_config` is also
what every rank's `load_model` calls, so both refuse the same models with the same words.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.config import TrainConfig, usable_cores
from minitrain.data.sampler import split_validation
from minitrain.data.tokenizer import load_tokenizer, resolve_model_path
from minitrain.errors import UserError, first_line, say
from minitrain.rundir import remove_previous_run, resolve_resume, run_files
from minitrain.train.trackers import check_trackers


@dataclass(frozen=True)
class Inputs:
    """What the torch-free checks learned (`check_inputs`): the opened data and what it holds."""

    store: Any  # the training data's TokenStore
    num_too_long: int  # samples longer than --max-tokens-per-gpu: skipped, or cut with --truncate
    tokens_truncated: int  # tokens cut off those samples with --truncate (0 without)
    eval_store: Any | None  # the --eval-data-path TokenStore
    tokenizer_source: str | None  # where checkpoints copy tokenizer files from
    num_truncated: int = 0  # with --truncate: samples (pairs) cut to fit the budget
    num_held_out: int = 0  # samples --validation-split holds out of the training file as the eval set


@dataclass(frozen=True)
class Preflight:
    """What the parent learned before spawning: printed, and recorded in training_params.json."""

    num_samples: int
    num_too_long: int  # samples longer than --max-tokens-per-gpu: skipped, or cut with --truncate
    max_token_id: int
    vocab_size: int
    tokenizer_source: str | None  # where checkpoints copy tokenizer files from
    num_truncated: int = 0  # with --truncate: samples cut to --max-tokens-per-gpu tokens
    tokens_truncated: int = 0  # with --truncate: tokens cut off them
    num_held_out: int = 0  # --validation-split: samples held out as the eval set, never trained

    def params(self) -> dict[str, Any]:
        """The data summary recorded in training_params.json."""
        return {
            "num_samples": self.num_samples,
            "num_samples_too_long": self.num_too_long,
            "num_samples_truncated": self.num_truncated,
            "num_tokens_truncated": self.tokens_truncated,
            "num_samples_held_out": self.num_held_out,
            "tokenizer_source": self.tokenizer_source,
        }


def check_inputs(config: TrainConfig) -> Inputs:
    """The checks that need no torch or transformers: files, folders, the previous run; warnings once.

    Every user error they find answers in well under a second (the CLI calls this before anything that
    imports torch); `preflight` then does the checks that need the model's config. Nothing is deleted here:
    `--overwrite` clears the previous run only after every check passed.
    """
    check_trackers(config.report_to)  # --report-to's packages: a missing one is named at once
    model_dir = check_model_path(config.model_name_or_path)
    store, too_long, truncation = _open_data(config.data_path, label=str(config.data_path), config=config)
    cut = truncation.tokens_cut if truncation else 0
    eval_store = None
    if config.eval_data_path is not None:
        label = f"--eval-data-path {config.eval_data_path}"
        eval_store, _, _ = _open_data(config.eval_data_path, label=label, config=config, truncate=False)
    if not config.from_scratch and model_dir is not None:
        _check_weights(config.model_name_or_path, model_dir)
    check_output_dir(config.output_dir)
    _check_previous_run(config)
    num_units, unit = (store.num_pairs, "pairs") if config.objective == "dpo" else (len(store), "samples")
    held_out = 0
    if config.validation_split is not None:  # refused here for too few samples, before anything is spawned
        held_out = len(split_validation(num_units, config.validation_split, config.seed)[1])
    if is_rank0():
        if too_long and config.truncate and config.objective == "dpo":
            skipped = truncation.skipped
            say(
                f"minitrain: {too_long} of {num_units} pairs are longer than --max-tokens-per-gpu "
                f"{config.max_tokens_per_gpu}: --truncate keeps each side's first tokens, the prompt whole "
                f"and the longer response cut first ({truncation.cut} pairs cut, {cut:,} tokens)"
                + (
                    f"; {skipped} pairs whose prompt leaves no room for both responses will be skipped"
                    if skipped
                    else ""
                )
            )
        elif too_long and config.truncate:
            say(
                f"minitrain: {too_long} of {len(store)} samples are longer than --max-tokens-per-gpu "
                f"{config.max_tokens_per_gpu}: --truncate keeps their first {config.max_tokens_per_gpu} "
                f"tokens ({cut:,} tokens cut)"
            )
        elif too_long:
            say(
                f"minitrain: warning: {too_long} of {num_units} {unit} are longer than --max-tokens-per-gpu "
                f"{config.max_tokens_per_gpu} and will be skipped (raise it to train them, or add --truncate)"
            )
        if held_out:
            say(
                f"minitrain: --validation-split {config.validation_split:g} holds out {held_out} of "
                f"{num_units} {unit} as the eval set; training on the other {num_units - held_out}"
            )
        total = config.total_steps(num_units - held_out)
        if total is not None and config.lr_scheduler != "constant" and total < config.num_warmup_steps:
            say(
                f"minitrain: warning: the run stops after {total} steps, before the "
                f"{config.num_warmup_steps} warm-up steps end: the learning rate never reaches "
                f"--learning-rate {config.learning_rate:g} (lower --num-warmup-steps)"
            )
    source = tokenizer_source(config.model_name_or_path, store.meta)
    return Inputs(
        store, too_long, cut, eval_store, source, truncation.cut if truncation else 0, num_held_out=held_out
    )


def preflight(config: TrainConfig, inputs: Inputs | None = None) -> Preflight:
    """Check data, model and output folder; raise `UserError` naming the problem and the fix.

    `inputs` is what `check_inputs` returned (it runs here when not given); the rest needs torch and the
    model's config: token ids against the vocabulary, the tokenizer fingerprint, QLoRA's GPU, --compile's
    compiler, the GPU count.
    Last, with every check passed, `--overwrite` removes the previous run's files.
    """
    inputs = inputs if inputs is not None else check_inputs(config)
    import torch  # before transformers: one import cost, paid here

    vocab_size = model_vocab_size(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    store = inputs.store
    _check_vocab(store, label=str(config.data_path), config=config, vocab_size=vocab_size)
    remote = config.trust_remote_code
    check_tokenizer_matches(store.meta, config.model_name_or_path, config.data_path, trust_remote_code=remote)
    if inputs.eval_store is not None:
        label = f"--eval-data-path {config.eval_data_path}"
        _check_vocab(inputs.eval_store, label=label, config=config, vocab_size=vocab_size)
        check_tokenizer_matches(
            inputs.eval_store.meta, config.model_name_or_path, config.eval_data_path, trust_remote_code=remote
        )
    gpu = torch.cuda.is_available()
    if config.load_in_4bit:
        from minitrain.train.adapters import require_qlora

        require_qlora("cuda" if gpu else "cpu")
    if config.compile:
        from minitrain.train.compile import require_compiler

        require_compiler("cuda" if gpu else "cpu")
    if not in_launched_env():
        gpus = torch.cuda.device_count() if gpu else 0
        if gpus and config.nproc > gpus:
            raise UserError(
                f"--nproc {config.nproc} but only {gpus} GPUs are visible; use --nproc {gpus} or fewer"
            )
        if not gpus and config.nproc > (cores := usable_cores()):
            say(
                f"minitrain: warning: --nproc {config.nproc} CPU processes on {cores} usable cores: they "
                f"take turns and every step gets slower; use --nproc {cores} or fewer"
            )
    if config.overwrite and is_rank0():
        remove_previous_run(config.output_dir)
    truncated = inputs.num_truncated if config.truncate else 0
    return Preflight(
        len(store), inputs.num_too_long, int(store.max_token_id), vocab_size, inputs.tokenizer_source,
        num_truncated=truncated, tokens_truncated=inputs.tokens_truncated, num_held_out=inputs.num_held_out,
    )  # fmt: skip


# config attributes of heads that are not a plain hidden @ W.T (minitrain's fused/chunked loss would differ)
UNSUPPORTED_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def causal_lm_config(model_name_or_path: str | Path, *, trust_remote_code: bool = False):
    """The model's transformers config (no weights read), refusing what minitrain cannot train.

    `trust_remote_code` (--trust-remote-code) lets transformers run the model repository's own config and
    model code; such a model is accepted when its `auto_map` names an `AutoModelForCausalLM` class.

    The path is resolved by `data.tokenizer.resolve_model_path` (folder, cached Hub id, or one Hub request).
    Refused: a path that does not exist, a folder or Hub id with no readable config, a model that is not a
    causal LM (T5, BERT & co), and a head that scales or caps its logits. Used by the parent's preflight and
    by every rank's `load_model`, so both refuse the same models with the same words.
    """
    name = str(model_name_or_path)
    folder = check_model_path(name)  # before importing transformers: a typo answers at once
    source = str(folder) if folder is not None else name
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise UserError(
                f"--model-name-or-path {name} ships its own model code; add --trust-remote-code to run it "
                "(only for a repository you trust)"
            ) from None
        raise UserError(
            f"--model-name-or-path {name}: cannot read its config ({first_line(err)}); pass a model folder "
            "(config.json and weights) or a Hub id"
        ) from None
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if (
        type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder
    ) and not remote:  # BERT & co: bidirectional, not causal
        raise UserError(
            f"--model-name-or-path {name} is a {config.model_type!r} model, not a causal LM; "
            "pass a decoder-only model (Llama, Qwen, Mistral, ...)"
        )
    for attr in UNSUPPORTED_HEAD_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise UserError(
                f"--model-name-or-path {name} scales its logits ({attr}={value}), which minitrain's loss "
                "does not; pass a model whose head is a plain linear layer"
            )
    return config


def check_model_path(name: str) -> Path | None:
    """The local folder `name` resolves to (None for a Hub id not in the cache); refused early, without torch.

    The resolution is `data.tokenizer.resolve_model_path`'s (folder, cached Hub id, or one Hub request).
    """
    source = Path(resolve_model_path(name))
    if (
        source.is_dir() and not (source / "config.json").is_file()
    ):  # what AutoConfig would refuse, found cheaply
        raise UserError(
            f"--model-name-or-path {name}: the folder has no config.json; pass a model folder "
            "(config.json and weights) or a Hub id"
        )
    return source if source.is_dir() else None


def model_vocab_size(model_name_or_path: str, *, trust_remote_code: bool = False) -> int:
    """The model's vocabulary size from its config (no weights loaded); refuses what minitrain cannot
    train."""
    config = causal_lm_config(model_name_or_path, trust_remote_code=trust_remote_code)
    return int(config.get_text_config().vocab_size)


def tokenizer_source(model_name_or_path: str, meta: dict | None) -> str | None:
    """Where checkpoints copy tokenizer files from: the model folder if it has them, else the one the data
    used."""
    try:
        source = resolve_model_path(model_name_or_path)
    except UserError:
        source = None  # preflight has refused such a path already; the data's tokenizer is the fallback
    if source is not None and not Path(source).is_dir():
        return source  # a Hub id not cached yet: AutoTokenizer downloads it with the model
    if source is not None and any(
        (Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return str(Path(source).resolve())
    recorded = ((meta or {}).get("tokenizer") or {}).get("path")
    return str(recorded) if recorded and Path(recorded).is_dir() else None


def check_tokenizer_matches(
    meta: dict | None, model_name_or_path: str, data_path: Path, *, trust_remote_code: bool = False
) -> None:
    """Refuse data tokenized with another tokenizer than the model's (when both fingerprints are known)."""
    recorded = ((meta or {}).get("tokenizer") or {}).get("fingerprint")
    if not recorded:
        return
    model_dir = Path(model_name_or_path)
    if model_dir.is_dir() and not any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")
    ):
        return  # a bare config (e.g. --from-scratch): the data's tokenizer is the only one there is
    from minitrain.data.probe import tokenizer_fingerprint

    try:
        tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
    except UserError:
        return  # no tokenizer beside the model: nothing to compare with
    actual = tokenizer_fingerprint(tokenizer)
    if actual != recorded:
        raise UserError(
            f"{data_path} was tokenized with {meta['tokenizer'].get('path')} (fingerprint {recorded[:12]}), "
            f"not with {model_name_or_path}'s tokenizer ({actual[:12]}); re-run `minitrain tokenize` with "
            "this model"
        )


def fit_to_gpus(config: TrainConfig, device_bytes: int | None = None) -> TrainConfig:
    """On GPUs (or `device_bytes` given), the config whose predicted peak fits the GPU's memory: activation
    checkpointing turned on or the token budget lowered, said in one line; a plan that cannot fit is refused
    (`minitrain.train.memory.fit`). Unchanged on the CPU."""
    if device_bytes is None:
        import torch

        if not torch.cuda.is_available():
            return config
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    from minitrain.train.memory import fit_config_to_gpu

    config, line = fit_config_to_gpu(config, device_bytes)
    if line and is_rank0():
        say(line)
    return config


def check_output_dir(path: Path, flag: str = "--output-dir") -> None:
    """Create `path` if needed and check it is writable (a one-line error naming `flag` otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{flag} {path}: cannot create it ({err.strerror}); choose a writable folder"
        ) from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable; choose a writable folder")


WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip


def _check_weights(model_name_or_path: str, folder: Path) -> None:
    """A local model folder must hold weights unless --from-scratch (found here, not after spawning ranks)."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(
            f"--model-name-or-path {model_name_or_path}: no weights there (model.safetensors or "
            "pytorch_model.bin); add --from-scratch to start from its config, or pass the folder with "
            "the weights"
        )


def _check_previous_run(config: TrainConfig) -> None:
    """An output dir holding a run is continued (--resume), replaced (--overwrite, later), or refused."""
    out = Path(config.output_dir)
    if config.resume is not None:
        resolve_resume(out, config.resume_checkpoint())  # a clear error now
        return
    found = sorted({p.relative_to(out).parts[0] for p in run_files(out)})
    if found and not config.overwrite:
        raise UserError(
            f"--output-dir {out} already holds a run ({', '.join(found)}); add --resume to continue it, "
            "--overwrite to replace it, or choose another folder"
        )


def _open_data(path: Path, *, label: str, config: TrainConfig, truncate: bool = True):
    """Open a tokenized file (building its cache) and check it against the token budget (no torch).

    Returns (the store, how many samples (pairs) are longer than --max-tokens-per-gpu, what --truncate cuts:
    a `Truncation`, None without --truncate or with `truncate` False: the eval set is never cut).
    """
    from minitrain.data.store import TokenStore
    from minitrain.data.store import truncate as truncate_store

    store = TokenStore.open(path, config.objective)
    if len(store) == 0:
        raise UserError(f"{label}: no samples; check the tokenize step's rejects file")
    # --objective dpo packs pairs: a pair is trained only when both sides fit the budget together
    lengths, unit = (store.pair_lengths, "pair") if config.objective == "dpo" else (store.lengths, "sample")
    budget = config.max_tokens_per_gpu
    too_long = int((lengths > budget).sum())
    truncation = truncate_store(store, budget, config.objective)[1] if config.truncate and truncate else None
    if truncation is not None and truncation.skipped == len(lengths):
        raise UserError(
            f"{label}: no pair fits --max-tokens-per-gpu {budget} even cut by --truncate (the prompts leave "
            "no room for a response token on both sides); raise --max-tokens-per-gpu"
        )
    if too_long == len(lengths) and not config.truncate:
        raise UserError(
            f"{label}: every {unit} is longer than --max-tokens-per-gpu {budget} "
            f"(shortest: {int(lengths.min())} tokens); raise --max-tokens-per-gpu or add --truncate"
        )
    return store, too_long, truncation


def _check_vocab(store, *, label: str, config: TrainConfig, vocab_size: int) -> None:
    """Every token id of the data must fit the model's vocabulary."""
    if store.max_token_id >= vocab_size:
        raise UserError(
            f"{label}: token id {store.max_token_id} does not fit the vocabulary of "
            f"{config.model_name_or_path} ({vocab_size} ids); tokenize with this model's tokenizer"
        )


def in_launched_env(env: Mapping[str, str] | None = None) -> bool:
    """True when this process is already one rank of a torchrun or multi-task srun launch."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return True
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def is_rank0() -> bool:
    """True in the parent, and on rank 0 when this process is one rank of an outer launch."""
    if not in_launched_env():
        return True  # the parent: `check_inputs` calls this, and it must not import torch (dist does)
    from minitrain.train.dist import ranks_from_env

    return ranks_from_env(os.environ)[0] == 0
