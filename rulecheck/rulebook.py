"""Rulebook files: YAML in and out.

One file per head, ``L{layer}H{head}.yaml``. Reading builds plain values from libyaml's
parser events, recording the line of every field; a file with anything else (tags, merge
keys, anchors and aliases, repeated keys, a syntax error) is composed and walked node by node
instead, safely (no tags, no merge keys, aliases bounded), which names its problem. The
values go to the schema (``rulecheck.book``), so every problem is an ``InvalidRulebook``
naming the file, line and field.

Writing goes over the file already there (``rulecheck.roundtrip``): its comments, key order
and manual features survive, unchanged values keep their lines, so a regenerated book's diff
shows what changed and nothing else; equal inputs give byte-identical files, written
atomically. Measurements (quality curves, scores) go beside the book, in
``L{layer}H{head}.measured.json``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import yaml
import yaml.constructor
import yaml.nodes

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
from rulecheck.kinds import kinds
from rulecheck.roundtrip import FLOAT_12, render
from rulecheck.schema import Where, join
from rulecheck.schema import keys as schema_keys
from rulecheck.schemas import modeline

_MAX_REPEATS = 100_000
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


# ---------------------------------------------------------------------------- YAML in


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` (no dot) as a float, as YAML 1.2 does."""


class _FastLoader(getattr(yaml, "CSafeLoader", _Loader)):
    """``_Loader`` with libyaml's parser (three times faster) where PyYAML has it; a file it
    cannot parse is parsed again by ``_Loader``, whose error lines are the more exact.

    libyaml calls back into PyYAML's resolver for every scalar, which tries its regular
    expressions one by one; a book repeats its scalars (token strings, small ids), so the tag
    of each plain scalar is kept (half the time of reading a book)."""

    _tags: ClassVar[dict[str, str]] = {}  # of plain scalars

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is not yaml.nodes.ScalarNode:
            return super().resolve(kind, value, implicit)
        if not implicit[0]:  # quoted: a string (no path resolvers are registered)
            return _STR_TAG
        tag = self._tags.get(value)
        if tag is None:
            if len(self._tags) > _MAX_TAGS:
                self._tags.clear()
            tag = self._tags[value] = super().resolve(kind, value, implicit)
        return tag

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        """No path resolvers: nothing to track a node's path for."""

    def ascend_resolver(self) -> None:
        """No path resolvers: nothing to track a node's path for."""


for _cls in (_Loader, _FastLoader):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+.0123456789"))

