"""A gate's measurements kept in the disk cache beside the exemplars (``Workbench.cache_dir``):
each feature of a book before and after a retrain (``core.verdict.FeatureChange``), keyed by
everything they depend on (the book's text, the fingerprints of the checkpoint it records and of
the one the run loads, the feature maps, the matching and exemplar settings, the batch size,
the device and rulecheck's version). The pytest workers of one gate run, and a run again with
other thresholds, then measure a book once: the first holds the entry's lock while it measures,
the others wait and read. The verdict itself (``judge``) is not kept: thresholds apply anew.
An entry that cannot be read or written is a warning, never a failure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rulecheck import __version__
from rulecheck.atomic import atomic_write
from rulecheck.core.verdict import FeatureChange
from rulecheck.exemplar_store import cache_lock, cache_warning
from rulecheck.files import MiB, read_limited

if TYPE_CHECKING:
    from rulecheck.book import Rulebook
    from rulecheck.config import MatchConfig
    from rulecheck.gate import Gated
    from rulecheck.remap import FeatureMap
    from rulecheck.session import Workbench

Measured = tuple[list[FeatureChange], tuple[int, int] | None]
ENTRY_LIMIT = 16 * MiB  # far above any book's entry (a few hundred bytes a feature)


def gate_key(bench: Workbench, gate: Gated, book: Rulebook, cfg: MatchConfig) -> str:
    """What a book's gate measurements depend on, as JSON (kept inside the entry too, so that
    one copied under another name is told apart)."""
    from rulecheck.rulebook import dump_rulebook

    parts = {
        "book": hashlib.sha256(dump_rulebook(book).encode()).hexdigest(),
        "old": bench.fingerprints(gate.old),
        "new": bench.fingerprints(gate.new),
        "maps": {part: _map_parts(m) for part, m in sorted(gate.maps.items())},
        "match": asdict(cfg),
        "exemplars": asdict(bench.exemplar_cfg),
        "batch_size": bench.batch_size,
        "device": str(bench.loaded.device),
        "rulecheck": __version__,
    }
    return json.dumps(parts, sort_keys=True)


def _map_parts(fmap: FeatureMap | None) -> dict[str, list] | None:
    if fmap is None:
        return None
    best = [[old, new, repr(score)] for old, (new, score) in sorted(fmap.best.items())]
    return {
        "new_of": sorted(fmap.new_of.items()),
        "best": best,
        "merged_into": sorted(fmap.merged_into.items()),
    }


def stored(
    cache_dir: Path | None, key: str, features: list[int], compute: Callable[[], Measured]
) -> Measured:
    """``compute()`` (the measurements of the book's ``features``, in order), once for ``key``
    among the processes sharing ``cache_dir``; without a cache, computed."""
    if cache_dir is None:
        return compute()
    name = f"gate-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    path = cache_dir / f"{name}.json"
    with cache_lock(cache_dir, name):
        found = _read(path, key, features)
        if found is not None:
            return found
        changes, inputs = compute()
        entry = {"key": key, "changes": [asdict(c) for c in changes], "inputs": inputs}
        try:
            atomic_write(path, json.dumps(entry, sort_keys=True).encode())
        except OSError as exc:
            why = exc.strerror or exc
            cache_warning(f"{path}: gate cache entry not written ({why}); going on uncached")
        return changes, inputs


def _read(path: Path, key: str, features: list[int]) -> Measured | None:
    """The measurements in the entry at ``path`` if it holds ``key`` and is whole; an entry
    that is not is a warning, and is removed."""
    if not path.exists():
        return None
    try:
        entry = json.loads(read_limited(path, ENTRY_LIMIT, noun="gate cache entry"))
        if not isinstance(entry, dict) or entry.get("key") != key:
            raise ValueError("its key is another book's or setting's")
        return _measured(entry, features)
    except Exception as exc:  # any unreadable entry: a cache is never worth a failure
        why = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        cache_warning(f"{path}: unreadable gate cache entry ({why}), measured again")
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None


OPTIONAL_FLOATS = ("before", "after", "fresh")


def _measured(entry: dict[str, Any], features: list[int]) -> Measured:
    """The entry's measurements, checked field by field (``ValueError`` otherwise)."""
    rows, inputs = entry.get("changes"), entry.get("inputs")
    names = {f.name for f in fields(FeatureChange)}
    if (
        not isinstance(rows, list)
        or [r.get("old") if isinstance(r, dict) else None for r in rows] != features
    ):
        raise ValueError("not this book's features")
    changes = []
    for row in rows:
        if set(row) != names or type(row["reidentified"]) is not bool:
            raise ValueError("malformed")
        if not (row["new"] is None or type(row["new"]) is int):
            raise ValueError("malformed")
        for name in OPTIONAL_FLOATS:
            value = row[name]
            if not (value is None or (type(value) in (int, float) and not math.isinf(value))):
                raise ValueError("malformed")
        changes.append(FeatureChange(**row))
    if inputs is not None:
        if not (
            isinstance(inputs, list) and len(inputs) == 2 and all(type(i) is int for i in inputs)
        ):
            raise ValueError("malformed")
        inputs = (inputs[0], inputs[1])
    return changes, inputs
