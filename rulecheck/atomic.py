"""Writing files and directories atomically: readers see the old version or the new one,
never a partial write, and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rulecheck.errors import InvalidSpec
from rulecheck.files import check_replaceable

_TOKEN_BYTES = 6


def _temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed: ``.{name}.{12 hex digits}.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path.

    The bytes go to ``.{name}.{random}.tmp`` in the same directory, are synced to disk and
    renamed over ``path`` (keeping the mode of the file they replace), then the directory is
    synced. On any failure the temporary file is removed and ``path`` is left as it was.
    """
    return atomic_write_many([(Path(path), data)])[0]


def atomic_write_many(files: list[tuple[Path, bytes]]) -> list[Path]:
    """Write every ``(path, data)`` as one set: all temporary files are written and synced
    first, then renamed in one go, so a failure while writing leaves every old file as it
    was (a kill between the renames, a window of microseconds, leaves some new and some old;
    each file is still whole). Only a regular file or nothing is replaced: a FIFO, a device
    or a directory at a path (or a symlink to one) is ``InvalidSpec`` before anything is
    written."""
    for path, _ in files:
        check_replaceable(path)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o7777)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    for directory in {path.parent for _, path in staged}:
        _fsync_directory(directory)
    return [path for _, path in staged]


STALE_SECONDS = 600  # a temporary file this old is an interrupted write's, not a live one's


def remove_stale_temporaries(directory: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the temporary files an interrupted write left in ``directory``: those not
    touched for ``older_than`` seconds, so that runs writing into one directory at once
    (``--shard``) never remove each other's files in flight."""
    removed = []
    now = time.time()
    for tmp in directory.glob(".*.tmp"):
        if tmp.is_file() and len(tmp.name.rsplit(".", 2)[-2]) == 2 * _TOKEN_BYTES:
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime >= older_than:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


@contextlib.contextmanager
def output_directory(path: Path, option: str) -> Iterator[Path]:
    """``path`` as a directory files can be written to, checked before any work starts
    (``InvalidSpec`` naming ``option`` otherwise); stale temporary files of an interrupted
    run are removed. A directory this creates is removed again if the work fails and leaves
    it empty."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidSpec(
            "exists and is not a directory", file=path, field=option, fix="name a directory"
        )
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _temporary(path / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise InvalidSpec(
            f"cannot write here: {exc.strerror or exc}",
            file=path,
            field=option,
            fix="choose a directory you can write to",
        ) from None
    remove_stale_temporaries(path)
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (innermost first) as long as they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh directory next to ``target``; on success it becomes ``target``.

    With ``replace=False`` a ``target`` that appeared meanwhile (another process filling the
    same cache entry) is kept and the fresh directory is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists() and not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return
        previous = None
        if target.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            previous.rmdir()
            target.rename(previous)
        try:
            staging.rename(target)
        except OSError:
            if previous is not None:
                previous.rename(target)
            if replace or not target.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
