"""User-facing errors: one line, naming the file and line (or the field) that is wrong.

The CLI turns a `UserError` into `flywheel: <message>` on stderr and exit code 2, never a traceback. A rank started by
`flywheel <stage> --nproc N` hands the message to the launcher instead (`report_user_error`), which prints each
distinct one once (`flywheel.distributed.maybe_launch`).
"""

from __future__ import annotations

import os
from pathlib import Path

ERROR_DIR_ENV = "FLYWHEEL_ERROR_DIR"  # where the ranks of a launched run report their UserError messages


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


def report_user_error(message: str) -> bool:
    """In a rank started by `flywheel <stage> --nproc N`: hand the message to the launcher and return True; False
    anywhere else (the caller prints it). No torch import: every command's error path runs this."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from flywheel.utils import atomic_write_text

    atomic_write_text(Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt", message)
    return True
