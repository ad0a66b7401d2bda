"""What a user's path really is, checked before it is read or written.

Every user file (rulebooks, their measurements, mapping files, run reports, JSON settings) is
read by ``read_limited``: only a regular file, symlinks resolved, and at most its limit plus
one byte, whatever its size claims to be (a device reports size 0, a FIFO blocks a plain
read). Every output is checked by ``check_output_file`` before any work starts: a regular
file or nothing is replaced (``rulecheck.atomic`` checks again as it writes).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rulecheck.errors import InvalidSpec, RulecheckError

MiB = 2**20
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(path: str | Path) -> str | None:
    """What is at ``path`` when it is not a regular file (``"a FIFO"``, ``"a symlink to a
    character device"``); None for a regular file or nothing (a dangling symlink)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"a symlink to {kind}" if os.path.islink(path) else kind


def too_large(
    size: int, limit: int, noun: str, file: str | Path, error: type[RulecheckError], fix: str
) -> RulecheckError:
    """The error for a ``noun`` file of ``size`` bytes, over the ``limit`` rulecheck reads."""
    return error(
        f"{noun} is {size / MiB:.1f} MiB; rulecheck reads {noun}s up to {limit // MiB} MiB",
        file=file,
        line=1,
        fix=fix,
    )


def read_limited(
    path: str | Path,
    limit: int,
    *,
    noun: str,
    error: type[RulecheckError] = InvalidSpec,
    field: str | None = None,
    missing: str = "check the path",
    large: str = "",
) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed), at most ``limit`` of
    them; ``error`` naming the file (and ``field``) for anything else: no such file (fix
    ``missing``), a directory, a FIFO or device, unreadable, or larger than ``limit`` (fix
    ``large``). A FIFO is refused without blocking (checked first, opened non-blocking)."""
    fd = _open_regular(Path(path), error, field, missing)
    try:
        size = os.fstat(fd).st_size
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(limit + 1 - total, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=path, field=field) from None
    finally:
        os.close(fd)
    if total > limit:
        fix = large or f"split it, or keep {noun}s under {limit // MiB} MiB"
        raise too_large(max(size, total), limit, noun, path, error, fix)
    return b"".join(chunks)


def _open_regular(path: Path, error: type[RulecheckError], field: str | None, missing: str) -> int:
    """A descriptor of the regular file at ``path``, opened for reading without blocking."""
    try:
        kind = file_kind(path)
        if kind is None and not os.path.lexists(path):
            raise FileNotFoundError
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)  # replaced between the checks
            kind = file_kind(path) or "not a regular file"
    except FileNotFoundError:
        raise error("no such file", file=path, field=field, fix=missing) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=path, field=field) from None
    raise error(
        f"is {kind}, not a regular file",
        file=path,
        field=field,
        fix="pass the path of a regular file",
    )


def check_replaceable(path: str | Path, option: str | None = None) -> None:
    """``path`` may be replaced by a new file: it is a regular file (or a symlink to one) or
    nothing; ``InvalidSpec`` naming ``option`` otherwise (a FIFO, a device, a directory,
    a symlink to one of them is never replaced by a regular file)."""
    try:
        kind = file_kind(path)
    except OSError as exc:
        raise InvalidSpec(
            f"cannot look at it: {exc.strerror or exc}", file=path, field=option
        ) from None
    if kind is not None:
        raise InvalidSpec(
            f"is {kind}; rulecheck only replaces a regular file",
            file=path,
            field=option,
            fix="name a new file or a regular file, or remove what is there",
        )


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` as a file that can be written atomically, checked before any work starts:
    nothing or a regular file there, in an existing directory this process can create files
    in; ``InvalidSpec`` naming ``option`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InvalidSpec("is a directory", file=path, field=option, fix="name a file")
    check_replaceable(path, option)
    parent = path.parent
    if not parent.is_dir():
        raise InvalidSpec(
            "no such directory",
            file=parent.resolve(),
            field=option,
            fix="create the directory or choose another path",
        )
    probe = parent / f".{path.name}.write-test"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        pass  # another run's probe: the directory takes new files
    except OSError as exc:
        raise InvalidSpec(
            f"cannot write here: {exc.strerror or exc}",
            file=parent.resolve(),
            field=option,
            fix="choose a directory you can write to",
        ) from None
    return path
