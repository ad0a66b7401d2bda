"""Rulebook files: YAML in and out.

One file per head, ``L{layer}H{head}.yaml``. Reading makes plain values of the text,
recording the line of every field (``rulecheck.yamlread``: safely, no tags, no merge keys,
aliases bounded), and hands them to the schema (``rulecheck.book``), so every problem is an
``InvalidRulebook`` naming the file, line and field.

Writing goes over the file already there (``rulecheck.roundtrip``): its comments, key order
and manual features survive, unchanged values keep their lines, so a regenerated book's diff
shows what changed and nothing else; equal inputs give byte-identical files, written
atomically. Measurements (quality curves, scores) go beside the book, in
``L{layer}H{head}.measured.json``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from rulecheck.atomic import atomic_write_many
from rulecheck.book import (
    FILE_NAME,
    MEASURED_ORDER,
    SCHEMA_VERSION,
    FormatWarning,
    Rulebook,
    book_dict,
    measured_dict,
    merge_manual,
    parse_book,
)
from rulecheck.errors import InvalidRulebook, RulecheckError
from rulecheck.files import read_limited, too_large
from rulecheck.heap import collector_paused
from rulecheck.kinds import kinds
from rulecheck.roundtrip import render
from rulecheck.schema import Where
from rulecheck.schema import keys as schema_keys
from rulecheck.schemas import modeline
from rulecheck.yamlread import first_line, read_values

# Reading costs about 1 s and 80 MiB of memory a MiB of YAML when the node tree is composed
# (a file the parser events do not read; linear in the size, `make bench`): 8 MiB, eight times
# the largest book extraction writes, takes seconds. Larger books are refused, not read for
# minutes.
MAX_BYTES = 8 * 2**20


def _check_file_name(where: Where, rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match is None:
        return
    layer, head = int(match[1]), int(match[2])
    if (layer, head) != (rulebook.layer, rulebook.head):
        where.fail(
            "layer" if layer != rulebook.layer else "head",
            f"file name says L{layer}H{head} but the file has layer {rulebook.layer}, "
            f"head {rulebook.head}",
            f"rename the file to {rulebook.name}{path.suffix} or correct layer/head",
        )


def _read_book_text(path: Path) -> str:
    """The text of the rulebook file at ``path``: a regular file of at most ``MAX_BYTES``
    (``files.read_limited``), refused at once otherwise."""
    data = read_limited(
        path,
        MAX_BYTES,
        noun="rulebook",
        error=InvalidRulebook,
        missing="check the path, or run `rulecheck extract`",
        large=_SIZE_FIX,
    )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidRulebook(
            "not UTF-8 text", file=path, line=line, fix="save the file as UTF-8"
        ) from None


_SIZE_FIX = (
    "split its features over several rulebook files of the same head, or extract fewer terms "
    "(--max-terms)"
)


def _check_size(size: int, file: str | Path) -> None:
    if size > MAX_BYTES:
        raise too_large(size, MAX_BYTES, "rulebook", file, InvalidRulebook, _SIZE_FIX)


def parse_rulebook(text: str, file: str | Path = "<string>") -> Rulebook:
    """Validate the YAML ``text`` of a rulebook; ``file`` only names it in errors."""
    _check_size(
        len(text.encode("utf-8", errors="replace")) if len(text) * 4 > MAX_BYTES else 0, file
    )
    where = Where(file=str(file))
    # reading allocates some 10^5 objects a book and no cycles, and the collector's passes
    # over them took a fifth of the time
    with collector_paused():
        rulebook = parse_book(where, read_values(text, where, str(file)))
    _check_file_name(where, rulebook, Path(str(file)))
    return rulebook


def load_rulebook(path: str | Path, *, measurements: bool = False) -> Rulebook:
    """Read and validate the rulebook at ``path``; every problem is an ``InvalidRulebook``.
    With ``measurements``, what extraction measured (the file beside it) is filled in."""
    path = Path(path)
    book = parse_rulebook(_read_book_text(path), path)
    if measurements:
        _fill_measurements(book, load_measured(path, (book.layer, book.head)))
    return book


def _fill_measurements(book: Rulebook, measured: dict[int, dict[str, Any]]) -> None:
    for rules in book.features:
        data = measured.get(rules.feature)
        if not data or rules.measured:
            continue
        rules.measured = {k: v for k, v in data.items() if k != "feature" and k not in rules.claims}
        if "f1_by_terms" in rules.measured:
            rules.measured["f1_by_terms"] = _curve(rules.measured["f1_by_terms"])
        if isinstance(rules.measured.get("f1_by_ranking"), dict):
            rules.measured["f1_by_ranking"] = {
                m: _curve(c) for m, c in rules.measured["f1_by_ranking"].items()
            }
        for key, claims in rules.claims.items():
            values = data.get(key, [])
            if len(values) != len(claims):
                continue
            for claim, given in zip(claims, values, strict=True):  # claims this book just read
                fields = _measured_fields(type(claim))
                for name, value in given.items():
                    if name in fields:
                        setattr(claim, name, value)


def _measured_keys(cls: type) -> frozenset[str]:
    return frozenset(schema_keys(cls, measured=True))


# typed as a function of any class: mypy takes no ``type[Any]`` for the cache's Hashable
_measured_fields: Callable[[type], frozenset[str]] = functools.cache(_measured_keys)


def _curve(curve: Mapping[Any, float]) -> dict[int, float]:
    """A curve by term count as JSON writes it (string keys), by integer count."""
    return {int(n): f for n, f in curve.items()}


_TOP_KEY_LINE = re.compile(r"""^(?:rulecheck|"rulecheck"|'rulecheck')[ \t]*:(?:[ \t]|$)""", re.M)


def rulebook_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Rulebook files named by pytest arguments (files, directories, ``file::node`` ids)."""
    for arg in paths:
        path = Path(str(arg).split("::", 1)[0])
        candidates = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
        for p in candidates:
            if p.suffix in (".yaml", ".yml") and p.is_file() and is_rulebook_file(p):
                yield p


