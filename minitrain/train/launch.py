"""The one seam between `minitrain train` and torchrun: check, write the run's parameters, spawn, wait.

`run_training(config)` is what the CLI calls. In the parent it checks everything that can be checked
without a model in memory (`preflight`: the data file, token ids against the model's vocabulary, the
tokenizer fingerprint, over-long samples, the output folder, GPUs), writes OUT/training_params.json, then
runs `python -m torch.distributed.run ... -m minitrain.train.worker OUT` and returns its exit code,
forwarding SIGINT/SIGTERM. When the process is already one rank of a launch (torchrun or a multi-task
`srun` set the environment), it runs the worker in-process instead of nesting torchrun.

Trade-off: the parent pays for opening the data once (it also builds the store's cache, so the ranks do
not race to build it) and for reading the model's config, so a wrong flag or file fails in seconds with
one line instead of after N processes have imported torch and loaded a model. This module imports torch
only inside functions: building and asserting the command line is cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson

from minitrain import __version__
from minitrain.atomic import atomic_write
from minitrain.config import TRAINING_PARAMS_FILE, TrainConfig, usable_cores
from minitrain.errors import UserError, first_line
from minitrain.train.trackers import check_trackers


@dataclass(frozen=True)
class Preflight:
    """What the parent learned before spawning: printed, and recorded in training_params.json."""

    num_samples: int
    num_too_long: int  # samples longer than --max-tokens-per-gpu: never trained
    max_token_id: int
    vocab_size: int
    tokenizer_source: str | None  # where checkpoints copy tokenizer files from


def in_launched_env(env: Mapping[str, str] | None = None) -> bool:
    """True when this process is already one rank of a torchrun or multi-task srun launch."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return True
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def default_nproc() -> int:
    """Processes per node when --nproc is not given: the visible GPUs, or 1 without any."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(config: TrainConfig, *, python: str = sys.executable) -> list[str]:
    """The torchrun command line for `config`: standalone on one node, c10d rendezvous across several.

    It runs torchrun through `torchrun_main` below (same arguments as `python -m torch.distributed.run`), so
    a failed or interrupted run ends with one line per failed rank instead of torchrun's traceback.
    """
    cmd = [python, "-m", "minitrain.train.launch", "--nproc-per-node", str(config.nproc)]
    if config.nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += [
            "--nnodes", str(config.nnodes),
            "--node-rank", str(config.node_rank),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(config.rdzv_endpoint),
            "--rdzv-id", config.rdzv_id,
        ]  # fmt: skip
    return cmd + ["-m", "minitrain.train.worker", str(config.output_dir)]


def run_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run `cmd` in its own session, forward SIGINT/SIGTERM to it, and return its exit code.

    Its own session, so a Ctrl+C in the terminal reaches the workers once (through torchrun, which forwards
    the signal to every rank) rather than twice (directly from the terminal and again from us). A child
    killed by signal N gives 128+N; a child that fails after we forwarded signal N also gives 128+N
    (torchrun itself exits 1 when interrupted), so Ctrl+C is 130 and a scheduler's SIGTERM 143.
    """
    from minitrain.train.faults import wait_forwarding_signals

    env = dict(os.environ if env is None else env)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # seconds the ranks get to save after a signal
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    code, _ = wait_forwarding_signals(
        proc, notify=lambda m: print(f"minitrain: {m}", file=sys.stderr, flush=True)
    )
    return code


def preflight(config: TrainConfig) -> Preflight:
    """Check data, model and output folder; raise `UserError` naming the problem and the fix."""
    check_trackers(config.report_to)  # --report-to's packages, before the slow checks
    import torch  # before transformers and the store on purpose: one import cost, paid here

    vocab_size = model_vocab_size(config.model_name_or_path)
    store, too_long = _check_data(
        config.data_path, label=str(config.data_path), config=config, vocab_size=vocab_size
    )
    if too_long and is_rank0():
        print(
            f"minitrain: warning: {too_long} of {len(store)} samples are longer than --max-tokens-per-gpu "
            f"{config.max_tokens_per_gpu} and will be skipped (raise it to train them)",
            file=sys.stderr,
        )
    source = tokenizer_source(config.model_name_or_path, store.meta)
    if config.eval_data_path is not None:
        label = f"--eval-data-path {config.eval_data_path}"
        _check_data(config.eval_data_path, label=label, config=config, vocab_size=vocab_size)
    if config.load_in_4bit:
        from minitrain.train.adapters import require_qlora

        require_qlora("cuda" if torch.cuda.is_available() else "cpu")
    if not config.from_scratch:
        _check_weights(config.model_name_or_path)
    check_output_dir(config.output_dir)
    _check_previous_run(config)
    if not in_launched_env():
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and config.nproc > gpus:
            raise UserError(
                f"--nproc {config.nproc} but only {gpus} GPUs are visible; use --nproc {gpus} or fewer"
            )
    return Preflight(len(store), too_long, int(store.max_token_id), vocab_size, source)


