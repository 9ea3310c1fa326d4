"""`minitrain train` (not built yet)."""

from __future__ import annotations

from minitrain.errors import UserError


def train() -> None:
    """Not built yet."""
    raise UserError("'minitrain train' is not built yet")
