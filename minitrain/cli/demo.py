"""`minitrain demo` (not built yet)."""

from __future__ import annotations

from minitrain.errors import UserError


def demo() -> None:
    """Not built yet."""
    raise UserError("'minitrain demo' is not built yet")
