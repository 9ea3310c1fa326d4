"""Full training-state checkpoints: everything `--resume` needs to continue a run as if it never stopped.

Layout (the Hugging Face export of the same moment lives apart, in OUT/hf_format/samples_<N>/):

    OUT/checkpoints/
        samples_<N>/                N = samples trained when it was written
            state/                  model + optimizer, sharded by torch.distributed.checkpoint (DCP):
                                    .metadata + __<rank>_0.distcp per saving rank; reloads on any world size
            rng/rank_<r>.json       torch (CPU, CUDA), python and numpy RNG states of rank r
            trainer_state.json      counters (step, samples_seen, tokens_seen, ...), sampler (seed, epoch,
                                    position), LR-scheduler state, world size, format version
            COMPLETE                written last, before the rename: its presence is what "complete" means
        .tmp-samples_<N>/           being written, or left by a crash: never resumed from; removed by the
                                    next successful save
        latest                      one line, the name of the newest complete checkpoint; replaced last

Writing (`save_training_state`, every rank): rank 0 creates `.tmp-samples_<N>`; all ranks write their DCP
shards and RNG file; rank 0 writes trainer_state.json and COMPLETE (each fsynced), renames the folder into
place, fsyncs the parent, then atomically rewrites `latest`. A crash at any point leaves either the previous
state untouched or a `.tmp-` folder that resume ignores (and reports). Pruning (`--keep-last K`) runs only
after the new checkpoint is complete. Any failure is agreed on by all ranks (one collective per phase), so no
rank is left waiting; an OSError (disk full, permission) becomes a one-line `CheckpointSaveError` naming the
path, after the half-written folder is removed - the previous checkpoint is never touched.

Reading (`load_training_state`): DCP loads into the model's and optimizer's *current* sharding, so a run saved
on 8 ranks resumes on 4 or 1. RNG states: on the same world size every rank gets its own back exactly; on
another world size there is no meaningful mapping (ranks see other samples), so every rank is reseeded from
(seed, step, rank) instead - reproducible, and irrelevant to the losses: minitrain's training math draws no
random numbers after initialisation (the sampler is counter-based, dropout is off in the models it targets).

Trade-off: all ranks must see one shared filesystem (DCP's own requirement for resharding), and a checkpoint
holds the weights plus both AdamW moments (3x the fp32 weights, beside the HF export) - the price of an exact
resume; `--keep-last` bounds the disk it takes. An adapter run's checkpoint holds only the trainable (adapter)
parameters and their moments: the frozen base is reloaded from --model-name-or-path and --base-adapter, so
resuming on another base of the same shapes is not detected.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from minitrain import __version__
from minitrain.atomic import atomic_write
from minitrain.errors import UserError
from minitrain.rundir import (
    COMPLETE_FILE,
    LATEST_FILE,
    OLD_PREFIX,
    STATE_DIR,
    TMP_PREFIX,
    TRAINER_STATE_FILE,
    checkpoints_root,
    find_latest_checkpoint,
    is_complete,
    prune_checkpoints,
    scan_checkpoints,
    training_state_dir,
)
from minitrain.train.dist import DistInfo

RNG_DIR = "rng"
FORMAT_VERSION = 1


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


def save_training_state(
    out_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    sampler: Any,
    counters: Mapping[str, Any],
    dist: DistInfo,
    keep_last: int | None = None,
) -> Path:
    """Write OUT/checkpoints/samples_<counters['samples_seen']> atomically; every rank must call this.

    `sampler` has `state_dict()` (InfiniteSampler); `counters` is JSON-safe and holds at least `step` and
    `samples_seen`. Afterwards, leftovers of interrupted writes are removed, and with `keep_last` every
    complete checkpoint but the newest `keep_last` (and `latest`).
    Raises `CheckpointSaveError` (on every rank) when the filesystem refuses; the previous checkpoint stays.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import save as dcp_save

    for key in ("step", "samples_seen"):
        if not isinstance(counters.get(key), int):
            raise ValueError(f"counters[{key!r}] must be an int, got {counters.get(key)!r}")
    final = training_state_dir(out_dir, counters["samples_seen"])
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    trainer_state = {
        "format_version": FORMAT_VERSION,
        "minitrain_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": dist.world_size,
        "counters": dict(counters),
        "sampler": sampler.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
    }
    payload = _dumps(trainer_state)  # fails here, before any file exists, if something is not JSON-safe

    # phase 1: rank 0 prepares the temporary folder
    _agree(dist, _attempt(dist.is_main, lambda: _fresh_dir(tmp)), final, out_dir)
    # phase 2: every rank writes its shards (DCP agrees on failures itself) and its RNG states
    try:
        model_state, optim_state = _get_state(model, optimizer)
        _dcp(dcp_save, {"model": model_state, "optim": optim_state}, tmp / STATE_DIR)
    except (Exception, CheckpointException) as err:  # DCP wraps the ranks' errors, raises on every rank
        _remove_quietly(tmp, dist)
        cause = _os_error(err)
        if cause is None:
            raise
        raise _save_error(final, out_dir, cause) from None
    _agree(
        dist,
        _attempt(True, lambda: _write_rng(tmp / RNG_DIR / f"rank_{dist.rank}.json")),
        final,
        out_dir,
        tmp,
    )
    # phase 3: rank 0 seals, publishes, points `latest` at it, and prunes
    _agree(dist, _attempt(dist.is_main, lambda: _publish(tmp, final, payload)), final, out_dir, tmp)
    if dist.is_main:  # cleanup after the new checkpoint is safe; a failure here must not fail the run
        try:
            if keep_last is not None:
                prune_checkpoints(out_dir, keep_last)
            for leftover in scan_checkpoints(out_dir).incomplete:
                if leftover.name.startswith((TMP_PREFIX, OLD_PREFIX)):  # ours, from an interrupted write
                    shutil.rmtree(leftover)
        except OSError as err:
            print(f"minitrain: warning: could not remove old checkpoints ({err})", flush=True)
    return final


