"""`minitrain tokenize` (not built yet)."""

from __future__ import annotations

from minitrain.errors import UserError


def tokenize() -> None:
    """Not built yet."""
    raise UserError("'minitrain tokenize' is not built yet")
