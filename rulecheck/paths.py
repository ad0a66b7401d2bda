"""Where rulecheck keeps files it builds or converts: one cache directory for all of them,
``$RULECHECK_CACHE`` (set but empty counts as unset, as XDG's variables do) or
``~/.cache/rulecheck``, never the working directory."""

from __future__ import annotations

import os
from pathlib import Path

from rulecheck.errors import InvalidSpec

CACHE_VARIABLE = "RULECHECK_CACHE"


def cache_dir() -> Path:
    """The cache directory, checked (``check_cache_dir``): built zoo entries, converted
    tokenizers."""
    path, field = _configured_cache()
    return check_writable_dir(path, field, _cache_fix(field))


def check_cache_dir() -> None:
    """``InvalidSpec`` naming ``RULECHECK_CACHE`` now, before any work, when it is set to a
    place that cannot hold the cache (the default is checked where it is first used)."""
    if os.environ.get(CACHE_VARIABLE):
        cache_dir()


def _configured_cache() -> tuple[Path, str]:
    """The cache's path and what set it (the variable, or the default's ``HOME``)."""
    value = os.environ.get(CACHE_VARIABLE, "")
    if value:
        return Path(value).expanduser(), CACHE_VARIABLE
    return Path.home() / ".cache" / "rulecheck", f"{CACHE_VARIABLE} (unset: the default)"


def _cache_fix(field: str) -> str:
    if field == CACHE_VARIABLE:
        return f"set {CACHE_VARIABLE} to a directory you can write to, or unset it"
    return f"set {CACHE_VARIABLE} to a directory you can write to"


def check_writable_dir(path: Path, field: str, fix: str) -> Path:
    """``path`` if it is, or could be made, a directory this process can write to; else
    ``InvalidSpec`` naming ``field``. Nothing is created: the nearest existing ancestor must
    be a writable directory (root passes any permission check; a file on the way fails)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidSpec("exists and is not a directory", file=path, field=field, fix=fix)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise InvalidSpec(
            f"cannot be a directory: {existing} is a file", file=path, field=field, fix=fix
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} is not writable)"
        raise InvalidSpec(f"cannot write here{where}", file=path, field=field, fix=fix)
    return path


def exemplar_cache() -> Path:
    """The exemplar cache's default, ``cache_dir() / "exemplars"``: a ``Workbench``,
    ``rulecheck report`` and the pytest plugin share it unless ``cache_dir``, ``--cache`` or
    ``--rulecheck-cache`` name another (its entries are keyed by the fingerprints of what they
    were measured on, so every project may share it)."""
    return cache_dir() / "exemplars"
