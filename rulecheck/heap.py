"""The cyclic garbage collector and the half a million objects that torch, TransformerLens and
sae_lens bring, which live as long as the process.

Importing them allocates those objects and the collector walks them a thousand times meanwhile
(a fifth of the import: 1.2 s of 6); ``import_model_libraries`` imports them with the collector
paused, and a process that keeps them until it exits (a command, a test session) moves them out
of the collector's reach (``gc.freeze``), so that each later full pass walks only what was made
since. And the collector's last pass over them as the interpreter exits takes a second or more
(1.3 s after the shipped models' SAE tests) to free memory the exit frees anyway:
``skip_final_collection`` freezes every object at exit instead, once the command or session has
ended. ``atexit`` handlers and ``weakref.finalize`` callbacks still run and the standard streams
are still flushed; only objects caught in reference cycles are no longer finalized (rulecheck
closes every file it writes before it returns)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import sys
from collections.abc import Iterator

MODEL_LIBRARIES = ("torch", "transformer_lens", "sae_lens")
_registered = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off while the block runs (as it was, after): for work that makes
    many objects and no garbage cycles (an import, reading a rulebook)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def import_model_libraries(kept: bool = False) -> None:
    """Import torch, TransformerLens and sae_lens with the collector paused (nothing when they
    are imported already). ``kept``: the process keeps them, and whatever else is alive now,
    until it exits, so every object alive is frozen out of the collector's reach (objects made
    later are collected as before)."""
    missing = [name for name in MODEL_LIBRARIES if name not in sys.modules]
    if missing:
        with collector_paused():
            for name in missing:
                importlib.import_module(name)
    if kept:
        gc.freeze()


def skip_final_collection() -> None:
    """Freeze the heap at exit, once per process (later calls do nothing)."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
