"""The one way any stage writes a file: to a temporary name beside it, renamed into place when complete.

A reader (a later stage, an image viewer, a resumed run) sees the old file or the whole new one, never a
half-written one, and an interrupted write leaves nothing behind. The file gets the permissions `open()`
would give it (mkstemp's 0600 would surprise a user sharing a run directory).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; rename it onto `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
