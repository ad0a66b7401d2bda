"""What will not be rewritten, cut out of the old text before ruamel.yaml reads it.

Parsing with ruamel.yaml is slow (about 0.3 s for 60 KB), and a regenerated rulebook is
mostly features, and parts of features, that did not change. So the old text is read once
with PyYAML (libyaml), and what will not be rewritten is cut out of the text: an item of the
list that is kept, unchanged or deleted becomes a one-line stand-in item, and in an item
that changes, a block value that does not becomes a stand-in scalar on its key's line.
ruamel.yaml then parses and writes only the rest, and the stand-ins are replaced by their
own text again. The comment lines after a cut part stay in the parsed text, so they move as
they would have. A part is cut only where its lines are certain (the canonical layout,
``  - key: ...`` under a top-level key, and no block scalar at its end), and the stand-ins
must come out on lines of their own; the result is the same text as without cutting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import yaml
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from rulecheck.roundtrip.merge import _item_id
from rulecheck.roundtrip.style import _FLOAT, _MISSING, _STR, FLOAT_12, _kind, _same, _Unchanged


class _StandIn(NamedTuple):
    """A part cut out of the old text: its lines, its value as rulecheck reads it, whether it
    is a kept item, and for a value, the line of its key."""

    text: str
    plain: Any
    kept: bool
    key_line: str | None = None


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
    new_items: dict[tuple[Any, ...] | None, Any] = {}  # None: no id, never a key
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
