"""What a run said about each rulebook item: its outcome, its record and its failure message,
matched to the books and features a report shows.

A pytest run gives them through the plugin (``--rulecheck-html``); a saved run through the
JSON of ``--rulecheck-report`` (``rulecheck report --run``), which has no failure messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rulecheck.errors import InvalidSpec
from rulecheck.files import read_limited

MAX_RUN_BYTES = 256 * 2**20  # a run's records with their messages: about 1 KiB an item

NODE = re.compile(
    r"^(?P<file>.+?\.ya?ml)::(?P<kind>feature|lost)\[(?P<id>\d+)\](?:::(?P<item>.+))?$"
)
FAILED = ("failed", "error")


@dataclass(frozen=True)
class Outcome:
    """One item of a run: ``outcome`` is passed, failed, skipped or xfailed."""

    nodeid: str
    outcome: str
    record: dict[str, Any] = field(default_factory=dict)
    message: str | None = None

    @property
    def file(self) -> str:
        match = NODE.match(self.nodeid)
        return match["file"] if match else self.nodeid.split("::", 1)[0]

    @property
    def feature(self) -> int | None:
        match = NODE.match(self.nodeid)
        return int(match["id"]) if match else None

    @property
    def item(self) -> str:
        """The item's name in its feature: ``f1``, ``absence[unless]``, or ``lost``."""
        match = NODE.match(self.nodeid)
        if match is None:
            return self.nodeid.rsplit("::", 1)[-1]
        return match["item"] or match["kind"]

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED


def feature_status(outcomes: list[Outcome]) -> str:
    """A feature's verdict from its items: failed when one failed, else xfailed, skipped,
    passed, or ``not run`` when the run had none of them."""
    if not outcomes:
        return "not run"
    got = {o.outcome for o in outcomes}
    for status in ("failed", "error", "xfailed", "skipped"):
        if status in got:
            return "failed" if status == "error" else status
    return "passed"


def same_file(book: Path, nodeid_file: str, root: Path | None = None) -> bool:
    """Whether an item's file (as its node id names it, relative to the run's root) is the
    book at ``book``."""
    base = root if root is not None else Path.cwd()
    resolved = book.resolve()
    if (base / nodeid_file).resolve() == resolved:
        return True
    return resolved.as_posix().endswith("/" + nodeid_file.lstrip("./"))


def by_book(
    outcomes: list[Outcome], books: list[Path], root: Path | None = None
) -> dict[Path, list[Outcome]]:
    """The outcomes of each book's items, in run order."""
    out: dict[Path, list[Outcome]] = {book: [] for book in books}
    files: dict[str, Path | None] = {}
    for o in outcomes:
        if o.file not in files:
            files[o.file] = next((b for b in books if same_file(b, o.file, root)), None)
        book = files[o.file]
        if book is not None:
            out[book].append(o)
    return out


def read_run(path: Path) -> list[Outcome]:
    """The items of a run saved with ``--rulecheck-report``; ``InvalidSpec`` naming the file
    when it cannot be read."""
    fix = "pass the JSON that pytest --rulecheck-report PATH wrote"
    raw = read_limited(path, MAX_RUN_BYTES, noun="run report", field="--run", missing=fix)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise InvalidSpec(f"cannot read it: {exc}", file=path, field="--run", fix=fix) from None
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and isinstance(r.get("nodeid"), str) for r in data
    ):
        raise InvalidSpec(
            "is not a run report (a list of records with a nodeid)",
            file=path,
            field="--run",
            fix=fix,
        )
    return [
        Outcome(
            nodeid=r["nodeid"],
            outcome=str(r.get("outcome", "passed")),
            record={k: v for k, v in r.items() if k not in ("nodeid", "outcome")},
        )
        for r in data
    ]
