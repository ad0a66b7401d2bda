"""The rulebook schema, written once: dataclass fields carry how they are read and written.

A schema class is a dataclass whose fields are made with :func:`entry`; an optional method
``__schema_check__(where, path)`` checks what no single field can. The fields, in order,
are the mapping's allowed keys and the order they are written in; each field's ``parse``
validates a plain value (as read from YAML) and reports a problem as
:class:`~rulecheck.errors.InvalidRulebook` naming the file, line and field path, and its
``dump``/``omit`` say how (and whether) it is written. :func:`parse` and :func:`dump` mirror
each other. A *spread* field holds a mapping whose keys stand in the parent mapping itself
(a feature's rule lists, one key per registered rule kind).

Nothing here reads or writes files: the YAML shell (``rulecheck.rulebook``) hands in plain
values and the line of every field path (:class:`Where`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any, NoReturn, TypeVar

from rulecheck.errors import InvalidRulebook

T = TypeVar("T")
Parse = Callable[["Where", Any, str], Any]
METADATA = "rulecheck"


# ---------------------------------------------------------------------------- where values came from


@dataclass
class Where:
    """The file a value came from and the line of every field path (filled by the reader)."""

    file: str | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    key_lines: dict[str, int] = dataclasses.field(default_factory=dict)
    measured: bool = True  # whether measured fields may be given (format 1 books)
    refs: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # the book's table
    ref_cache: dict[int, Any] = dataclasses.field(default_factory=dict)  # references read by id

    def line(self, path: str, *, key: bool = False) -> int | None:
        if key and path in self.key_lines:
            return self.key_lines[path]
        while path not in self.lines:
            if not path:
                return None
            path = parent(path)
        return self.lines[path]

    def fail(self, path: str, what: str, fix: str | None = None, *, key: bool = False) -> NoReturn:
        raise InvalidRulebook(
            what, file=self.file, line=self.line(path, key=key), field=path or None, fix=fix
        )


def parent(path: str) -> str:
    match = re.search(r"(\.[^.\[\]]*|\[[^\[\]]*\])$", path)
    return path[: match.start()] if match else ""


def join(path: str, key: Any) -> str:
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def describe(value: Any) -> str:
    """How a value is named in an error: ``string 'x'``, ``integer 3``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _suggest(key: Any, known: Iterable[str]) -> str:
    known = list(known)
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(str(key).lower(), list(by_lower), n=1, cutoff=0.5)
    listing = ", ".join(known)
    if close:
        return f"did you mean `{by_lower[close[0]]}`? known keys: {listing}"
    return f"remove it; known keys: {listing}"


# ---------------------------------------------------------------------------- JSON Schema hints

Hint = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
HINT = "json_schema"  # the attribute of a parser that says what it takes, in JSON Schema


def hinted(parse: Parse, hint: Hint) -> Parse:
    """``parse``, marked with what it takes as JSON Schema (a mapping, or a function that
    makes one when asked): the editors' schema is made from these (``json_schema``)."""
    setattr(parse, HINT, hint)
    return parse


def json_hint(parse: Parse | None) -> dict[str, Any]:
    """What ``parse`` takes as JSON Schema; empty when it does not say."""
    hint = getattr(parse, HINT, None)
    if callable(hint):
        hint = hint()
    return dict(hint or {})


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


# ---------------------------------------------------------------------------- value checks


def mapping(
    where: Where,
    value: Any,
    path: str,
    known: tuple[str, ...],
    required: Mapping[str, str | None] | tuple[str, ...] = (),
) -> Mapping[str, Any]:
    """``value`` as a mapping with only ``known`` keys and every ``required`` one (a mapping
    of required keys gives each one's fix)."""
    if not isinstance(value, Mapping):
        where.fail(path, f"expected a mapping, got {describe(value)}", "write `key: value` lines")
    for key in value:
        if key not in known:
            where.fail(join(path, key), "unknown key", _suggest(key, known), key=True)
    fixes = required if isinstance(required, Mapping) else dict.fromkeys(required)
    for key, fix in fixes.items():
        if key not in value:
            fix = fix or f"add `{key}:` to {path or 'the file'}"
            where.fail(join(path, key), f"missing required field `{key}`", fix)
        if value[key] is None:
            fix = fix or f"give `{key}:` a value"
            where.fail(join(path, key), f"required field `{key}` is empty", fix)
    return value


