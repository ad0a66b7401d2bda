"""Rulebook YAML read into plain values, with the line of every field.

Reading builds plain values from libyaml's parser events, recording the line of every field
(:class:`_Events`); a file with anything else (tags, merge keys, anchors and aliases,
repeated keys, a syntax error) is composed and walked node by node instead (:class:`_Walk`),
safely (no tags, no merge keys, aliases bounded), which names its problem as an
``InvalidRulebook`` at its file and line. The two agree wherever the events read a file
(``tests/test_rulebook.py``): the events are the fast path, the walk the complete one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
import yaml.constructor
import yaml.nodes

from rulecheck.book import SCHEMA_VERSION
from rulecheck.errors import InvalidRulebook
from rulecheck.roundtrip import FLOAT_12
from rulecheck.schema import Where, join

_MAX_REPEATS = 100_000


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` (no dot) as a float, as YAML 1.2 does."""


if TYPE_CHECKING:  # libyaml's loader reads as PyYAML's, with the same methods
    _FastBase = _Loader
else:
    _FastBase = getattr(yaml, "CSafeLoader", _Loader)


class _FastLoader(_FastBase):
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
            what = f"cannot read value {node.value[:40]!r} as {node.tag}: {first_line(exc)}"
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
        out: list[Any] = []
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


def read_values(text: str, where: Where, file: str) -> Any:
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
            f"not valid YAML: {first_line(exc)}", file=file, line=line, fix="correct the file"
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