# config attributes of heads that are not a plain hidden @ W.T (minitrain's fused/chunked loss would differ)
UNSUPPORTED_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def causal_lm_config(model_name_or_path: str | Path):
    """The model's transformers config (no weights read), refusing what minitrain cannot train.

    Refused: a path that does not exist, a folder or Hub id with no readable config, a model that is not a
    causal LM (T5, BERT & co), and a head that scales or caps its logits. Used by the parent's preflight and
    by every rank's `load_model`, so both refuse the same models with the same words.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    name = str(model_name_or_path)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise UserError(
            f"--model-name-or-path {name}: not a model folder (no such path); pass a folder "
            "with config.json or a Hub id in the local cache"
        )
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else name)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UserError(
            f"--model-name-or-path {name}: not a model folder or a Hub id available offline "
            f"({first}); pass a folder with config.json or a Hub id in the local cache"
        ) from None
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder:  # BERT & co: bidirectional, not causal
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


def model_vocab_size(model_name_or_path: str) -> int:
    """The model's vocabulary size from its config (no weights loaded); refuses what minitrain cannot train."""
    return int(causal_lm_config(model_name_or_path).get_text_config().vocab_size)


def tokenizer_source(model_name_or_path: str, meta: dict | None) -> str | None:
    """Where checkpoints copy tokenizer files from: the model folder if it has them, else the one the data used."""
    model_dir = Path(model_name_or_path)
    if model_dir.is_dir():
        if any(
            (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            return str(model_dir.resolve())
    elif (
        not model_dir.exists() and "/" in model_name_or_path and not model_name_or_path.startswith((".", "/"))
    ):
        return model_name_or_path  # a Hub id: AutoTokenizer resolves it from the local cache
    recorded = ((meta or {}).get("tokenizer") or {}).get("path")
    return str(recorded) if recorded and Path(recorded).is_dir() else None


def check_tokenizer_matches(meta: dict | None, model_name_or_path: str, data_path: Path) -> None:
    """Refuse data tokenized with another tokenizer than the model's (when both fingerprints are known)."""
    recorded = ((meta or {}).get("tokenizer") or {}).get("fingerprint")
    if not recorded:
        return
    model_dir = Path(model_name_or_path)
    if model_dir.is_dir() and not any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")
    ):
        return  # a bare config (e.g. --from-scratch): the data's tokenizer is the only one there is
    from transformers import AutoTokenizer

    from minitrain.data.chat import tokenizer_fingerprint

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        return  # no tokenizer beside the model: nothing to compare with
    actual = tokenizer_fingerprint(tokenizer)
    if actual != recorded:
        raise UserError(
            f"{data_path} was tokenized with {meta['tokenizer'].get('path')} (fingerprint {recorded[:12]}), not "
            f"with {model_name_or_path}'s tokenizer ({actual[:12]}); re-run `minitrain tokenize` with this model"
        )


def write_training_params(config: TrainConfig, *, world_size: int, preflight: Preflight | None) -> Path:
    """OUT/training_params.json: every parameter, the versions that ran, the world size, the data summary."""
    params: dict[str, Any] = config.to_dict()
    params.update(
        world_size=world_size,
        minitrain_version=__version__,
        torch_version=_version("torch"),
        transformers_version=_version("transformers"),
        python_version=sys.version.split()[0],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if preflight is not None:
        params.update(
            num_samples=preflight.num_samples,
            num_samples_too_long=preflight.num_too_long,
            tokenizer_source=preflight.tokenizer_source,
        )
    path = Path(config.output_dir) / TRAINING_PARAMS_FILE
    with atomic_write(path) as f:
        f.write(orjson.dumps(params, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def read_training_params(run_dir: Path) -> dict[str, Any]:
    """The parameters a run was started with (raises UserError when the file is missing or broken)."""
    path = Path(run_dir) / TRAINING_PARAMS_FILE
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; start training with `minitrain train`") from None
    except orjson.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def run_training(config: TrainConfig) -> int:
    """Check, write training_params.json, and train: torchrun in a child, or in-process under a launcher."""
    launched = in_launched_env()
    info = preflight(config)
    if launched:
        from minitrain.train.dist import ranks_from_env
        from minitrain.train.worker import run

        rank, _, world, _ = ranks_from_env(os.environ)
        if rank == 0:
            write_training_params(config, world_size=world, preflight=info)
        state = run(config, tokenizer_source=info.tokenizer_source)
        return 128 + state.stop_signal if state.stop_signal else 0
    write_training_params(config, world_size=config.world_size(), preflight=info)
    return run_command(torchrun_command(config), env=torchrun_env(config.nproc))


def torchrun_env(nproc: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment torchrun runs in: the user's, with OMP_NUM_THREADS set when the user left it unset.

    Then it is this machine's usable cores shared by the local ranks. torchrun's own default is 1 thread
    per rank, announced in a banner of asterisks on every multi-process run.
    """
    env = dict(os.environ if environ is None else environ)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // max(1, nproc)))
    return env


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


def _check_weights(model_name_or_path: str) -> None:
    """A local model folder must hold weights unless --from-scratch (found here, not after spawning ranks)."""
    folder = Path(model_name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(
            f"--model-name-or-path {model_name_or_path}: no weights there (model.safetensors or "
            "pytorch_model.bin); add --from-scratch to start from its config, or pass the folder with the weights"
        )


RUN_ARTIFACTS = ("training_metrics_0.jsonl", "checkpoints", "hf_format")


def _check_previous_run(config: TrainConfig) -> None:
    """An output dir holding a run is continued (--resume), replaced (--overwrite), or refused."""
    from minitrain.train.state import resolve_resume

    out = Path(config.output_dir)
    found = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if config.resume is not None:
        resolve_resume(out, None if config.resume == "latest" else Path(config.resume))  # a clear error now
        return
    if not found:
        return
    if not config.overwrite:
        raise UserError(
            f"--output-dir {out} already holds a run ({', '.join(found)}); add --resume to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    if is_rank0():
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def _check_data(path: Path, *, label: str, config: TrainConfig, vocab_size: int):
    """Open a tokenized file (building its cache) and check it fits the model and the token budget.

    Returns the store and how many of its samples are longer than --max-tokens-per-gpu (skipped).
    """
    from minitrain.data.format import check_kind, read_sidecar
    from minitrain.data.store import TokenStore

    check_kind(path, read_sidecar(path), "sft")  # --objective dpo (issue 15) will pass its objective here
    store = TokenStore.open(path)
    if len(store) == 0:
        raise UserError(f"{label}: no samples; check the tokenize step's rejects file")
    too_long = int((store.lengths > config.max_tokens_per_gpu).sum())
    if too_long == len(store):
        raise UserError(
            f"{label}: every sample is longer than --max-tokens-per-gpu {config.max_tokens_per_gpu} (shortest: "
            f"{int(store.lengths.min())} tokens); raise --max-tokens-per-gpu"
        )
    if store.max_token_id >= vocab_size:
        raise UserError(
            f"{label}: token id {store.max_token_id} does not fit the vocabulary of "
            f"{config.model_name_or_path} ({vocab_size} ids); tokenize with this model's tokenizer"
        )
    check_tokenizer_matches(store.meta, config.model_name_or_path, path)
    return store, too_long


def is_rank0() -> bool:
    """True in the parent, and on rank 0 when this process is one rank of an outer launch."""
    from minitrain.train.dist import ranks_from_env

    return not in_launched_env() or ranks_from_env(os.environ)[0] == 0


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def torchrun_main(argv: Sequence[str]) -> int:
    """torchrun (`torch.distributed.run`) with its failures as one line each instead of a traceback.

    A failing rank has already printed its own one-line error; torchrun then raises `ChildFailedError`
    (or `SignalException` when it was itself signalled), which would end in a traceback of torchrun's
    internals. Exit codes: 1 when a rank failed, 128+N after signal N.
    """
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(argv))
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            code = failure.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            print(f"minitrain: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr, flush=True)
        return 1
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
