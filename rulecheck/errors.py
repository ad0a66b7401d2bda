"""The one error type users see: a single line naming the place, the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class RulecheckError(Exception):
    """Bad input, reported as ``file:line: field: what is wrong (fix: ...)``.

    Every check of user input raises this type and nothing else, so the CLI and the pytest
    plugin can print it as one line instead of a traceback.
    """

    def __init__(
        self,
        what: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.what = what
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        fix = f" (fix: {self.fix})" if self.fix else ""
        return f"{where}{field}{self.what}{fix}"

    def __str__(self) -> str:
        return self.message
