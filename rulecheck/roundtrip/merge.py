"""Merging new plain values into a document read by ruamel.yaml, changing as little text as
it can (the rules are in the module doc of ``rulecheck.roundtrip``): mappings updated in
place, identified list items updated, kept, deleted or inserted by id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from rulecheck.roundtrip.comments import (
    _flatten_head,
    _is_block,
    _pop_before,
    _pop_tail,
    _push_before,
    _push_tail,
)
from rulecheck.roundtrip.style import _MISSING, _build, _kind, _same, _Unchanged

if TYPE_CHECKING:
    from rulecheck.roundtrip.cut import _StandIn


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
    new_items: dict[tuple[Any, ...] | None, Any] = {}  # None: no id, never a key
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
