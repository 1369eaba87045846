"""The one error type users see, and how the CLI prints it.

Anything a user can fix (a bad config field, a missing file, a flag that does not fit) raises
``UserError`` with one line saying what is wrong, where, and what to do. The CLI prints that line
and exits non-zero, never a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 1
EXIT_NOT_BUILT = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always exactly one line


class NotBuiltError(UserError):
    """A command or option that exists in the interface but is not implemented yet."""

    exit_code = EXIT_NOT_BUILT


def report(error: UserError, prog: str = "megastack") -> int:
    """Print the one-line message to stderr and return the exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code
