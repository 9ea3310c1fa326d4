"""`minitrain plot` (not built yet)."""

from __future__ import annotations

from minitrain.errors import UserError


def plot() -> None:
    """Not built yet."""
    raise UserError("'minitrain plot' is not built yet")
