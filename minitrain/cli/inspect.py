"""`minitrain inspect` (not built yet)."""

from __future__ import annotations

from minitrain.errors import UserError


def inspect() -> None:
    """Not built yet."""
    raise UserError("'minitrain inspect' is not built yet")
