"""``--rulecheck-extract``: rewrite rulebooks from the checkpoint, keeping manual entries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from rulecheck.api import config_from_rulebook, extract_books
from rulecheck.rulebook import is_rulebook_file, load_rulebook, write_rulebook
from rulecheck.session import Workbench


def rulebook_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Rulebook files named by pytest arguments (files, directories, ``file::node`` ids)."""
    for arg in paths:
        path = Path(str(arg).split("::", 1)[0])
        candidates = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
        for p in candidates:
            if p.suffix in (".yaml", ".yml") and p.is_file() and is_rulebook_file(p):
                yield p


def regenerate(path: Path, bench: Workbench) -> Path:
    """Extract the rulebook's head again with the settings it records (overrides applied) and
    write it in place; manual entries survive."""
    book = load_rulebook(path)
    head = bench.head_of(book, str(path))
    [fresh] = extract_books(
        head.specs, book.layer, [book.head], config_from_rulebook(book), str(bench.device)
    )
    return write_rulebook(fresh, path)
