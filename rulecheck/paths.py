"""Where rulecheck keeps files it builds or converts: one cache directory for all of them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RULECHECK_CACHE`` or ``~/.cache/rulecheck``: the one cache of Python, the command line
    and pytest alike (built zoo entries, converted tokenizers, exemplars)."""
    return Path(os.environ.get("RULECHECK_CACHE", Path.home() / ".cache" / "rulecheck"))


def exemplar_cache() -> Path:
    """The exemplar cache's default, ``cache_dir() / "exemplars"``: a ``Workbench``,
    ``rulecheck report`` and the pytest plugin share it unless ``cache_dir``, ``--cache`` or
    ``--rulecheck-cache`` name another (its entries are keyed by the fingerprints of what they
    were measured on, so every project may share it)."""
    return cache_dir() / "exemplars"