def is_rulebook_file(path: str | Path) -> bool:
    """Whether ``path`` is a YAML file with a top-level ``rulecheck:`` key; never raises."""
    try:
        path = Path(path)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            return False
        with path.open("rb") as file:  # a regular file: is_file() follows symlinks
            text = file.read(MAX_BYTES + 1).decode("utf-8-sig", errors="replace")
    except (OSError, ValueError):
        return False
    return _TOP_KEY_LINE.search(text) is not None


# ---------------------------------------------------------------------------- YAML out

MEASURED_SUFFIX = ".measured.json"


def measured_path(path: str | Path) -> Path:
    """Where the measurements of the book at ``path`` are written: ``L0H3.measured.json``."""
    path = Path(path)
    return path.with_name(path.stem + MEASURED_SUFFIX)


def _manual(item: Mapping[str, Any]) -> bool:
    return item.get("source") == "manual"


def dump_rulebook(
    rulebook: Rulebook,
    old_text: str | None = None,
    *,
    path: str | Path | None = None,
    keep_manual: bool = True,
) -> str:
    """The rulebook as YAML text (format 2), written over ``old_text`` (the file's current
    text) so that its comments, key order and (``keep_manual``) manual entries as written
    survive; equal inputs give byte-identical text. ``path`` places the editor's schema line
    (``schemas.modeline``)."""
    header = [modeline(Path(path))] if path is not None else []
    keep = _manual if keep_manual else (lambda item: False)
    return render(book_dict(rulebook), old_text, header=header, keep=keep)


def dump_measured(rulebook: Rulebook) -> str | None:
    """The measurements beside the book as JSON, one feature a line; None when there are
    none (a book written by hand)."""
    data = measured_dict(rulebook)
    if not data["features"]:
        return None
    head = {k: v for k, v in data.items() if k != "features"}
    lines = [json.dumps(f, ensure_ascii=False, allow_nan=True) for f in data["features"]]
    return json.dumps(head)[:-1] + ', "features": [\n' + ",\n".join(lines) + "\n]}\n"


# what extraction writes beside a book is about three times the book (`rulebooks/`)
MAX_MEASURED_BYTES = 4 * MAX_BYTES


def load_measured(
    path: str | Path, head: tuple[int, int] | None = None
) -> dict[int, dict[str, Any]]:
    """The measurements beside the book at ``path``, by feature id (empty when there is no
    such file). ``head`` (layer, head), the book's: a file measured on another head is
    refused. Entries of features the book does not hold (removed by hand) are never used."""
    file = measured_path(path)
    if not os.path.lexists(file):
        return {}
    data = read_limited(
        file,
        MAX_MEASURED_BYTES,
        noun="measurements file",
        error=InvalidRulebook,
        large="regenerate the book",
    )
    try:
        data = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise InvalidRulebook(
            f"cannot read the measurements: {first_line(exc)}",
            file=file,
            fix="regenerate the book, or remove the file",
        ) from None
    return _measured_features(data, file, head)


def _measured_features(
    data: Any, file: Path, head: tuple[int, int] | None
) -> dict[int, dict[str, Any]]:
    """The features of a measurements file's JSON, its shape checked (``InvalidRulebook``
    naming the file and field)."""

    def fail(field: str, what: str) -> NoReturn:
        raise InvalidRulebook(
            what, file=file, field=field, fix="regenerate the book, or remove the file"
        )

    if not isinstance(data, dict):
        fail("", f"expected a JSON object, found {_json_type(data)}")
    if head is not None:
        for name, want in zip(("layer", "head"), head, strict=True):
            if name not in data:
                fail(name, f"names no {name}; the rulebook is about {name} {want}")
            if data[name] != want or isinstance(data[name], bool):
                fail(name, f"is {data[name]!r}, but the rulebook is about {name} {want}")
    features = data.get("features", [])
    if not isinstance(features, list):
        fail("features", f"expected a list, found {_json_type(features)}")
    out: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(features):
        where = f"features[{i}]"
        if not isinstance(entry, dict):
            fail(where, f"expected an object, found {_json_type(entry)}")
        feature = entry.get("feature")
        if "feature" not in entry:
            fail(where, "has no `feature` id")
        if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
            fail(f"{where}.feature", f"expected a feature id (a whole number), found {feature!r}")
        if feature in out:
            fail(f"{where}.feature", f"feature {feature} is listed twice")
        _check_measured_entry(entry, where, fail)
        out[feature] = entry
    return out


