"""Moving the comments ruamel.yaml keeps with the node before them.

ruamel.yaml keeps a comment with the node before it, so the full-line comments that end an
entry belong to whatever comes next: when that entry changes, moves or goes, they are taken
(:func:`_pop_tail`) and put where they stay above the node they preceded (:func:`_push_tail`,
:func:`_push_before`, :func:`_push_top`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken


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
