"""What one pytest session of rulecheck keeps (pytest's stash), and how it names things."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest

from rulecheck.errors import RulecheckError, printable
from rulecheck.plugin.settings import cache_dir, setting

STASH_BENCH = pytest.StashKey[Any]()
STASH_CHECK = pytest.StashKey[Any]()
STASH_CHANGED = pytest.StashKey["dict[str, Any]"]()
STASH_BOOKS = pytest.StashKey["list[tuple[Any, str]]"]()  # collected books, for the workbench
STASH_SELECTED = pytest.StashKey["dict[str, set[int]]"]()  # features whose items run, by file
STASH_INTERRUPTS = pytest.StashKey[contextlib.ExitStack]()  # SIGINT noted for the session


def workbench(config: pytest.Config):
    """The session's Workbench (created on first use, in each xdist worker)."""
    if STASH_BENCH not in config.stash:
        from rulecheck.session import Workbench
        from rulecheck.specs import Specs

        overrides = Specs(
            model=setting(config, "model"),  # type: ignore[arg-type]
            sae_in=setting(config, "sae-in"),
            sae_out=setting(config, "sae-out"),
            corpus=setting(config, "corpus"),
        )
        bench = Workbench(
            overrides=overrides,
            device=setting(config, "device", "auto"),
            cache_dir=cache_dir(config),
        )
        selected = config.stash.get(STASH_SELECTED, None)
        for book, file in config.stash.get(STASH_BOOKS, []):
            # a layer's heads then share one corpus pass, a book's features one prefix pass
            bench.announce(book, file, None if selected is None else selected.get(file, ()))
        config.stash[STASH_BENCH] = bench
    return config.stash[STASH_BENCH]


def relative(config: pytest.Config, error: RulecheckError) -> str:
    """``error``'s line, naming its file relative to where pytest was started."""
    if error.file is None or not os.path.isabs(error.file):
        return str(error)
    rel = os.path.relpath(error.file, config.invocation_params.dir)
    return str(error).replace(error.file, rel, 1)


def head_name(book) -> str:
    """How the run's tables name a book's head: ``rulecheck-tiny L0H3``."""
    head = f"L{book.layer}H{book.head}"
    return f"{printable(book.model)} {head}" if book.model else head
