"""A process that loaded torch, TransformerLens and sae_lens holds half a million objects, and
the cyclic collector's last pass over them as the interpreter exits takes a second or more
(1.3 s after the shipped models' SAE tests) to free memory the exit frees anyway.
``skip_final_collection`` freezes every object at exit instead (``gc.freeze``), once the command
or session has ended: ``atexit`` handlers and ``weakref.finalize`` callbacks still run and the
standard streams are still flushed; only objects caught in reference cycles are no longer
finalized (rulecheck closes every file it writes before it returns)."""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_final_collection() -> None:
    """Freeze the heap at exit, once per process (later calls do nothing)."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