_CURVES = ("f1_by_terms",)


def _check_measured_entry(entry: dict[str, Any], where: str, fail: Any) -> None:
    """The values of one feature's measurements that are read as numbers, curves and claim
    records have those shapes."""
    for key, value in entry.items():
        if key in _MEASURED_NUMBERS and not _is_number(value, none=True):
            fail(f"{where}.{key}", f"expected a number, found {value!r}")
        elif key in _CURVES and not _is_curve(value):
            fail(f"{where}.{key}", "expected an object of term counts to numbers")
        elif key == "f1_by_ranking" and not (
            isinstance(value, dict) and all(_is_curve(c) for c in value.values())
        ):
            fail(f"{where}.{key}", "expected an object of curves (term counts to numbers)")
        elif key in _claim_keys() and not (
            isinstance(value, list) and all(isinstance(v, dict) for v in value)
        ):
            fail(f"{where}.{key}", "expected a list of objects, one per claim")


_MEASURED_NUMBERS = tuple(k for k in MEASURED_ORDER if k not in ("f1_by_terms", "f1_by_ranking"))


def _claim_keys() -> tuple[str, ...]:
    return tuple(kind.key for kind in kinds())


def _is_number(value: Any, none: bool = False) -> bool:
    if value is None:
        return none
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_curve(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    return all(str(n).isdigit() and _is_number(f, none=True) for n, f in value.items())


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _check_name_matches(rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match and (int(match[1]), int(match[2])) != (rulebook.layer, rulebook.head):
        raise InvalidRulebook(
            f"rulebook for {rulebook.name} cannot be saved as {path.name}",
            file=path,
            fix=f"save it as {rulebook.name}{path.suffix}",
        )


def rulebook_files_out(
    rulebook: Rulebook, path: str | Path, old_text: str | None = None, *, keep_manual: bool = True
) -> list[tuple[Path, bytes]]:
    """The files that writing ``rulebook`` at ``path`` writes: its measurements when it has
    any, then the book, renamed in that order, so that a writer killed between the two leaves
    the old book (an upgrade done again) or the new one with its measurements."""
    path = Path(path)
    _check_name_matches(rulebook, path)
    text = dump_rulebook(rulebook, old_text, path=path, keep_manual=keep_manual)
    out = [(path, text.encode("utf-8"))]
    measured = dump_measured(rulebook)
    if measured is not None:
        out.insert(0, (measured_path(path), measured.encode("utf-8")))
    return out


def save_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Write ``rulebook`` to ``path`` (and its measurements beside it) atomically, as a
    fresh file; return the path."""
    atomic_write_many(rulebook_files_out(rulebook, path))
    return Path(path)


# ---------------------------------------------------------------------------- regeneration


def regenerated_files(rulebook: Rulebook, path: str | Path) -> list[tuple[Path, bytes]]:
    """The files that write ``rulebook`` over the one at ``path``: its manual features,
    comments and key order kept (``dump_rulebook``). A file there that is not a valid
    rulebook is never overwritten: ``InvalidRulebook``."""
    path = Path(path)
    _check_name_matches(rulebook, path)
    old, old_text = None, None
    if path.exists():
        try:
            old_text = _read_book_text(path)
            old = parse_rulebook(old_text, path)
        except RulecheckError as exc:
            fix = f"{exc.fix}; " if exc.fix else ""
            raise InvalidRulebook(
                exc.what,
                file=exc.file,
                line=exc.line,
                field=exc.field,
                fix=f"{fix}the existing file was left as it is, correct or move it",
            ) from None
    return rulebook_files_out(merge_manual(rulebook, old), path, old_text)


def upgraded_files(path: str | Path) -> tuple[int, list[tuple[Path, bytes]]]:
    """The format version of the book at ``path`` and the files that rewrite it in the
    current format: its comments kept where their keys survive, its measurements moved to
    the file beside it."""
    path = Path(path)
    text = _read_book_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatWarning)
        book = parse_rulebook(text, path)
    old = book.schema != SCHEMA_VERSION
    return book.schema, rulebook_files_out(book, path, text, keep_manual=not old)


def write_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Write ``rulebook`` over the file at ``path`` (``regenerated_files``), atomically."""
    atomic_write_many(regenerated_files(rulebook, path))
    return Path(path)
