"""A process that loaded torch, TransformerLens and sae_lens holds half a million objects, and
the cyclic collector's last pass over them as the interpreter exits takes a second or more
(1.3 s after the shipped models' SAE tests) to free memory the exit frees anyway.
``skip_final_collection`` freezes every object at exit instead (``gc.freeze``): the command or
test session has ended; streams are flushed and files closed as before, and the exit handlers
of ``atexit`` and ``weakref.finalize`` still run."""

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
