"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (a missing file, a bad flag, a malformed
line); the CLI turns it into one line on stderr and exit code 1, with no traceback. Anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line that names the problem and the fix."""
