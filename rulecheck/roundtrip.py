"""YAML text for regenerated rulebooks that keeps what people wrote in the file.

:func:`render` writes a plain mapping (dicts, :class:`~rulecheck.schema.Flow`, lists, str, int,
float, bool, None) as YAML text, either fresh or over the file's current text.

A fresh file has one canonical style: the ``header`` comment lines, then block mappings
indented by 2 in the mapping's key order; lists of scalars on one line (``[501, 200]``), lists
of mappings or lists as block sequences (``  - feature: 1``); ``Flow`` mappings on one line.
Strings are plain where YAML allows it and they read back as the same string (in PyYAML,
rulecheck's reader and YAML 1.2), single-quoted otherwise, double-quoted with escapes when they
hold a line break or a character YAML cannot print. Floats are the shortest text that reads
back as the same float in PyYAML and YAML 1.2 (``1.0e-05``, never ``1e-05``); ``.nan``,
``.inf``, ``-.inf``; ``null``, ``true``, ``false``. No line is folded, no anchors or aliases,
and equal inputs give byte-identical text.

Over an old text the new values are merged into the old document, so that comments, key order
and the formatting of unchanged values survive:

- a value whose plain content equals the old one is left as it is;
- mappings are updated in place: keys in both keep their place, keys only in ``new`` go right
  after the nearest preceding key (in ``new``'s order) the mapping has, or first; keys only in
  the old text are deleted;
- the list under the top-level ``list_key`` holds mappings identified by their ``id_key``: an
  old item that ``keep`` accepts is never rewritten nor deleted, another old item is updated
  in place when ``new`` has its id and deleted when not, and a new item goes after the last
  item of lower id (old items keep their order);
- any other changed value is written anew in the canonical style;
- the ``header`` is put at the top when it holds a ``# yaml-language-server:`` modeline and the
  old text has none.

ruamel.yaml keeps a comment with the node before it, so the full-line comments that end a
changed, deleted or moved-past node are moved to stay above the node they precede; comments
inside a deleted or rewritten node go with it, those above a deleted entry stay (above the
entry that follows). An end-of-line comment keeps its column where the new value leaves room.
An old text whose content equals ``new`` is returned as it is; otherwise the parts that go
through ruamel.yaml come out with the canonical indentation, and an empty value (``key:``)
as ``null``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, NamedTuple

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.emitter import RoundTripEmitter
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.nodes import CollectionNode
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.resolver import BaseResolver
from ruamel.yaml.resolver import implicit_resolvers as _RUAMEL_RESOLVERS
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scalarstring import (
    DoubleQuotedScalarString,
    PlainScalarString,
    SingleQuotedScalarString,
)
from ruamel.yaml.tokens import CommentToken

from rulecheck.schema import Block, Flow

__all__ = ["render"]

MODELINE = "# yaml-language-server:"
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2 floats without a dot (``1e-05``), which rulecheck's reader takes as floats too
FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_LINE_BREAKS = frozenset("\n\r\x85\u2028\u2029")
_PYYAML = yaml.constructor.SafeConstructor()
_PYYAML_RESOLVER = yaml.resolver.Resolver()
_YAML_12 = [regexp for versions, _tag, regexp, _first in _RUAMEL_RESOLVERS if (1, 2) in versions]
_MISSING = object()


# ---------------------------------------------------------------------------- ruamel.yaml set-up


class _Resolver(BaseResolver):
    """Text is read as rulecheck's reader (PyYAML) reads it: YAML 1.1 scanning and plain
    scalars resolved by PyYAML's rules, plus floats without a dot."""

    yaml_implicit_resolvers = {  # noqa: RUF012 (ruamel's class-level table)
        first: list(pairs)
        for first, pairs in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
    }

    def __init__(self, version: Any = None, loader: Any = None, loadumper: Any = None) -> None:
        super().__init__(loader if loader is not None else loadumper)
        self._loader_version = version

    @property
    def processing_version(self) -> tuple[int, int]:
        return (1, 1)


_Resolver.add_implicit_resolver_base(_FLOAT, FLOAT_12, list("-+.0123456789"))


class _Int(int):
    """An int read from a file, with its text there."""

    text: str


class _Float(float):
    """A float read from a file, with its text there."""

    text: str


def _construct_int(constructor: RoundTripConstructor, node: Any) -> _Int:
    text = constructor.construct_scalar(node)
    out = _Int(_PYYAML.construct_yaml_int(yaml.ScalarNode(_INT, text)))
    out.text = text
    return out