def load_training_state(
    checkpoint: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    dist: DistInfo,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into `model` (any sharding), `optimizer`, `scheduler` and this rank's RNGs.

    Returns (sampler_state, counters): build the sampler with
    `InfiniteSampler.from_state_dict(sampler_state)`. Every rank must call this.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        raise UserError(f"{checkpoint}: not a complete minitrain checkpoint; resume from another one")
    try:
        trainer_state = orjson.loads((checkpoint / TRAINER_STATE_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError) as err:
        raise UserError(
            f"{checkpoint / TRAINER_STATE_FILE}: unreadable ({err}); resume from another one"
        ) from None
    if trainer_state.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{checkpoint}: checkpoint format {trainer_state.get('format_version')} is not the format "
            f"{FORMAT_VERSION} this minitrain {__version__} reads; resume with the version that wrote it"
        )

    model_state, optim_state = _get_state(model, optimizer)  # the current sharding: DCP reshards into it
    state = {"model": model_state, "optim": optim_state}
    try:
        _dcp(dcp_load, state, checkpoint / STATE_DIR)
    except (Exception, CheckpointException) as err:  # other keys or shapes: another model's checkpoint
        if (cause := _os_error(err)) is not None:
            raise UserError(f"{checkpoint}: cannot read it ({cause}); resume from another one") from None
        raise UserError(
            f"{checkpoint}: does not fit this model and optimizer ({_describe(err)}); resume with the same "
            f"--model-name-or-path (and adapter settings) as the run that wrote it"
        ) from err
    # the resumed run's flags (--learning-rate, --weight-decay) win over the ones saved in the optimizer and
    # scheduler state; only the moments, the step counts and the position in the schedule come back
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    partial = _has_frozen(model)  # DCP has already failed on any trainable key the checkpoint lacks
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=partial, strict=not partial),
    )  # fmt: skip
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    if scheduler is not None and trainer_state["scheduler"] is not None:
        saved = dict(trainer_state["scheduler"], base_lrs=list(scheduler.base_lrs))
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR (all transformers schedules): the saved step's rate
            rates = zip(saved["base_lrs"], scheduler.lr_lambdas, strict=True)
            saved["_last_lr"] = [base * f(saved["last_epoch"]) for base, f in rates]
        scheduler.load_state_dict(saved)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    counters, sampler_state = trainer_state["counters"], trainer_state["sampler"]
    rng_file = checkpoint / RNG_DIR / f"rank_{dist.rank}.json"
    if trainer_state["world_size"] == dist.world_size and rng_file.is_file():
        _restore_rng(orjson.loads(rng_file.read_bytes()), dist)
    else:  # another world size: no rank's stream continues; reseed reproducibly instead
        _reseed(int(sampler_state.get("seed", 0)), int(counters["step"]), dist.rank)
    return sampler_state, counters


# --- writing ---------------------------------------------------------------------------------------------


def _publish(tmp: Path, final: Path, payload: bytes) -> None:
    """Seal `tmp` (trainer_state.json, then COMPLETE), rename it to `final`, then point `latest` at it."""
    _write_durably(tmp / TRAINER_STATE_FILE, payload)
    _write_durably(tmp / COMPLETE_FILE, b"ok\n")
    _fsync_dir(tmp)
    if (
        final.exists()
    ):  # the same sample count saved again (e.g. the final save): swap, never a gap of nothing
        old = final.parent / f"{OLD_PREFIX}{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    _write_durably(final.parent / LATEST_FILE, f"{final.name}\n".encode())


