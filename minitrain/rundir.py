"""The run directory's metrics file, read side: its name and one incremental, writer-safe reader.

    RUN/training_metrics_0.jsonl   one JSON object per optimizer step, appended and flushed by `minitrain
                                   train` (step, lr, grad_norm, loss, num_total_tokens, time_per_batch,
                                   tokens_per_second, total_samples_accumulated, timestamp, ...); rows that
                                   carry `eval_loss` may hold little else (step, eval_loss, samples).

Reading is incremental and safe against a writer that is still running: only complete lines are
consumed (a last line without its newline is taken only if it parses, and is read again on the next
refresh), a malformed line anywhere else is a `UserError` naming FILE:LINE, and `NaN`/`Infinity` written
by Python's json module are accepted. The writer is `minitrain.train.metrics`; this module imports no
torch, so `plot` and `train` share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from minitrain.errors import UserError

METRICS_FILENAME = "training_metrics_0.jsonl"


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
        return run / METRICS_FILENAME
    if run.exists():
        return run
    raise UserError(f"{run} does not exist; pass a training output directory or a metrics .jsonl file")
