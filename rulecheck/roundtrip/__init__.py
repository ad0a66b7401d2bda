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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from rulecheck.roundtrip.comments import _last, _pop_tail, _push_tail, _push_top
from rulecheck.roundtrip.cut import _Cut, _cut, _paste, _read, _unchanged
from rulecheck.roundtrip.emit import emit
from rulecheck.roundtrip.merge import _settle, _update, _update_items
from rulecheck.roundtrip.style import (
    _LINE_BREAKS,
    FLOAT_12,
    MODELINE,
    _build,
    _plain,
    _same,
    _yaml,
)

__all__ = ["FLOAT_12", "MODELINE", "render"]


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
        return prefix + (emit(new) or _dump(_build(new)))
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
