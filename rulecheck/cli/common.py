"""What the commands share: printing a line that names paths, and the paths and mapping
files they are given, checked before any work."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from rulecheck.errors import InvalidSpec, printable
from rulecheck.files import file_kind


def say(console: Console, line: str) -> None:
    """Print a line naming user paths: as it is (``errors.printable``), never as markup."""
    console.print(Text(printable(line)), soft_wrap=True)


def check_mappings(source: str) -> None:
    """``--mapping``: ``auto``, or mapping files read and checked now, before any work (even
    where no SAE changed, so that a bad file is never passed over)."""
    from rulecheck.mapping import AUTO, read_mappings

    if source != AUTO:
        read_mappings(source, "--mapping")


def must_exist(paths: list[Path]) -> None:
    """Each path is a regular file or a directory (symlinks followed)."""
    for path in paths:
        if not path.exists():
            raise InvalidSpec("no such file or directory", file=path, fix="check the path")
        kind = None if path.is_dir() else file_kind(path)
        if kind is not None:
            raise InvalidSpec(
                f"is {kind}, not a regular file or a directory", file=path, fix="check the path"
            )


def rulebook_paths(given: list[Path]) -> list[Path]:
    """The rulebooks among ``given`` files and directories; an error when there are none."""
    from rulecheck.rulebook import rulebook_files

    must_exist(given)
    paths = list(rulebook_files(given))
    if not paths:
        raise InvalidSpec(
            "holds no rulebook (a YAML file with a top-level `rulecheck:` key)",
            file=" ".join(map(str, given)),
            fix="pass rulebook files or the directories holding them",
        )
    return paths
