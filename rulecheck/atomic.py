"""Writing files and directories atomically: readers see the old version or the new one,
never a partial write, and a failed write leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: journals are recovered once stale
    fcntl = None  # type: ignore[assignment]

from rulecheck.errors import InvalidSpec, WriteFailed
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
    first (a failure then leaves every old file as it was: ``WriteFailed`` naming the file),
    then a journal of the renames is written, the set's commit, and the renames follow. A
    process killed between the renames leaves the journal, and the next write into that
    directory (``recover``) completes the set. SIGINT in that window waits for the renames
    and then raises ``Interrupted``, which says what was written; after an interrupt that
    something swallowed (``noting_interrupts``), nothing is written. Only a regular file or
    nothing is replaced: a FIFO, a device or a directory at a path (or a symlink to one) is
    ``InvalidSpec`` before anything is written."""
    _stop_if_interrupted()
    for path, _ in files:
        check_replaceable(path)
    if not files:
        return []
    for directory in {path.parent for path, _ in files}:
        recover(directory)
    staged = _stage(files)
    with _deferring_interrupts(staged):
        _commit(staged)
    return [path for _, path in staged]


def _stage(files: list[tuple[Path, bytes]]) -> list[tuple[Path, Path]]:
    """Each file's bytes in its synced temporary file: ``(temporary, path)`` pairs; on any
    failure none is left."""
    staged: list[tuple[Path, Path]] = []
    path = None
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(path)
            staged.append((tmp, path))
            _write_synced(tmp, data)
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o7777)
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed) and path is not None:
            raise WriteFailed(exc, file=path) from None
        raise
    return staged


def _write_synced(path: Path, data: bytes) -> None:
    """``data`` in a new file at ``path``, synced to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


JOURNAL_PREFIX = ".rulecheck-journal."


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename the temporary files over their paths; more than one under a journal, locked
    while its writer lives, removed once every rename is done. A failure before the
    journal is in place removes the temporary files: every old file is left as it was."""
    journal = staged[0][1].parent / f"{JOURNAL_PREFIX}{secrets.token_hex(_TOKEN_BYTES)}.json"
    tmp = _temporary(journal)
    committed = False
    try:
        if len(staged) == 1:  # one rename is atomic by itself
            _finish(staged)
            return
        _write_synced(
            tmp, json.dumps([[str(t.absolute()), str(p.absolute())] for t, p in staged]).encode()
        )
        with tmp.open("rb") as held:
            _lock(held, blocking=True)  # the lock follows the file through its rename
            os.replace(tmp, journal)
            committed = True
            _fsync_directory(journal.parent)
            _finish(staged)
            journal.unlink()
    except BaseException as exc:
        if not committed:
            for path in (tmp, *(t for t, _ in staged)):
                path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            where = exc.filename or journal if committed else staged[0][1]
            raise WriteFailed(exc, file=where) from None
        raise


def _finish(staged: list[tuple[Path, Path]]) -> None:
    """The renames of a committed set, then the directories synced; a temporary file already
    gone was renamed by ``recover``."""
    for tmp, path in staged:
        with contextlib.suppress(FileNotFoundError):
            os.replace(tmp, path)
    for directory in {path.parent for _, path in staged}:
        _fsync_directory(directory)


def recover(directory: Path) -> list[Path]:
    """Complete the sets whose writer was killed between their renames in ``directory``
    (their journal is there and nobody holds its lock); return the files renamed."""
    done: list[Path] = []
    for journal in sorted(Path(directory).glob(f"{JOURNAL_PREFIX}*.json")):
        with contextlib.suppress(OSError, ValueError), journal.open("rb") as handle:
            if not _lock(handle, blocking=False) or not journal.exists():
                continue  # its writer is alive, or finished meanwhile
            pairs = [(Path(tmp), Path(path)) for tmp, path in json.loads(handle.read())]
            done += [path for tmp, path in pairs if tmp.exists()]
            _finish(pairs)
            journal.unlink()
    return done


def _lock(handle: BinaryIO, *, blocking: bool) -> bool:
    """An exclusive lock on an open journal (released when its holder dies); without
    ``fcntl`` (Windows) a journal counts as its dead writer's once it is stale."""
    if fcntl is None:
        return blocking or time.time() - os.fstat(handle.fileno()).st_mtime >= STALE_SECONDS
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


# ---------------------------------------------------------------------------- interrupts


class Interrupted(KeyboardInterrupt):
    """SIGINT while a set was being renamed: the set was completed first; ``written`` lists
    its files."""

    def __init__(self, written: list[Path]) -> None:
        super().__init__(f"interrupted after writing {len(written)} files")
        self.written = written


_noted = {"interrupts": 0, "watching": False, "committing": False, "pending": False}


@contextlib.contextmanager
def noting_interrupts() -> Iterator[None]:
    """While the block runs, SIGINT is noted before it raises ``KeyboardInterrupt`` as
    before: an interrupt that library code below swallows (a cleanup hook catching
    everything) still stops every later write of ``atomic_write_many``."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # signals reach the main thread only; an ignored SIGINT stays ignored
        return
    saved = dict(_noted)

    def note(signum: int, frame: Any) -> None:
        _noted["interrupts"] += 1
        if _noted["committing"]:
            _noted["pending"] = True  # raised once the set's renames are done
            return
        previous(signum, frame)

    _noted.update(interrupts=0, watching=True, committing=False, pending=False)
    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _noted.update(saved)


def interrupted() -> bool:
    """Whether SIGINT came since the innermost ``noting_interrupts`` began."""
    return _noted["interrupts"] > 0


def _stop_if_interrupted() -> None:
    if interrupted():
        raise KeyboardInterrupt("interrupted earlier; nothing written since")


@contextlib.contextmanager
def _deferring_interrupts(staged: list[tuple[Path, Path]]) -> Iterator[None]:
    """Under ``noting_interrupts``, SIGINT during the renames waits for them: ``Interrupted``
    after, naming what was written."""
    if not _noted["watching"]:
        yield
        return
    _noted.update(committing=True, pending=False)
    try:
        yield
    finally:
        _noted["committing"] = False
    if _noted["pending"]:
        _noted["pending"] = False
        raise Interrupted([path for _, path in staged])


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
    recover(path)  # before the stale temporaries go: a killed run's set is completed
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
