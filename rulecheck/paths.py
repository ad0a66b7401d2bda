"""Where rulecheck keeps files it builds or converts: one cache directory for all of them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RULECHECK_CACHE`` or ``~/.cache/rulecheck``: built zoo entries, converted tokenizers."""
    return Path(os.environ.get("RULECHECK_CACHE", Path.home() / ".cache" / "rulecheck"))
