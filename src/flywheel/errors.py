"""User-facing errors: one line, naming the file and line (or the field) that is wrong.

The CLI turns a `UserError` into `flywheel: <message>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a record, a flag. `str(err)` is the whole one-line message."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self.location() + message)

    def location(self) -> str:
        if self.path is None:
            return ""
        return f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