def _construct_float(constructor: RoundTripConstructor, node: Any) -> _Float:
    text = constructor.construct_scalar(node)
    out = _Float(_PYYAML.construct_yaml_float(yaml.ScalarNode(_FLOAT, text)))
    out.text = text
    return out


class _Constructor(RoundTripConstructor):
    """Numbers read with PyYAML's rules, keeping their text (written back unchanged)."""


_Constructor.add_constructor(_INT, _construct_int)
_Constructor.add_constructor(_FLOAT, _construct_float)


def _float_text(value: float) -> str:
    """Shortest text PyYAML and YAML 1.2 both read as ``value``: ``1e-05`` gets a dot."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


class _Representer(RoundTripRepresenter):
    """``null`` for None, canonical floats, numbers read from the old text as they were
    written, and no aliases (a value met twice is written twice)."""

    def ignore_aliases(self, data: Any) -> bool:
        anchor = getattr(data, "anchor", None)
        return getattr(anchor, "value", None) is None

    def represent_none(self, data: Any) -> Any:
        return self.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_float(self, data: Any) -> Any:
        return self.represent_scalar(_FLOAT, _float_text(data))

    def represent_kept_int(self, data: _Int) -> Any:
        return self.represent_scalar(_INT, data.text)

    def represent_kept_float(self, data: _Float) -> Any:
        return self.represent_scalar(_FLOAT, data.text)


_Representer.add_representer(type(None), _Representer.represent_none)
_Representer.add_representer(float, _Representer.represent_float)
_Representer.add_representer(_Int, _Representer.represent_kept_int)
_Representer.add_representer(_Float, _Representer.represent_kept_float)


class _Composer(Composer):
    """ruamel.yaml's composer with two of its comments kept that 0.19 loses: the comment lines
    above a flow collection with an end-of-line comment, and those after a list in a list."""

    def compose_sequence_node(self, anchor: Any) -> Any:
        above = self.parser.peek_event().comment
        node = _keep_above(super().compose_sequence_node(anchor), above)
        _lift_end_comments(node)
        return node

    def compose_mapping_node(self, anchor: Any) -> Any:
        above = self.parser.peek_event().comment
        return _keep_above(super().compose_mapping_node(anchor), above)


def _keep_above(node: Any, above: Any) -> Any:
    if above is None or len(above) < 2 or not above[1] or node.comment is above:
        return node
    if node.comment is None:
        node.comment = [None, None]
    if node.comment[1] is None:
        node.comment[1] = above[1]
    return node


def _lift_end_comments(seq: Any) -> None:
    """The comment lines after an item that is a list become those above the next item, or
    those after ``seq`` (ruamel.yaml drops the end comments of a list's items)."""
    for index, child in enumerate(seq.value):
        comment = child.comment
        if not isinstance(child, CollectionNode) or not comment or len(comment) < 3:
            continue
        ends = [token for extra in comment[2:] if extra for token in extra]
        del comment[2:]
        if not ends:
            continue
        if index + 1 < len(seq.value):
            following = seq.value[index + 1]
            if following.comment is None:
                following.comment = [None, None]
            following.comment[1] = ends + (following.comment[1] or [])
        else:
            if seq.comment is None:
                seq.comment = [None, None]
            if len(seq.comment) < 3:
                seq.comment.append([])
            seq.comment[2] = ends + (seq.comment[2] or [])


class _Emitter(RoundTripEmitter):
    """ruamel.yaml's emitter, except that a line break ends the state "right after a dash"
    (0.19 can carry it past the line and then leave a later line break out: ``- a: 1 b: 2``
    for a list with comment lines above it whose first item is ``{}``)."""

    def write_line_break(self, data: Any = None) -> None:
        super().write_line_break(data)
        self.no_newline = False


def _yaml() -> YAML:
    out = YAML(typ="rt")
    out.Composer = _Composer
    out.Emitter = _Emitter
    out.Resolver = _Resolver
    out.Constructor = _Constructor
    out.Representer = _Representer
    out.preserve_quotes = True
    out.indent(mapping=2, sequence=4, offset=2)
    out.width = 2**30  # never fold a line
    out.allow_unicode = True
    return out


# ---------------------------------------------------------------------------- canonical values


@lru_cache(maxsize=8192)
def _string_style(value: str, flow: bool) -> str:
    """``'"'``, ``"'"`` or ``""`` (plain) for a string written fresh, in a flow collection or
    not (PyYAML's emitter says where plain text reads back as itself)."""
    analysis = yaml.emitter.Emitter.analyze_scalar(SimpleNamespace(allow_unicode=True), value)
    if not analysis.allow_single_quoted or _LINE_BREAKS.intersection(value):
        return '"'
    plain = analysis.allow_flow_plain if flow else analysis.allow_block_plain
    if plain and _reads_as_str(value):
        return ""
    # a quote inside single quotes is doubled ('[')]'); double quotes read better then
    return '"' if "'" in value and not {'"', "\\"} & set(value) else "'"


def _reads_as_str(value: str) -> bool:
    """Whether ``value`` written plain reads back as a string (PyYAML, rulecheck, YAML 1.2)."""
    tag = _PYYAML_RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
    return (
        tag == _STR
        and not FLOAT_12.match(value)
        and not any(regexp.match(value) for regexp in _YAML_12)
    )


def _string(value: str, flow: bool) -> str:
    style = _string_style(value, flow)
    if style == '"':
        return DoubleQuotedScalarString(value)
    if style == "'":
        return SingleQuotedScalarString(value)
    return PlainScalarString(value)


def _build(value: Any, flow: bool = False) -> Any:
    """``value`` as ruamel.yaml nodes in the canonical style (``flow``: inside a flow node)."""
    if isinstance(value, Mapping):
        flow = flow or isinstance(value, Flow)
        mapping = CommentedMap((_build(k, flow), _build(v, flow)) for k, v in value.items())
        _set_flow(mapping, flow)
        return mapping
    if isinstance(value, list | tuple):
        flow = flow or (
            not isinstance(value, Block)
            and not any(isinstance(v, Mapping | list | tuple) for v in value)
        )
        seq = CommentedSeq(_build(v, flow) for v in value)
        _set_flow(seq, flow)
        return seq
    if isinstance(value, str):
        return _string(str(value), flow)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as YAML")


def _set_flow(node: CommentedMap | CommentedSeq, flow: bool) -> None:
    if flow or len(node) == 0:  # written ``{}`` or ``[]`` either way
        node.fa.set_flow_style()
    else:
        node.fa.set_block_style()


# ---------------------------------------------------------------------------- plain content


def _kind(value: Any) -> tuple[Any, ...]:
    """A hashable identity of a scalar that tells 1, 1.0, True and '1' apart."""
    if value is None:
        return (0,)
    if isinstance(value, bool | ScalarBoolean):
        return (1, bool(value))
    if isinstance(value, int):
        return (2, int(value))
    if isinstance(value, float):
        return (3, "nan") if math.isnan(value) else (3, float(value))
    if isinstance(value, str):
        return (4, str(value))
    return (5, type(value).__name__, value)


def _same(old: Any, new: Any) -> bool:
    """Whether ``old`` (as read) and ``new`` have the same plain content."""
    if isinstance(old, Mapping):
        if not isinstance(new, Mapping) or len(old) != len(new):
            return False
        new_keys = {_kind(k): k for k in new}
        for key, value in old.items():
            new_key = new_keys.get(_kind(key), _MISSING)
            if new_key is _MISSING or not _same(value, new[new_key]):
                return False
        return True
    if isinstance(old, list):
        return (
            isinstance(new, list | tuple)
            and len(old) == len(new)
            and all(_same(a, b) for a, b in zip(old, new, strict=True))
        )
    if isinstance(new, Mapping | list | tuple):
        return False
    return _kind(old) == _kind(new)


def _plain(value: Any) -> Any:
    """A value as read, as plain Python values."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool | ScalarBoolean):
        return bool(value)
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return value


# ---------------------------------------------------------------------------- comments


def _is_block(node: Any) -> bool:
    return (
        isinstance(node, CommentedMap | CommentedSeq)
        and len(node) > 0
        and not node.fa.flow_style(False)
    )


def _last(node: CommentedMap | CommentedSeq) -> Any:
    return next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1


def _end(parent: CommentedMap | CommentedSeq, key: Any) -> tuple[Any, Any]:
    """The entry whose comment slot follows the last line of entry ``key``: the deepest last."""
    while _is_block(parent[key]):
        parent = parent[key]
        key = _last(parent)
    return parent, key


def _slot(parent: CommentedMap | CommentedSeq) -> int:
    return 2 if isinstance(parent, CommentedMap) else 0


def _tokens(parent: CommentedMap | CommentedSeq, key: Any) -> Iterator[Any]:
    """The comment token lists that hold the comment after entry ``key`` (a sequence item's own
    collection may carry it as well; ruamel.yaml reads it from there first)."""
    items = parent.ca.items.get(key)
    if items is not None:
        yield items
    value = parent[key]
    if (
        isinstance(parent, CommentedSeq)
        and isinstance(value, CommentedMap | CommentedSeq)
        and value.ca.comment is not None
    ):
        yield value.ca.comment


def _pop_tail(parent: CommentedMap | CommentedSeq, key: Any) -> str:
    """Take the full-line comments (and blank lines) after entry ``key``: they belong to
    whatever comes next. Its end-of-line comment stays. ruamel.yaml keeps them with the last
    entry at the deepest level, or as the end comments of a block collection on the way."""
    ends = []
    while _is_block(parent[key]):
        parent = parent[key]
        if parent.ca.end:
            ends.append(_text(parent.ca.end))
            parent.ca.end = []
        key = _last(parent)
    index = _slot(parent)
    tail = ""
    for holder in _tokens(parent, key):
        token = holder[index] if index < len(holder) else None
        if token is not None:
            head, _, tail = token.value.partition("\n")
            if tail:
                token.value = head + "\n"
            break
    return tail + "".join(reversed(ends))


def _push_tail(parent: CommentedMap | CommentedSeq, key: Any, lines: str) -> None:
    """Put full-line comments right after entry ``key`` (after those already there)."""
    if not lines:
        return
    lines = _pop_tail(parent, key) + lines  # all in one place, in order
    parent, key = _end(parent, key)
    index = _slot(parent)
    holders = list(_tokens(parent, key))
    for holder in holders:
        token = holder[index] if index < len(holder) else None
        if token is not None:
            token.value += lines
            return
    token = CommentToken("\n" + lines, CommentMark(0))
    parent.ca.items.setdefault(key, [None, None, None, None])[index] = token
    for holder in holders:
        if index < len(holder):
            holder[index] = token


def _push_before(parent: CommentedMap | CommentedSeq, key: Any, lines: str) -> None:
    """Put full-line comments right before entry ``key``."""
    if not lines:
        return
    items = parent.ca.items.setdefault(key, [None, None, None, None])
    if items[1] is None:
        items[1] = []
    items[1].insert(0, CommentToken(lines, CommentMark(0)))


def _text(tokens: list[Any]) -> str:
    """Comment tokens as the lines they print."""
    return "".join(
        ("" if token.value.startswith("\n") else " " * token.column) + token.value
        for token in tokens
    )


def _pop_before(parent: CommentedMap | CommentedSeq, key: Any) -> str:
    items = parent.ca.items.get(key)
    if items is None or not items[1]:
        return ""
    lines = _text(items[1])
    items[1] = None
    return lines


def _push_top(root: CommentedMap, lines: str) -> None:
    """Put full-line comments at the top of the document, after those already there."""
    if not lines:
        return
    if root.ca.comment is None:
        root.ca.comment = [None, None]
    if root.ca.comment[1] is None:
        root.ca.comment[1] = []
    root.ca.comment[1].append(CommentToken(lines, CommentMark(0)))


def _flatten_head(parent: CommentedMap, key: Any) -> None:
    """Comments that stood before the first entry of a block value that is gone: after the
    value's line instead."""
    items = parent.ca.items.get(key)
    if items is None or not items[3]:
        return
    lines = _text(items[3])
    items[3] = None
    if items[2] is None:
        items[2] = CommentToken("\n", CommentMark(0))
    items[2].value += lines


# ---------------------------------------------------------------------------- merging


def _keys(node: CommentedMap | CommentedSeq) -> list[Any]:
    return list(node) if isinstance(node, CommentedMap) else list(range(len(node)))


def _delete(parent: CommentedMap | CommentedSeq, key: Any) -> str:
    """Delete an entry. The full-line comments around it move to the entry before it, or the
    entry after it; when none is left they are returned, for the caller to place."""
    keys = _keys(parent)
    position = keys.index(key)
    lines = _pop_before(parent, key) + _pop_tail(parent, key)
    del parent[key]
    if not lines:
        return ""
    if position > 0:
        _push_tail(parent, keys[position - 1], lines)
    elif len(parent) > 0:
        _push_before(parent, _keys(parent)[0], lines)
    else:
        return lines
    return ""


def _insert(parent: CommentedMap | CommentedSeq, position: int, key: Any, value: Any) -> Any:
    """Insert an entry; the comments after the entry before it move after the new one."""
    lines = _pop_tail(parent, _keys(parent)[position - 1]) if position > 0 else ""
    if isinstance(parent, CommentedMap):
        parent.insert(position, key, value)
    else:
        parent.insert(position, value)
        key = position
    _push_tail(parent, key, lines)
    return key


def _merge(parent: CommentedMap | CommentedSeq, key: Any, new: Any, flow: bool) -> None:
    """Make entry ``key`` of ``parent`` hold ``new``, changing as little text as it can."""
    old = parent[key]
    if old is new or isinstance(old, _Unchanged) or _same(old, new):
        return
    lines = _pop_tail(parent, key)
    if isinstance(old, CommentedMap) and len(old) > 0 and isinstance(new, Mapping):
        lines = _update(old, new, flow or bool(old.fa.flow_style(False))) + lines
    else:
        parent[key] = _build(new, flow)
    _settle(parent, key)
    _push_tail(parent, key, lines)


def _settle(parent: CommentedMap | CommentedSeq, key: Any) -> None:
    """After entry ``key`` changed: an empty collection is written ``[]`` or ``{}`` on the
    key's line, and comments that stood before the first entry of a block value that is
    no more go after the value's line."""
    value = parent[key]
    if isinstance(value, CommentedMap | CommentedSeq) and len(value) == 0:
        value.fa.set_flow_style()
    if isinstance(parent, CommentedMap) and not _is_block(value):
        _flatten_head(parent, key)


def _update(old: CommentedMap, new: Mapping[Any, Any], flow: bool) -> str:
    """Update mapping ``old`` in place to hold ``new``; return comments left with no entry."""
    new_keys = {_kind(k): k for k in new}
    orphans = ""
    for key in [k for k in old if _kind(k) not in new_keys]:
        orphans += _delete(old, key)
    for key in list(old):
        _merge(old, key, new[new_keys[_kind(key)]], flow)
    old_keys = {_kind(k): k for k in old}
    previous = None
    for key in new:
        if _kind(key) in old_keys:
            previous = old_keys[_kind(key)]
            continue
        position = list(old).index(previous) + 1 if previous is not None else 0
        previous = _insert(old, position, _build(key, flow), _build(new[key], flow))
        old_keys[_kind(key)] = previous
    return _place(old, orphans)


def _place(node: CommentedMap | CommentedSeq, orphans: str) -> str:
    """Put comments whose entries are all gone before the first entry, if there is one."""
    if orphans and len(node) > 0:
        _push_before(node, _keys(node)[0], orphans)
        return ""
    return orphans


def _item_id(item: Any, id_key: str) -> tuple[Any, ...] | None:
    if not isinstance(item, Mapping):
        return None
    value = item.get(id_key, _MISSING)
    return None if value is _MISSING or isinstance(value, Mapping | list) else _kind(value)


def _id_order(item_id: tuple[Any, ...]) -> tuple[Any, ...]:
    """Ids sort as numbers, then as text."""
    if item_id[0] in (2, 3) and item_id[1] != "nan":
        return (0, item_id[1])
    return (1, repr(item_id))


def _update_items(
    old: CommentedSeq,
    new: Sequence[Any],
    kept: Sequence[bool],
    id_key: str,
    stand_ins: Mapping[str, _StandIn],
) -> str:
    """Update the identified items of ``old`` in place to those of ``new`` (``kept``: whether
    each old item is left as it is; ``stand_ins``: old items left out of the parsed text,
    by the scalar that stands for them). Return comments left with no entry."""
    new_items = {}
    for item in new:
        item_id = _item_id(item, id_key)
        if item_id is not None:
            new_items.setdefault(item_id, item)
    ids: list[tuple[Any, ...] | None] = []  # of the items in ``old``, in order
    placed: set[tuple[Any, ...] | None] = set()
    orphans = ""
    for is_kept in kept:
        index = len(ids)
        stand_in = stand_ins.get(old[index]) if isinstance(old[index], str) else None
        item_id = _item_id(old[index] if stand_in is None else stand_in.plain, id_key)
        if not is_kept and (item_id not in new_items or item_id in placed):
            orphans += _delete(old, index)
            continue
        if not is_kept and stand_in is None:
            _merge(old, index, new_items[item_id], False)
        ids.append(item_id)
        placed.add(item_id)
    previous = -1
    matched = set()
    for item in new:
        item_id = _item_id(item, id_key)
        if item_id is not None and item_id in placed and item_id not in matched:
            matched.add(item_id)  # its old item is updated, or kept; a second one is new
            continue
        position = previous + 1 if item_id is None else _after_lower(ids, item_id)
        _insert(old, position, None, _build(item))
        ids.insert(position, item_id)
        previous = position
    return _place(old, orphans)


def _after_lower(ids: list[tuple[Any, ...] | None], item_id: tuple[Any, ...]) -> int:
    """The position right after the last item whose id is lower than ``item_id`` (or the
    same: a second item with one id goes after the first), or 0."""
    order = _id_order(item_id)
    for index in range(len(ids) - 1, -1, -1):
        other = ids[index]
        if other is not None and _id_order(other) <= order:
            return index + 1
    return 0


def _update_root(
    root: CommentedMap,
    new: Mapping[str, Any],
    keep: Callable[[Mapping[str, Any]], bool],
    list_key: str,
    id_key: str,
    cut: _Cut | None,
) -> str:
    """Update the document in place; return comments left with no entry."""
    if len(root) == 0:
        root.fa.set_block_style()  # ``{}`` holds nothing to keep
    old_list = root.get(list_key) if list_key in root else None
    new_list = new.get(list_key)
    if isinstance(old_list, CommentedSeq) and isinstance(new_list, list | tuple):
        if cut is not None or not _same(old_list, new_list):
            if cut is not None:
                _unchanged(cut.stand_ins, old_list)
                kept = cut.kept
            else:
                kept = [isinstance(item, Mapping) and bool(keep(_plain(item))) for item in old_list]
            stand_ins = {} if cut is None else cut.stand_ins
            lines = _pop_tail(root, list_key)
            lines = _update_items(old_list, new_list, kept, id_key, stand_ins) + lines
            _settle(root, list_key)
            _push_tail(root, list_key, lines)
        # the same object under the same key: left as it is now, in new's key order
        new = {**new, list_key: old_list}
    return _update(root, new, False)


# ---------------------------------------------------------------------------- large lists
#
# Parsing with ruamel.yaml is slow (about 0.3 s for 60 KB), and a regenerated rulebook is
# mostly features, and parts of features, that did not change. So the old text is read once
# with PyYAML (libyaml), and what will not be rewritten is cut out of the text: an item of the
# list that is kept, unchanged or deleted becomes a one-line stand-in item, and in an item
# that changes, a block value that does not becomes a stand-in scalar on its key's line.
# ruamel.yaml then parses and writes only the rest, and the stand-ins are replaced by their
# own text again. The comment lines after a cut part stay in the parsed text, so they move as
# they would have. A part is cut only where its lines are certain (the canonical layout,
# ``  - key: ...`` under a top-level key, and no block scalar at its end), and the stand-ins
# must come out on lines of their own; the result is the same text as without cutting.


class _StandIn(NamedTuple):
    """A part cut out of the old text: its lines, its value as rulecheck reads it, whether it
    is a kept item, and for a value, the line of its key."""

    text: str
    plain: Any
    kept: bool
    key_line: str | None = None


class _Unchanged(str):
    """The stand-in of a value that is not rewritten."""

    __slots__ = ()


_Representer.add_representer(_Unchanged, RoundTripRepresenter.represent_str)


class _Reader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """rulecheck's reader: PyYAML's safe loader (libyaml's where there is one) that also
    takes floats without a dot."""


_Reader.add_implicit_resolver(_FLOAT, FLOAT_12, list("-+.0123456789"))


def _read(text: str) -> tuple[Any, Any]:
    """``(node, value)`` of ``text`` as rulecheck reads it, or ``(None, _MISSING)``."""
    loader = _Reader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except (yaml.YAMLError, ValueError, TypeError, ArithmeticError, RecursionError):
        return None, _MISSING
    finally:
        loader.dispose()


class _Cut(NamedTuple):
    """The old text with stand-ins, the stand-ins by name, and whether each item is kept."""

    text: str
    stand_ins: dict[str, _StandIn]
    kept: list[bool]


def _cut(
    text: str,
    node: Any,
    value: Mapping[Any, Any],
    new: Mapping[str, Any],
    keep: Callable[[Mapping[str, Any]], bool],
    list_key: str,
    id_key: str,
) -> _Cut | None:
    """``text`` with what will not be rewritten in the list replaced by stand-ins; None when
    nothing is cut."""
    if not isinstance(node, yaml.MappingNode) or node.flow_style or node.start_mark.column:
        return None
    position = next(
        (i for i, (key, _) in enumerate(node.value) if key.tag == _STR and key.value == list_key),
        None,
    )
    old_items, new_list = value.get(list_key), new.get(list_key)
    if position is None or not isinstance(old_items, list) or not isinstance(new_list, list):
        return None
    seq = node.value[position][1]
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or len(seq.value) != len(old_items):
        return None
    if any(brk in text for brk in ("\r", "\x85", "\u2028", "\u2029")):
        return None  # lines as YAML counts them are the text's lines split at "\n"
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    ends = [item.start_mark.line for item in seq.value[1:]]
    if position + 1 < len(node.value):
        ends.append(node.value[position + 1][0].start_mark.line)
    else:
        ends.append(len(lines))
    new_items = {}
    for item in new_list:
        item_id = _item_id(item, id_key)
        if item_id is not None:
            new_items.setdefault(item_id, item)
    nonce = 0
    while f"rulecheck-stand-in-{nonce}-" in text:
        nonce += 1
    placed: set[Any] = set()
    kept_items: list[bool] = []
    cuts: dict[int, tuple[int, str, str, _StandIn]] = {}  # first line: end, line, name, part
    for index, (item, plain) in enumerate(zip(seq.value, old_items, strict=True)):
        kept = isinstance(plain, Mapping) and bool(keep(plain))
        kept_items.append(kept)
        item_id = _item_id(plain, id_key)
        rewritten = False
        if not kept and item_id in new_items and item_id not in placed:
            rewritten = not _same(plain, new_items[item_id])
        if kept or (item_id in new_items and item_id not in placed):
            placed.add(item_id)
        name = f"rulecheck-stand-in-{nonce}-{index}"
        if rewritten:
            for key_line, end, key_text, part in _unchanged_values(
                lines, item, plain, new_items[item_id], ends[index]
            ):
                token = f"{name}-{key_line}-end"  # "-end": no name starts another
                cuts[key_line] = (end, f"{key_text} {token}\n", token, part)
            continue
        span = _span(lines, item, ends[index])
        if span is not None:
            token = f"{name}-end"
            part = _StandIn("".join(lines[span[0] : span[1]]), plain, kept)
            cuts[span[0]] = (span[1], f"  - {token}\n", token, part)
    if not cuts:
        return None
    out: list[str] = []
    stand_ins = {}
    line = 0
    while line < len(lines):
        if line in cuts:
            end, replacement, token, part = cuts[line]
            out.append(replacement)
            stand_ins[token] = part
            line = end
        else:
            out.append(lines[line])
            line += 1
    return _Cut("".join(out), stand_ins, kept_items)


def _content_end(lines: list[str], node: Any, start: int, next_line: int) -> int | None:
    """The line after the last line of ``node`` (which starts on line ``start``), when only
    comment lines and blank lines follow it up to ``next_line``; None when unsure."""
    last = node
    while isinstance(last, yaml.MappingNode | yaml.SequenceNode) and not last.flow_style:
        if not last.value:
            return None
        last = last.value[-1][1] if isinstance(last, yaml.MappingNode) else last.value[-1]
    if isinstance(last, yaml.ScalarNode) and last.style in ("|", ">"):
        return None
    end = last.end_mark.line + 1
    if not start < end <= next_line:
        return None
    content = lines[end - 1].strip()
    if not content or content.startswith("#"):
        return None
    if any(line.strip() and not line.lstrip().startswith("#") for line in lines[end:next_line]):
        return None
    return end


def _span(lines: list[str], item: Any, next_line: int) -> tuple[int, int] | None:
    """The lines ``[start, end)`` of a list item, from its dash to its last value, when they are
    certain: ``  - key: ...``, a block mapping, and only comments or blank lines after it."""
    start = item.start_mark.line
    if (
        not isinstance(item, yaml.MappingNode)
        or item.flow_style
        or item.start_mark.column != 4
        or not lines[start].startswith("  - ")
    ):
        return None
    end = _content_end(lines, item, start, next_line)
    return None if end is None else (start, end)


def _unchanged_values(
    lines: list[str], item: Any, plain: Any, new_item: Any, next_line: int
) -> list[tuple[int, int, str, _StandIn]]:
    """The block values of a list item that changes that stay as they are, each as ``(key
    line, end, key line's text, part)``: the lines of the value are ``(key line, end)``."""
    if (
        not isinstance(item, yaml.MappingNode)
        or item.flow_style
        or item.start_mark.column != 4
        or not isinstance(plain, Mapping)
        or not isinstance(new_item, Mapping)
        or len(plain) != len(item.value)  # a key twice: positions do not match
    ):
        return []
    new_keys = {_kind(k): k for k in new_item}
    out = []
    for index, ((key, value), (plain_key, plain_value)) in enumerate(
        zip(item.value, plain.items(), strict=True)
    ):
        new_key = new_keys.get(_kind(plain_key), _MISSING)
        if (
            new_key is _MISSING
            or not isinstance(value, yaml.MappingNode | yaml.SequenceNode)
            or value.flow_style
            or not value.value
            or key.start_mark.column != 4
            or not _same(plain_value, new_item[new_key])
        ):
            continue
        key_line = key.start_mark.line
        text = lines[key_line].rstrip("\n")
        if text[:4].strip() or not text.endswith(":") or value.start_mark.line <= key_line:
            continue
        following = (
            item.value[index + 1][0].start_mark.line if index + 1 < len(item.value) else next_line
        )
        end = _content_end(lines, value, key_line, following)
        if end is not None:
            part = _StandIn("".join(lines[key_line + 1 : end]), plain_value, False, text)
            out.append((key_line, end, text, part))
    return out


def _unchanged(stand_ins: Mapping[str, _StandIn], items: CommentedSeq) -> None:
    """Mark the stand-ins of values in the parsed items as not to be rewritten."""
    for item in items:
        if isinstance(item, CommentedMap):
            for key, value in item.items():
                if type(value) is str and value in stand_ins:
                    item[key] = _Unchanged(value)


def _paste(text: str, stand_ins: Mapping[str, _StandIn]) -> str | None:
    """``text`` with the stand-ins replaced by their lines (None if one is not found once, as
    a line of its own)."""
    for token, part in stand_ins.items():
        key_line = "  -" if part.key_line is None else part.key_line
        line = f"\n{key_line} {token}\n"
        count = text.count(line)
        if count > 1 or (count == 0 and token in text):
            return None
        lines = part.text if part.text.endswith("\n") else part.text + "\n"
        text = text.replace(
            line, "\n" + (lines if part.key_line is None else f"{key_line}\n{lines}")
        )
    return text


# ---------------------------------------------------------------------------- the entry point


def render(
    new: Mapping[str, Any],
    old_text: str | None = None,
    *,
    header: Sequence[str] = (),
    keep: Callable[[Mapping[str, Any]], bool] = lambda item: False,
    list_key: str = "features",
    id_key: str = "feature",
) -> str:
    """YAML text of the plain mapping ``new``, written over ``old_text`` (the file's current
    text, or None for a fresh file) so that comments, key order and the formatting of unchanged
    values in the old text survive.

    ``header``: comment lines (each starting with ``#``) that begin a fresh file, and that are
    put at the top of an old text with no ``# yaml-language-server:`` line when they hold one.
    ``keep``: whether an old item of ``old_text[list_key]`` is left exactly as it is.
    An ``old_text`` that is not YAML with a mapping at the top raises ``ValueError``.
    """
    for line in header:
        if not line.startswith("#") or _LINE_BREAKS.intersection(line):
            raise ValueError(f"header lines are one-line comments starting with '#': {line!r}")
    if not isinstance(new, Mapping):
        raise TypeError(f"new must be a mapping, not {type(new).__name__}")
    prefix = "".join(f"{line}\n" for line in header)
    if old_text is None:
        return prefix + _dump(_build(new))
    if any(line.startswith(MODELINE) for line in old_text.splitlines()) or not any(
        line.startswith(MODELINE) for line in header
    ):
        prefix = ""
    node, value = _read(old_text)
    if isinstance(value, Mapping):
        if _same(value, new):
            return prefix + old_text
        cut = _cut(old_text, node, value, new, keep, list_key, id_key)
        if cut is not None:
            try:
                pasted = _paste(_merged(cut.text, new, keep, list_key, id_key, cut), cut.stand_ins)
            except ValueError:  # not seen: then the whole text is parsed below
                pasted = None
            if pasted is not None:
                return prefix + pasted
    return prefix + _merged(old_text, new, keep, list_key, id_key, None)


def _merged(
    old_text: str,
    new: Mapping[str, Any],
    keep: Callable[[Mapping[str, Any]], bool],
    list_key: str,
    id_key: str,
    cut: _Cut | None,
) -> str:
    """``old_text`` parsed with ruamel.yaml, updated to ``new`` and written out (``cut``: the
    stand-ins in ``old_text``, and which items are kept)."""
    try:
        root = _yaml().load(old_text)
    except YAMLError as exc:
        raise ValueError(f"the old text is not YAML: {exc}") from None
    if not isinstance(root, CommentedMap):
        raise ValueError("the old text does not hold a mapping at the top")
    lines = _pop_tail(root, _last(root)) if root else ""
    lines = _update_root(root, new, keep, list_key, id_key, cut) + lines
    if root:
        _push_tail(root, _last(root), lines)
    else:
        _push_top(root, lines)
    return _dump(root)


def _dump(root: CommentedMap) -> str:
    out = io.StringIO()
    _yaml().dump(root, out)
    return out.getvalue()
