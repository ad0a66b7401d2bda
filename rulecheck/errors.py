"""The errors users see, under one base: a single line naming the place, the problem and the
fix (a failed rule adds the evidence on the lines after it).

``RulecheckError`` (the CLI and the plugin print it without a traceback)
    ``InvalidRulebook``  a rulebook that cannot be read
    ``InvalidSpec``      a model, SAE, corpus or option that cannot be used
    ``InvalidMapping``   a feature mapping file (``rulecheck match --out``) that cannot be read
    ``WriteFailed``      an output the system would not let rulecheck write (a full disk):
                         nothing of it was written (also an ``OSError``)
    ``NotEligible``      a feature too rarely (or too often) active to check
    ``FingerprintMismatch``
                         a rulebook checked against another model, SAE or corpus than the
                         one it records
    ``RuleFailed``       a claim that does not hold (also an ``AssertionError``)
    ``RemapLost``        a claim on a feature that a retrained SAE has no partner for
    ``Regenerated``      a claim rewritten by regeneration, to be reviewed
"""

from __future__ import annotations

import errno
from pathlib import Path


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` as a terminal shows it literally: every control or other unprintable character
    (the ESC of an escape sequence, a carriage return, a bell) as its escape (``\\x1b``,
    ``\\r``, ``\\x07``); with ``lines``, line breaks are kept. For text from a user's files
    (labels, keys, specs, paths) printed by ``rulecheck show``, the CLI and failure messages."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or (lines and c == "\n") else c.encode("unicode_escape").decode()
        for c in text
    )


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
        """The error as printed: every part ``printable``, the line breaks of ``what`` (a
        failed rule's evidence) kept, none anywhere else."""
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where = printable(where) + ": "
        field = f"{printable(self.field)}: " if self.field else ""
        fix = f" (fix: {printable(self.fix)})" if self.fix else ""
        return f"{where}{field}{printable(self.what, lines=True)}{fix}"

    def __str__(self) -> str:
        return self.message


class InvalidRulebook(RulecheckError):
    """A rulebook that cannot be read: bad YAML, an unknown key, a value of the wrong type."""


class InvalidSpec(RulecheckError):
    """A model, SAE, corpus or option that cannot be used as given (missing, malformed, or not
    matching the rest)."""


class InvalidMapping(RulecheckError):
    """A feature mapping file that cannot be read: bad YAML, a missing or unknown key, a pair
    of the wrong shape."""


class WriteFailed(RulecheckError, OSError):
    """An output that could not be written (no space left, a read-only filesystem): the OS
    error's words after the path; the files it was to replace are left as they were. Also an
    ``OSError`` (``errno`` set), so callers treating a write as optional catch it as one."""

    def __init__(self, error: OSError, *, file: str | Path, fix: str | None = None) -> None:
        what = f"cannot write it: {error.strerror or error}"
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = fix or ("free some space or write elsewhere" if full else "write elsewhere")
        super().__init__(what, file=file, fix=fix)
        self.errno = error.errno
        self.strerror = error.strerror


class NotEligible(RulecheckError):
    """A feature that is not active often enough on this checkpoint to be checked."""


class FingerprintMismatch(RulecheckError):
    """A rulebook checked against a model, SAE or corpus whose fingerprint differs from the one
    it records: its feature ids and minimums were measured on something else. ``changed``
    names the parts (``model``, ``sae_in``, ``sae_out``, ``corpus``)."""

    def __init__(self, what: str, *, changed: tuple[str, ...] = (), **where: object) -> None:
        super().__init__(what, **where)  # type: ignore[arg-type]
        self.changed = tuple(changed)


class RuleFailed(RulecheckError, AssertionError):
    """A claim that does not hold: what was claimed, what was measured, and the minimal
    counterexample where there is one. ``record`` is what the run report keeps of it."""

    def __init__(self, what: str, *, record: dict | None = None, **where: object) -> None:
        super().__init__(what, **where)  # type: ignore[arg-type]
        self.record = dict(record or {})


class RemapLost(RulecheckError, AssertionError):
    """A claim on a feature that the retrained SAE it was remapped to has no confident
    partner for (or that names such an input feature and gives no tokens)."""


class Regenerated(RulecheckError, AssertionError):
    """A claim that ``--rulecheck-extract`` rewrote: it fails once, so the change is
    reviewed before it is trusted."""


class GateFailed(RulecheckError, AssertionError):
    """A head whose rulebook, taken as a whole, does not survive the retrained SAEs: which
    statistic of the gate is past which threshold, by how much, and what to look at."""