_MAX_TAGS = 200_000  # scalars whose resolved tag is kept
_PLAIN_TYPES = (type(None), bool, int, float, str)
_MAP_TAG = "tag:yaml.org,2002:map"
_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}")
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass
class _Walk:
    """Turns a composed YAML node tree into plain values, recording each field's line.

    A field's line is recorded only where it differs from its parent's (``Where.line`` falls
    back to the parent), and scalar items are read inline: most of a book is flow lists of
    scalars on one line (``- [12, 34]``)."""

    where: Where
    constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor
    )
    seen: set[int] = field(default_factory=set)
    repeats: int = 0
    active: set[int] = field(default_factory=set)

    def value(self, node: yaml.nodes.Node, path: str, parent_line: int = 0) -> Any:
        line = node.start_mark.line + 1
        if line != parent_line:
            self.where.lines.setdefault(path, line)
        if isinstance(node, yaml.nodes.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.seen:
            self.repeats += 1 + len(node.value)  # its scalars are read again too
            if self.repeats > _MAX_REPEATS:
                self.where.fail(path, "too many YAML nodes from aliases", "write the values out")
        self.seen.add(id(node))
        if id(node) in self.active:
            self.where.fail(path, "recursive YAML alias", "write the value out instead of an alias")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.nodes.SequenceNode) and node.tag == _SEQ_TAG:
                return self.sequence(node, path, line)
            if isinstance(node, yaml.nodes.MappingNode) and node.tag == _MAP_TAG:
                return self.mapping(node, path, line)
        finally:
            self.active.discard(id(node))
        self.where.fail(path, f"unsupported YAML tag {node.tag}", "remove the tag")

    def sequence(self, node: yaml.nodes.SequenceNode, path: str, line: int) -> list[Any]:
        out = []
        for i, item in enumerate(node.value):
            if type(item) is yaml.nodes.ScalarNode and item.start_mark.line + 1 == line:
                value = _plain(item.tag, item.value)
                out.append(value if value is not _OTHER else self.scalar(item, f"{path}[{i}]"))
            else:
                out.append(self.value(item, f"{path}[{i}]", line))
        return out

    def mapping(self, node: yaml.nodes.MappingNode, path: str, line: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            sub = join(path, key)
            key_line = key_node.start_mark.line + 1
            if key in out:
                first = self.where.key_lines.get(sub)
                self.where.lines[sub] = key_line
                self.where.fail(sub, f"duplicate key (first at line {first})", "keep only one")
            self.where.key_lines[sub] = key_line
            out[key] = self.value(value_node, sub, line)
        return out

    def key(self, node: yaml.nodes.Node, path: str) -> Any:
        line = node.start_mark.line + 1
        if node.tag == _MERGE_TAG:
            self.where.lines.setdefault(path, line)
            self.where.fail(path, "YAML merge keys (<<) are not supported", "write the keys out")
        if not isinstance(node, yaml.nodes.ScalarNode):
            self.where.lines.setdefault(path, line)
            self.where.fail(path, "mapping keys must be plain scalars", "use a string key")
        key = _plain(node.tag, node.value)
        if key is _OTHER:
            key = self.scalar(node, path)
        try:
            hash(key)
        except TypeError:
            self.where.fail(path, "mapping keys must be plain scalars", "use a string key")
        return key

    def scalar(self, node: yaml.nodes.ScalarNode, path: str) -> Any:
        value = _plain(node.tag, node.value)
        if value is not _OTHER:
            return value
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            what = f"cannot read value {node.value[:40]!r} as {node.tag}: {_first_line(exc)}"
            self.where.fail(path, what, "put it in quotes or correct it")
        if not isinstance(value, _PLAIN_TYPES):
            self.where.fail(
                path,
                f"unsupported {type(value).__name__} value {node.value[:40]!r}",
                "put it in quotes",
            )
        return value


_OTHER = object()  # a scalar PyYAML's constructor reads


def _plain(tag: str, value: str) -> Any:
    """The common scalars as PyYAML's constructor reads them: a string is its value, a decimal
    integer without sign or leading zero its int; anything else is ``_OTHER``."""
    if tag == _STR_TAG:
        return value
    if tag == _INT_TAG and _DECIMAL.fullmatch(value):
        return int(value)
    return _OTHER


class _Bail(Exception):
    """Something only the node walk reads (anchors, aliases, tags, complex or repeated keys,
    a value PyYAML's constructor must read, a syntax error): read the file that way."""


class _Events:
    """``_Walk``'s values and lines, built from libyaml's parser events without composing a
    node tree (two fifths of reading a book); anything else raises ``_Bail``."""

    def __init__(self, loader: _FastLoader, where: Where) -> None:
        self.loader, self.where = loader, where
        self.next = loader.get_event
        self.constructor = yaml.constructor.SafeConstructor()

    def document(self) -> Any:
        for expected in (yaml.StreamStartEvent, yaml.DocumentStartEvent):
            if type(self.next()) is not expected:
                raise _Bail
        value = self.value(self.next(), "", 0)
        for expected in (yaml.DocumentEndEvent, yaml.StreamEndEvent):
            if type(self.next()) is not expected:
                raise _Bail
        return value

    def value(self, event: Any, path: str, parent_line: int) -> Any:
        line = event.start_mark.line + 1
        if line != parent_line:
            self.where.lines.setdefault(path, line)
        kind = type(event)
        if event.anchor is not None or kind is yaml.AliasEvent:
            raise _Bail
        if kind is yaml.ScalarEvent:
            return self.scalar(event)
        if event.tag not in (None, "!"):
            raise _Bail
        if kind is yaml.SequenceStartEvent:
            return self.sequence(path, line)
        if kind is yaml.MappingStartEvent:
            return self.mapping(path, line)
        raise _Bail

    def sequence(self, path: str, line: int) -> list[Any]:
        out = []
        while True:
            event = self.next()
            kind = type(event)
            if kind is yaml.SequenceEndEvent:
                return out
            if (
                kind is yaml.ScalarEvent
                and event.anchor is None
                and event.start_mark.line + 1 == line
            ):
                out.append(self.scalar(event))
            else:
                out.append(self.value(event, f"{path}[{len(out)}]", line))

    def mapping(self, path: str, line: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        key_lines = self.where.key_lines
        while True:
            event = self.next()
            kind = type(event)
            if kind is yaml.MappingEndEvent:
                return out
            if kind is not yaml.ScalarEvent or event.anchor is not None:
                raise _Bail
            key = self.scalar(event)  # a merge key (<<) is no value: it bails
            if key in out:
                raise _Bail
            sub = join(path, key)
            key_lines[sub] = event.start_mark.line + 1
            out[key] = self.value(self.next(), sub, line)

    def scalar(self, event: Any) -> Any:
        if event.tag not in (None, "!"):
            raise _Bail
        tag = self.loader.resolve(yaml.nodes.ScalarNode, event.value, event.implicit)
        value = _plain(tag, event.value)
        if value is not _OTHER:
            return value
        try:  # as the walk constructs it, which names the problem where this fails
            node = yaml.nodes.ScalarNode(tag, event.value)
            value = self.constructor.construct_object(node, deep=True)
        except Exception:
            raise _Bail from None
        if not isinstance(value, _PLAIN_TYPES):
            raise _Bail
        return value


def _read_values(text: str, where: Where, file: str) -> Any:
    """The plain values of the YAML ``text``, each field's line recorded in ``where``: from
    the parser's events where they hold nothing but plain collections and scalars, else (or
    on any problem, which it reports) from the composed node tree (``_Walk``)."""
    if _FastLoader is not _Loader:  # libyaml is there
        loader = _FastLoader(text)
        try:
            return _Events(loader, where).document()
        except (_Bail, yaml.YAMLError, RecursionError):
            where.lines.clear()
            where.key_lines.clear()
        finally:
            loader.dispose()
    node = _compose(text, file)
    try:
        return _Walk(where).value(node, "")
    except RecursionError:
        raise InvalidRulebook("YAML nested too deeply", file=file, fix="flatten the file") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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


def _compose(text: str, file: str) -> yaml.nodes.Node:
    try:
        node = yaml.compose(text, Loader=_FastLoader)
    except (yaml.YAMLError, RecursionError):
        pass  # parsed again below, for the error
    else:
        if node is not None:
            return node
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what += f" ({exc.context}{at})"
        line = _unquoted_shorthand(text, exc)
        raise InvalidRulebook(
            f"not valid YAML: {what}",
            file=file,
            line=line or (mark.line + 1 if mark is not None else None),
            fix='quote the shorthand rule: - "[if] ... [then]" (YAML reads a bare [...] as a list)'
            if line
            else "correct the YAML syntax",
        ) from None
    except yaml.YAMLError as exc:
        line = text.count("\n", 0, getattr(exc, "position", 0) or 0) + 1
        raise InvalidRulebook(
            f"not valid YAML: {_first_line(exc)}", file=file, line=line, fix="correct the file"
        ) from None
    except RecursionError:
        raise InvalidRulebook("YAML nested too deeply", file=file, fix="flatten the file") from None
    if node is None:
        raise InvalidRulebook(
            "empty file, not a rulebook",
            file=file,
            line=1,
            fix=f"start with `rulecheck: {SCHEMA_VERSION}`, `layer:`, `head:`, `features:`",
        )
    return node


_SHORTHAND_LINE = re.compile(r"^\s*(?:-\s+|\w+:\s+)\[[^\]]*\]\s+(?:\.\.\.|unless)")


def _unquoted_shorthand(text: str, exc: yaml.MarkedYAMLError) -> int | None:
    """The line of an unquoted shorthand rule (``- [if] ... [then]``) near a YAML error."""
    lines = text.splitlines()
    marks = [m.line for m in (exc.context_mark, exc.problem_mark) if m is not None]
    for n in sorted(set(marks)):
        if n < len(lines) and _SHORTHAND_LINE.match(lines[n]):
            return n + 1
    return None


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
    with _collector_paused():
        rulebook = parse_book(where, _read_values(text, where, str(file)))
    _check_file_name(where, rulebook, Path(str(file)))
    return rulebook


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a book is read: reading allocates some 10^5 objects
    a book and no cycles, and the collector's passes over them took a fifth of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


@functools.cache
def _measured_fields(cls: type) -> frozenset[str]:
    return frozenset(schema_keys(cls, measured=True))


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
            f"cannot read the measurements: {_first_line(exc)}",
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
    """The files that writing ``rulebook`` at ``path`` writes: the book, and its
    measurements when it has any."""
    path = Path(path)
    _check_name_matches(rulebook, path)
    text = dump_rulebook(rulebook, old_text, path=path, keep_manual=keep_manual)
    out = [(path, text.encode("utf-8"))]
    measured = dump_measured(rulebook)
    if measured is not None:
        out.append((measured_path(path), measured.encode("utf-8")))
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