def integer(minimum: int = 0) -> Parse:
    def parse(where: Where, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            where.fail(path, f"expected an integer, got {describe(value)}", "write a whole number")
        if value < minimum:
            where.fail(path, f"must be >= {minimum}, got {value}", f"use a number >= {minimum}")
        return value

    return hinted(parse, {"type": "integer", "minimum": minimum})


def number(bounds: tuple[float, float] | None = None, *, allow_nan: bool = False) -> Parse:
    def parse(where: Where, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            where.fail(path, f"expected a number, got {describe(value)}", "write a number like 0.5")
        x = float(value)
        if math.isnan(x):
            if not allow_nan:
                where.fail(path, "expected a number, got .nan", "write a finite number")
            return x
        if math.isinf(x):
            where.fail(path, f"expected a finite number, got {x}", "write a finite number")
        if bounds is not None and not bounds[0] <= x <= bounds[1]:
            lo, hi = bounds
            where.fail(
                path, f"must be in [{lo:g}, {hi:g}], got {x:g}", f"use a value in [{lo:g}, {hi:g}]"
            )
        return x

    hint: dict[str, Any] = {"type": "number"}
    if bounds is not None:
        hint.update(minimum=_json_number(bounds[0]), maximum=_json_number(bounds[1]))
    return hinted(parse, hint)


def text(where: Where, value: Any, path: str) -> str:
    if not isinstance(value, str):
        where.fail(path, f"expected a string, got {describe(value)}", "put it in quotes")
    return value


def choice(*choices: str) -> Parse:
    def parse(where: Where, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            listing = " or ".join(choices)
            where.fail(path, f"must be {listing}, got {describe(value)}", f"write {listing}")
        return value

    return hinted(parse, {"enum": list(choices)})


def items(where: Where, value: Any, path: str, what: str) -> list[Any]:
    """``value`` as a list (null reads as empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        fix = f"write a list of {what}" + (f', e.g. ["{value}"]' if isinstance(value, str) else "")
        where.fail(path, f"expected a list of {what}, got {describe(value)}", fix)
    return value


def list_of(item: Parse, what: str) -> Parse:
    def parse(where: Where, value: Any, path: str) -> list[Any]:
        return [
            item(where, v, f"{path}[{i}]") for i, v in enumerate(items(where, value, path, what))
        ]

    return hinted(parse, lambda: {"type": "array", **_items(json_hint(item))})


def _items(hint: dict[str, Any]) -> dict[str, Any]:
    return {"items": hint} if hint else {}


def free_mapping(where: Where, value: Any, path: str) -> dict[str, Any]:
    """Any mapping with string keys (values as written)."""
    if not isinstance(value, Mapping):
        where.fail(path, f"expected a mapping, got {describe(value)}", "write `key: value` lines")
    for key in value:
        if not isinstance(key, str):
            sub = join(path, key)
            where.fail(sub, f"keys must be strings, got {describe(key)}", "quote the key", key=True)
    return dict(value)


hinted(text, {"type": "string"})
hinted(free_mapping, {"type": "object"})


# ---------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Spec:
    """How one field of a schema class is read and written."""

    parse: Parse
    key: str | None = None  # the key in the file, when it is not the field's name
    required: bool = False
    fix: str | None = None  # for a missing required field
    dump: Callable[[Any], Any] = lambda v: plain(v)
    omit: Callable[[Any], bool] = lambda v: v is None
    spread: Callable[[], Mapping[str, Spec]] | None = None  # keys of the parent, by name
    flow: bool = False  # written on one line: ``{feature: 3, tokens: [If]}``
    measured: bool = False  # a measurement, written beside the book, not in it
    doc: str | None = None  # the description editors show (``json_schema``)
    hint: Hint | None = None  # JSON Schema beyond what ``parse`` says of itself


def entry(
    parse: Parse,
    *,
    key: str | None = None,
    required: bool = False,
    fix: str | None = None,
    dump: Callable[[Any], Any] | None = None,
    omit: Callable[[Any], bool] | None = None,
    spread: Callable[[], Mapping[str, Spec]] | None = None,
    flow: bool = False,
    measured: bool = False,
    doc: str | None = None,
    hint: Hint | None = None,
    **field_kw: Any,
) -> Any:
    """A dataclass field that the schema reads with ``parse`` and writes with ``dump`` unless
    ``omit(value)``; ``field_kw`` are ``dataclasses.field``'s (``default``, ...). A
    ``measured`` field is a measurement: the book's report holds it, not the book. ``doc``
    describes it to editors, and ``hint`` adds to the JSON Schema ``parse`` gives."""
    spec = Spec(
        parse, key, required, fix, spread=spread, flow=flow, measured=measured, doc=doc, hint=hint
    )
    if dump is not None:
        spec = dataclasses.replace(spec, dump=dump)
    if omit is not None:
        spec = dataclasses.replace(spec, omit=omit)
    return dataclasses.field(metadata={METADATA: spec}, **field_kw)


def _fields(cls: type) -> tuple[tuple[str, Spec], ...]:
    return tuple(
        (f.name, f.metadata[METADATA]) for f in dataclasses.fields(cls) if METADATA in f.metadata
    )


# typed as a function of any class: mypy takes no ``type[T]`` for the cache's Hashable
_specs: Callable[[type], tuple[tuple[str, Spec], ...]] = functools.cache(_fields)


def identity(obj: Any) -> Any:
    """What ``obj`` holds as a book writes it (measurements left out), as a hashable value:
    two claims are the same claim when their identities are equal."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = (identity(getattr(obj, n)) for n, spec in _specs(type(obj)) if not spec.measured)
        return (type(obj).__name__, *fields)
    if isinstance(obj, list | tuple):
        return tuple(identity(v) for v in obj)
    if isinstance(obj, Mapping):
        return tuple(sorted((k, identity(v)) for k, v in obj.items()))
    return obj


def keys(cls: type, measured: bool | None = None) -> tuple[str, ...]:
    """The keys a schema class allows, in the order they are written (only the measured
    ones, or none of them, when ``measured`` says)."""
    out: list[str] = []
    for name, spec in _specs(cls):
        if measured is None or spec.measured == measured or (measured and spec.spread):
            out += list(spec.spread()) if spec.spread else [spec.key or name]
    return tuple(out)


def parse(cls: type[T], where: Where, value: Any, path: str = "") -> T:
    """An instance of ``cls`` from a plain mapping; every problem is ``InvalidRulebook``."""
    required = {spec.key or name: spec.fix for name, spec in _specs(cls) if spec.required}
    if not where.measured and isinstance(value, Mapping):
        measurements = set(keys(cls, measured=True)) - set(keys(cls, measured=False))
        for key in value:
            if key in measurements:
                where.fail(
                    join(path, key),
                    f"`{key}` is a measurement, not part of a format-2 rulebook",
                    "remove it: extraction writes measurements to the .measured.json file "
                    "beside the book",
                    key=True,
                )
    data = mapping(where, value, path, keys(cls), required)
    kwargs: dict[str, Any] = {}
    for name, spec in _specs(cls):
        if spec.spread is not None:
            kwargs[name] = {
                k: sub.parse(where, data[k], join(path, k))
                for k, sub in spec.spread().items()
                if data.get(k) is not None
            }
            continue
        key = spec.key or name
        if data.get(key) is not None:
            kwargs[name] = spec.parse(where, data[key], join(path, key))
    obj = cls(**kwargs)
    check = getattr(obj, "__schema_check__", None)
    if check is not None:
        check(where, path)
    return obj


class Record:
    """Base of the schema classes: ``to_dict`` and ``from_dict`` mirror each other."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as written to a file."""
        return dump(self)

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """An instance from plain values; problems are ``InvalidRulebook`` naming the field."""
        return parse(cls, Where(), data)


def parser(cls: type[T]) -> Parse:
    """``parse`` for ``cls`` as a field parser (nested schema classes)."""

    def read(where: Where, value: Any, path: str) -> T:
        return parse(cls, where, value, path)

    return hinted(read, lambda: json_schema(cls))


def json_field(spec: Spec) -> dict[str, Any]:
    """One field's JSON Schema: its description, what its parser says, then its hint."""
    out: dict[str, Any] = {"description": spec.doc} if spec.doc else {}
    out.update(json_hint(spec.parse))
    hint = spec.hint() if callable(spec.hint) else spec.hint
    out.update(hint or {})
    return out


def json_schema(cls: type, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON Schema of what a book holds of schema class ``cls`` (measurements left out;
    fields named in ``skip`` too): a mapping of its keys, no others. The class's
    ``__json_schema__`` adds what its ``__schema_check__`` checks."""
    skip = set(skip)
    required: list[str] = []
    properties: dict[str, dict[str, Any]] = {}
    for name, spec in _specs(cls):
        if spec.measured or name in skip:
            continue
        if spec.spread is not None:
            properties.update((k, json_field(sub)) for k, sub in spec.spread().items())
            continue
        key = spec.key or name
        properties[key] = json_field(spec)
        if spec.required:
            required.append(key)
    out: dict[str, Any] = {"type": "object"}
    if required:
        out["required"] = required
    out.update(additionalProperties=False, properties=properties)
    out.update(getattr(cls, "__json_schema__", {}))
    return out


def dump(obj: Any, measured: bool | None = None) -> dict[str, Any]:
    """``obj`` as plain values, keys in field order, omitted fields left out; with
    ``measured`` False only what a book holds, with True only the measurements."""
    out: dict[str, Any] = {}
    for name, spec in _specs(type(obj)):
        value = getattr(obj, name)
        if spec.spread is not None:
            for k, sub in spec.spread().items():
                if k in value and not sub.omit(value[k]):
                    out[k] = sub.dump(value[k])
        elif measured is not None and spec.measured != measured:
            continue
        elif not spec.omit(value):
            plain = spec.dump(value)
            out[spec.key or name] = Flow(plain) if spec.flow else plain
    return out


def plain(value: Any) -> Any:
    """Schema objects (and lists of them) as plain values; anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class Flow(dict):
    """A mapping to be written on one line."""


class Block(list):
    """A list to be written one item a line, even when its items are plain values."""


def significant(x: float, digits: int = 3, *, down: bool = False) -> float:
    """``x`` rounded to ``digits`` significant digits (towards -inf when ``down``): books
    carry 3, so that re-extracting an unchanged model rewrites nothing."""
    if not math.isfinite(x) or x == 0:
        return x
    d = Decimal(repr(float(x)))
    step = Decimal(1).scaleb(d.adjusted() - digits + 1)
    return float(d.quantize(step, rounding=ROUND_FLOOR if down else ROUND_HALF_EVEN))


def ordered(data: Mapping[Any, Any], order: Iterable[str] = ()) -> dict[Any, Any]:
    """``data`` with the keys of ``order`` first, the rest sorted; nested mappings sorted."""
    order = tuple(order)
    keys_ = [k for k in order if k in data]
    keys_ += sorted((k for k in data if k not in order), key=_sort_key)
    return {k: _sorted_plain(data[k]) for k in keys_}


def _sorted_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ordered(value)
    if isinstance(value, list):
        return [_sorted_plain(v) for v in value]
    return value


def _sort_key(key: Any) -> tuple[int, Any]:
    if isinstance(key, int | float) and not isinstance(key, bool):
        return (0, key)
    return (1, str(key))
