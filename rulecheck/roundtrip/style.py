"""ruamel.yaml set up as rulecheck's round trip needs it, and values in the canonical style.

Text is read as rulecheck's reader (PyYAML) reads it, numbers keep their text, nothing is
folded and no alias is written (:func:`_yaml`); :func:`_build` makes ruamel.yaml nodes of a
plain value in the canonical style the module doc of ``rulecheck.roundtrip`` describes;
:func:`_same` says whether a value as read holds the same plain content as a new one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.emitter import RoundTripEmitter
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

from rulecheck.schema import Block, Flow

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


def _in_flow(value: Mapping | list | tuple, flow: bool) -> bool:
    """Whether the collection ``value`` and its items are written in flow style (``flow``:
    inside a flow node): a ``Flow`` mapping, or a list of scalars that is not a ``Block``; an
    empty collection is written ``{}`` or ``[]`` either way (``_set_flow``)."""
    if isinstance(value, Mapping):
        return flow or isinstance(value, Flow)
    return flow or (
        not isinstance(value, Block)
        and not any(isinstance(v, Mapping | list | tuple) for v in value)
    )


def _build(value: Any, flow: bool = False) -> Any:
    """``value`` as ruamel.yaml nodes in the canonical style (``flow``: inside a flow node)."""
    if isinstance(value, Mapping):
        flow = _in_flow(value, flow)
        mapping = CommentedMap((_build(k, flow), _build(v, flow)) for k, v in value.items())
        _set_flow(mapping, flow)
        return mapping
    if isinstance(value, list | tuple):
        flow = _in_flow(value, flow)
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


class _Unchanged(str):
    """The stand-in of a value that is not rewritten."""

    __slots__ = ()


_Representer.add_representer(_Unchanged, RoundTripRepresenter.represent_str)
