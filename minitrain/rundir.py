"""The run-directory contract: what minitrain writes in --output-dir, how it is found, pruned and replaced.

    OUT/
        training_params.json        the latest launch's settings at the top level (what the workers read),
                                    and `launches`: every launch of this run, oldest first (written by
                                    `write_training_params` below)
        training_metrics_0.jsonl    one line per step (`minitrain.train.metrics`)
        checkpoints/                resumable training state (`minitrain.train.checkpoint`): samples_<N>/,
                                    `latest`, leftovers of interrupted writes (.tmp-samples_<N>, .old-...)
        reference_logps.npy         --objective dpo with a reference: the initial model's summed log-probs of
        reference_logps.json        every pair's sides, and the key they were computed for
                                    (`minitrain.train.dpo`; full fine-tuning only)
        eval_reference_logps.npy    the same for the --eval-data-path pairs
        eval_reference_logps.json
        hf_format/                  Hugging Face exports (`minitrain.train.export`): samples_<N>/, and
                                    .samples_<N>.tmp while one is written
            best/                   --save-best-val-loss: the export with the lowest eval_loss so far, with
                                    best_val_loss.json (eval_loss, step, samples); .best.tmp/.best.old
                                    while it is replaced

Only these names are minitrain's. `--overwrite` removes exactly them (`remove_previous_run`), never another
file a user put in OUT, checkpoints/ or hf_format/; `--keep-last K` prunes the training state and the
exports together (`prune_checkpoints`), keeping the K newest complete checkpoints and the one `latest` names.
This module imports no torch: the parent checks `--resume` against it before anything heavy is imported.

The metrics file is appended and flushed by `minitrain.train.metrics` (step, lr, grad_norm, loss,
num_total_tokens, time_per_batch, tokens_per_second, total_samples_accumulated, timestamp, ...; rows that
carry `eval_loss` may hold little else). `MetricsFile` reads it incrementally and safely against a writer
that is still running: only complete lines are consumed (a last line without its newline is taken only if
it parses, and is read again on the next refresh), a malformed line anywhere else is a `UserError` naming
FILE:LINE, and `NaN`/`Infinity` written by Python's json module are accepted. `plot` and `train` share it.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from minitrain import __version__
from minitrain.atomic import atomic_write
from minitrain.errors import UserError

if TYPE_CHECKING:
    from minitrain.config import TrainConfig

TRAINING_PARAMS_FILE = "training_params.json"
METRICS_FILE = "training_metrics_0.jsonl"
REFERENCE_LOGPS_FILE = "reference_logps.npy"
REFERENCE_KEY_FILE = "reference_logps.json"
EVAL_REFERENCE_LOGPS_FILE = "eval_reference_logps.npy"  # the same for --eval-data-path's pairs
EVAL_REFERENCE_KEY_FILE = "eval_reference_logps.json"
CHECKPOINTS_DIR = "checkpoints"
HF_FORMAT_DIR = "hf_format"
LATEST_FILE = "latest"
COMPLETE_FILE = "COMPLETE"
STATE_DIR = "state"
TRAINER_STATE_FILE = "trainer_state.json"
BEST_EXPORT = "best"  # OUT/hf_format/best (--save-best-val-loss)
BEST_INFO_FILE = "best_val_loss.json"  # inside it: which eval it came from
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_NAME = re.compile(r"samples_(\d+)")
_EXPORT_TMP = re.compile(r"\.(samples_\d+|best)\.(tmp|old)")  # an export being written or replaced


@dataclass(frozen=True)
class CheckpointScan:
    """What OUT/checkpoints holds: complete checkpoints, leftovers of interrupted writes, the one to
    resume."""

    complete: tuple[Path, ...]  # oldest first (by samples)
    incomplete: tuple[Path, ...]  # .tmp-/.old- folders and samples_<N> without COMPLETE: never resumed from
    latest: Path | None  # the `latest` marker's target if complete, else the newest complete one
    note: str | None = None  # why the marker was not followed, when it was not


def checkpoints_root(out_dir: Path) -> Path:
    """OUT/checkpoints."""
    return Path(out_dir) / CHECKPOINTS_DIR


def training_state_dir(out_dir: Path, samples: int) -> Path:
    """OUT/checkpoints/samples_<N>."""
    return checkpoints_root(out_dir) / f"samples_{samples}"


def export_dir(out_dir: Path, samples: int) -> Path:
    """OUT/hf_format/samples_<N>."""
    return Path(out_dir) / HF_FORMAT_DIR / f"samples_{samples}"


def best_export_dir(out_dir: Path) -> Path:
    """OUT/hf_format/best (--save-best-val-loss)."""
    return Path(out_dir) / HF_FORMAT_DIR / BEST_EXPORT


def read_best(out_dir: Path) -> dict[str, Any] | None:
    """OUT/hf_format/best/best_val_loss.json ({eval_loss, step, samples}), or None when there is no best."""
    try:
        return orjson.loads((best_export_dir(out_dir) / BEST_INFO_FILE).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def is_complete(path: Path) -> bool:
    """True when `path` is a whole checkpoint (COMPLETE, trainer_state.json and DCP metadata all present)."""
    path = Path(path)
    return all((path / p).is_file() for p in (COMPLETE_FILE, TRAINER_STATE_FILE, f"{STATE_DIR}/.metadata"))


def scan_checkpoints(out_dir: Path) -> CheckpointScan:
    """Classify OUT/checkpoints/*; a missing folder is an empty scan."""
    root = checkpoints_root(out_dir)
    complete: list[tuple[int, Path]] = []
    incomplete: list[Path] = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if not entry.is_dir():
                continue
            if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                incomplete.append(entry)
            elif (m := _NAME.fullmatch(entry.name)) is not None:
                if is_complete(entry):
                    complete.append((int(m.group(1)), entry))
                else:
                    incomplete.append(entry)
    complete.sort()
    ordered = tuple(p for _, p in complete)
    latest, note = (ordered[-1] if ordered else None), None
    marker = root / LATEST_FILE
    if marker.is_file():
        name = marker.read_text().strip()
        target = root / name
        if _NAME.fullmatch(name) and target in ordered:
            latest = target  # the marker wins: after `--resume PATH` to an older one, newer folders are stale
        else:
            note = f"{marker} names {name!r}, which is not a complete checkpoint; using {latest}"
    return CheckpointScan(ordered, tuple(incomplete), latest, note)


def find_latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `--resume` continues from, or None; see `scan_checkpoints` for the ignored leftovers."""
    return scan_checkpoints(out_dir).latest


def resolve_resume(out_dir: Path, resume: Path | None) -> Path:
    """The checkpoint to resume from: `resume` itself (checked), or the latest complete one in `out_dir`."""
    if resume is None:
        scan = scan_checkpoints(out_dir)
        if scan.latest is None:
            found = (
                f" (only incomplete ones: {', '.join(p.name for p in scan.incomplete)})"
                if scan.incomplete
                else ""
            )
            raise UserError(
                f"--resume: no complete checkpoint in {checkpoints_root(out_dir)}{found}; "
                "start without --resume"
            )
        return scan.latest
    path = Path(resume)
    if path.parent.name == HF_FORMAT_DIR and (path.parent.parent / CHECKPOINTS_DIR / path.name).is_dir():
        raise UserError(
            f"--resume {path}: that is a Hugging Face export; resume from "
            f"{path.parent.parent / CHECKPOINTS_DIR / path.name} (or give --resume without a path)"
        )
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint folder; give OUT/checkpoints/samples_<N>")
    if not is_complete(path):
        raise UserError(
            f"--resume {path}: incomplete checkpoint (its write was interrupted); resume from another one "
            f"or give --resume without a path to take the latest complete one"
        )
    return path


def prune_checkpoints(out_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints (never the `latest` one), the exports of the
    removed ones, and every leftover of an interrupted write. Call only after a save completed (rank 0).

    An export (OUT/hf_format/samples_<N>) is kept exactly when its training state is kept, so K bounds both.
    Returns what was removed.
    """
    if keep_last < 1:
        raise UserError(f"--keep-last must be >= 1, got {keep_last}")
    scan = scan_checkpoints(out_dir)
    keep = set(scan.complete[-keep_last:]) | ({scan.latest} if scan.latest else set())
    removed = [p for p in scan.complete if p not in keep] + list(scan.incomplete)
    kept_names = {p.name for p in keep}
    exports = Path(out_dir) / HF_FORMAT_DIR
    if exports.is_dir():
        removed += [
            p
            for p in sorted(exports.iterdir())
            if p.is_dir()
            and ((_NAME.fullmatch(p.name) and p.name not in kept_names) or _EXPORT_TMP.fullmatch(p.name))
        ]
    for path in removed:
        shutil.rmtree(path)
    return removed


def run_files(out_dir: Path) -> list[Path]:
    """Everything minitrain wrote in `out_dir` (by name; nothing else there is touched), sorted."""
    out = Path(out_dir)
    names = (
        TRAINING_PARAMS_FILE, METRICS_FILE, REFERENCE_LOGPS_FILE, REFERENCE_KEY_FILE,
        EVAL_REFERENCE_LOGPS_FILE, EVAL_REFERENCE_KEY_FILE,
    )  # fmt: skip
    found = [out / name for name in names if (out / name).is_file()]
    root = checkpoints_root(out)
    if root.is_dir():
        found += [
            p
            for p in root.iterdir()
            if (p.is_dir() and (_NAME.fullmatch(p.name) or p.name.startswith((TMP_PREFIX, OLD_PREFIX))))
            or (p.name == LATEST_FILE and p.is_file())
        ]
    exports = out / HF_FORMAT_DIR
    if exports.is_dir():
        found += [
            p
            for p in exports.iterdir()
            if p.is_dir()
            and (_NAME.fullmatch(p.name) or _EXPORT_TMP.fullmatch(p.name) or p.name == BEST_EXPORT)
        ]
    return sorted(found)


def remove_previous_run(out_dir: Path) -> list[Path]:
    """`--overwrite`: remove what minitrain wrote in `out_dir` (`run_files`), and checkpoints/ and hf_format/
    when that leaves them empty. A user's own files stay where they are. Returns what was removed."""
    removed = run_files(out_dir)
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in (CHECKPOINTS_DIR, HF_FORMAT_DIR):
        folder = Path(out_dir) / name
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            removed.append(folder)
    return removed


# ---------------------------------------------------------------------------------------------- metrics


def _parse_line(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        import json  # Python's json writes NaN/Infinity, which orjson rejects; json reads them back

        return json.loads(raw)


class MetricsFile:
    """One metrics JSONL read incrementally: `refresh()` appends the complete lines written since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset = 0  # bytes consumed: always just after a newline
        self._lines = 0  # lines consumed (for FILE:LINE in errors)
        self._provisional = False  # rows[-1] came from a last line without its newline
        self._size = -1
        self._head = b""  # the file's first bytes: a new run rewriting the file changes them

    def refresh(self) -> bool:
        """Read what was appended since the last call; True when the rows changed."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(
                f"{self.path} does not exist; pass a run directory or a metrics .jsonl file"
            ) from None
        if size == self._size:
            return False
        with open(self.path, "rb") as f:
            head = f.read(min(size, 4096))
            if size < self._offset or not head.startswith(self._head):  # a new run rewrote the file
                self.rows, self._offset, self._lines, self._provisional, self._head = [], 0, 0, False, b""
            if not self._head:
                self._head = head[: head.find(b"\n") + 1]  # the first complete line, b"" until there is one
            self._size = size
            if self._provisional:
                self.rows.pop()
                self._provisional = False
            f.seek(self._offset)
            data = f.read(size - self._offset)
        end = data.rfind(b"\n") + 1  # 0 when no complete line was appended
        for raw in data[:end].split(b"\n")[:-1]:
            self._lines += 1
            if not raw.strip():
                continue
            try:
                row = _parse_line(raw)
            except ValueError as err:
                raise UserError(
                    f"{self.path}:{self._lines}: not a JSON line ({err}); fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{self.path}:{self._lines}: expected a JSON object, got {type(row).__name__}"
                )
            self.rows.append(row)
        self._offset += end
        tail = data[end:]
        if tail.strip():  # still being written, or a finished file without a final newline
            try:
                row = _parse_line(tail)
            except ValueError:
                row = None  # incomplete: skipped until its newline arrives
            if isinstance(row, dict):
                self.rows.append(row)
                self._provisional = True
        return True


def metrics_path(run: Path) -> Path:
    """The metrics file of RUN: RUN itself when it is a file, else RUN/training_metrics_0.jsonl."""
    if run.is_dir():
        return run / METRICS_FILE
    if run.exists():
        return run
    raise UserError(f"{run} does not exist; pass a training output directory or a metrics .jsonl file")


# ---------------------------------------------------------------------------------------- training_params


def write_training_params(config: TrainConfig, *, world_size: int, data: Mapping[str, Any] | None) -> Path:
    """OUT/training_params.json: this launch's settings at the top level, every launch of the run in
    `launches`.

    Top level (what the workers and other readers take): every parameter, the versions that ran, the world
    size, the data summary, `created` (this launch) and `resumed_from` (the checkpoint, or null). `resume` is
    always written null: the checkpoint a launch continues from is `resumed_from` (what the workers resume
    from), so the file replays as a fresh run (`minitrain train --config OUT/training_params.json
    --output-dir OUT2`) even when this launch was a `--resume`. `launches`:
    the same record for every launch of this run, oldest first; a `--resume` appends to it, a fresh start or
    `--overwrite` begins it anew. A file written before `launches` existed becomes the first entry.
    """
    path = Path(config.output_dir) / TRAINING_PARAMS_FILE
    launch: dict[str, Any] = config.to_dict()
    resumed_from = None
    if config.resume is not None:
        resumed_from = str(resolve_resume(config.output_dir, config.resume_checkpoint()))
    launch.update(
        world_size=world_size,
        minitrain_version=__version__,
        torch_version=_version("torch"),
        transformers_version=_version("transformers"),
        python_version=sys.version.split()[0],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resume=None,  # --resume is recorded as the checkpoint it chose: resumed_from
        resumed_from=resumed_from,
    )
    launch.update(data or {})  # the data summary of the parent's checks (`Preflight.params`)
    history: list[dict[str, Any]] = []
    if config.resume is not None and path.is_file():
        try:
            previous = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            previous = None  # unreadable: this launch starts the history (the file is replaced below)
        if isinstance(previous, dict):
            history = previous.pop("launches", None) or [previous]
    params = {**launch, "launches": [*history, launch]}
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


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file, read once (`MetricsFile`'s rules)."""
    reader = MetricsFile(Path(path))
    reader.refresh()
    return reader.rows
