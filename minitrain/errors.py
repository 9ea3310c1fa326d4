"""The one exception type for user mistakes, and the one way a process prints a line of its own.

Library code raises `UserError` for anything the user can fix (a missing file, a bad flag, a malformed
line); the CLI turns it into one line on stderr and exit code 1, with no traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix; the message is one line that names the problem and the fix."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library messages run over many), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def say(line: str) -> None:
    """One line on stderr in one write, flushed: the lines of several ranks on one pipe never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def signal_exit_code(signum: int) -> int:
    """The exit code of a process ended by signal `signum`, as a shell reports it: 128 + N (130 SIGINT, 143
    SIGTERM)."""
    return 128 + signum
