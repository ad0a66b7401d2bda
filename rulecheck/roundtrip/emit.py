"""A fresh document's text in the canonical style, written directly: what ruamel.yaml writes of
``style._build(value)``, byte for byte, twenty times faster (extraction writes a book per head).

Only the shapes books and their tools produce are written here; :func:`emit` returns None for
any other (a block list directly inside a block list, a key of more than one line or too long
to be a simple key), and the caller takes ruamel.yaml's text then. A double-quoted string is written by ruamel.yaml
itself (its escapes), once per distinct string.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ruamel.yaml.comments import CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from rulecheck.roundtrip.style import _LINE_BREAKS, _float_text, _in_flow, _string_style, _yaml

MAX_KEY = 100  # ruamel.yaml writes a key of 128 characters or more as a complex key ("? ...")


class _Unsupported(Exception):
    """A shape :func:`emit` leaves to ruamel.yaml."""


def emit(value: Mapping[str, Any]) -> str | None:
    """The text ``_dump(_build(value))`` gives, or None where it is not written here."""

    def scalar(v: Any, flow: bool) -> str:
        if isinstance(v, str):
            style = _string_style(str(v), flow)
            if style == '"':
                return _double_quoted(str(v))
            if style == "'":
                return "'" + str(v).replace("'", "''") + "'"
            return str(v)
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(int(v))
        if isinstance(v, float):
            return _float_text(float(v))
        raise TypeError(f"cannot write {type(v).__name__} {v!r} as YAML")

    def key(k: Any, flow: bool) -> str:
        if isinstance(k, Mapping | list | tuple):
            raise _Unsupported
        if isinstance(k, str) and _LINE_BREAKS.intersection(k):
            raise _Unsupported  # ruamel.yaml writes a key of more than one line as "? ..."
        text = scalar(k, flow)
        if len(text) >= MAX_KEY:
            raise _Unsupported
        return text

    def is_flow(v: Mapping | list | tuple, flow: bool) -> bool:
        """Whether the collection ``v`` is written on one line (as ``style._build`` sets it)."""
        return _in_flow(v, flow) or len(v) == 0

    def inline(v: Any, in_list: bool = False) -> str:
        """``v`` inside a flow collection (or a flow collection itself); a mapping of one entry
        right inside a flow list has no braces (``[a: 1]``), as ruamel.yaml writes it."""
        if isinstance(v, Mapping):
            pairs = ", ".join(f"{key(k, True)}: {inline(x)}" for k, x in v.items())
            return pairs if in_list and len(v) == 1 else "{" + pairs + "}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(inline(x, in_list=True) for x in v) + "]"
        return scalar(v, True)

    def after_key(v: Any, indent: int, out: list[str]) -> None:
        """The value of a block mapping's key, from right after its colon."""
        if isinstance(v, Mapping | list | tuple):
            if is_flow(v, False):
                out.append(f" {inline(v)}\n")
            elif isinstance(v, Mapping):
                out.append("\n")
                mapping(v, indent + 2, out)
            else:
                out.append("\n")
                sequence(v, indent + 2, out)
        else:
            out.append(f" {scalar(v, False)}\n")

    def mapping(
        v: Mapping[Any, Any], indent: int, out: list[str], first: str | None = None
    ) -> None:
        """A block mapping whose keys start at column ``indent`` (the first key after ``first``
        instead, when it follows a list's dash)."""
        for i, (k, x) in enumerate(v.items()):
            out.append(first if i == 0 and first is not None else " " * indent)
            out.append(f"{key(k, False)}:")
            after_key(x, indent, out)

    def sequence(v: list | tuple, indent: int, out: list[str]) -> None:
        for x in v:
            dash = " " * indent + "- "
            if isinstance(x, Mapping | list | tuple):
                if is_flow(x, False):
                    out.append(f"{dash}{inline(x)}\n")
                elif isinstance(x, Mapping):
                    mapping(x, indent + 2, out, first=dash)
                else:
                    raise _Unsupported  # ruamel.yaml writes "-   - ..."
            else:
                out.append(f"{dash}{scalar(x, False)}\n")

    out: list[str] = []
    try:
        if is_flow(value, False):
            return inline(value) + "\n"
        mapping(value, 0, out)
    except _Unsupported:
        return None
    return "".join(out)


@lru_cache(maxsize=4096)
def _double_quoted(text: str) -> str:
    """``text`` double-quoted with ruamel.yaml's escapes."""
    seq = CommentedSeq([DoubleQuotedScalarString(text)])
    seq.fa.set_flow_style()
    out = io.StringIO()
    _yaml().dump(seq, out)
    written = out.getvalue()
    assert written.startswith("[") and written.endswith("]\n"), written
    return written[1:-2]