def _fresh_dir(path: Path) -> None:
    if path.exists():  # a leftover of a crash at this very sample count
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _write_rng(path: Path) -> None:
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    _write_durably(path, orjson.dumps(state))


def _restore_rng(state: dict[str, Any], dist: DistInfo) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and dist.device.type == "cuda":
        cuda = torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8)
        torch.cuda.set_rng_state(cuda, dist.device)


def _reseed(seed: int, step: int, rank: int) -> None:
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint32)[0])
    torch.manual_seed(mixed)  # also seeds every CUDA device
    random.seed(mixed)
    np.random.seed(mixed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _dumps(value: Any) -> bytes:
    def reject(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.numel() == 1:
            return obj.item()
        raise TypeError(f"cannot store {type(obj).__name__} in {TRAINER_STATE_FILE}")

    return orjson.dumps(value, default=reject, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def _write_durably(path: Path, data: bytes) -> None:
    """Write `data` through a fsynced temporary file renamed onto `path`: readers see the old or the new
    file."""
    with atomic_write(path) as f:
        f.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- agreeing on failures across ranks ------------------------------------------------------------------


def _attempt(run: bool, action: Any) -> BaseException | None:
    """Run `action` when `run`; return the exception it raised (the ranks then agree on it)."""
    if not run:
        return None
    try:
        action()
    except Exception as err:
        return err
    return None


def _agree(
    dist: DistInfo, error: BaseException | None, final: Path, out_dir: Path, tmp: Path | None = None
) -> None:
    """Collective: if any rank failed, every rank raises (an OSError as CheckpointSaveError), after
    cleanup."""
    if _initialized() and dist.world_size > 1:
        errors: list[Any] = [None] * dist.world_size
        torch_dist.all_gather_object(errors, None if error is None else (repr(error), _os_error(error)))
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    else:
        failed = [] if error is None else [(dist.rank, (repr(error), _os_error(error)))]
    if not failed:
        return
    if tmp is not None:
        _remove_quietly(tmp, dist)
    if error is not None and _os_error(error) is None:
        raise error  # a bug, not the filesystem: keep the traceback
    rank, (text, cause) = failed[0]
    if cause is None:
        raise RuntimeError(f"saving {final} failed on rank {rank}: {text}")
    raise _save_error(final, out_dir, cause) from None


def _causes(err: BaseException | None) -> list[BaseException]:
    """`err`, its causes, and the per-rank exceptions inside DCP's CheckpointException (rank -> (exc, tb))."""
    found: list[BaseException] = []
    todo = [err]
    while todo and len(found) < 32:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or e in found:
            continue
        found.append(e)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return found


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`, if any (also inside DCP's CheckpointException)."""
    return next((e for e in _causes(err) if isinstance(e, OSError)), None)


def _describe(err: BaseException) -> str:
    """One line for the innermost cause of `err` (DCP's own message is a multi-rank traceback)."""
    inner = next((e for e in _causes(err) if not hasattr(e, "failures")), err)
    text = next((line for line in str(inner).splitlines() if line.strip()), type(inner).__name__)
    return f"{type(inner).__name__}: {text[:200]}"


def _save_error(final: Path, out_dir: Path, cause: OSError) -> CheckpointSaveError:
    reason = cause.strerror or str(cause)
    where = f" ({cause.filename})" if cause.filename else ""
    previous = find_latest_checkpoint(out_dir)
    kept = f"; the previous checkpoint {previous} is intact" if previous else ""
    return CheckpointSaveError(
        f"cannot write checkpoint {final}: {reason}{where}; free disk space or make "
        f"{checkpoints_root(out_dir)} writable{kept}"
    )


def _remove_quietly(tmp: Path, dist: DistInfo) -> None:
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)


def _has_frozen(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _get_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state dicts in the current sharding: what DCP writes, or reads into.

    With frozen parameters (an adapter run), only the trainable ones are kept: the frozen base (bf16, or
    4-bit with its quantisation constants) and frozen base adapters are reloaded from their own files at
    resume, so a checkpoint costs the adapter and its optimizer moments, not another copy of the base.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if not _has_frozen(model):
        return get_state_dict(model, optimizer)
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    trainable = {
        name.replace("_checkpoint_wrapped_module.", "")
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return {k: v for k, v in model_state.items() if k in trainable}, optim_state


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _dcp(action: Any, state: dict[str, Any], path: Path) -> None:
    """dcp.save / dcp.load; without a process group (one plain process) in DCP's no-dist mode, quietly."""
    if _initialized():
        action(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        action(state, checkpoint_id=path, no_dist=True)
