"""User-facing errors: one clear message that names the fix, never a traceback."""

from __future__ import annotations


class MedxferError(Exception):
    """An error the user can fix. The CLI prints ``str(err)`` and exits with status 2."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")
