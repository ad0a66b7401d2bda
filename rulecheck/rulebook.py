"""Rulebooks: YAML files of rule-based descriptions of one attention head's SAE features.

One file per head, ``L{layer}H{head}.yaml``. Loading validates every field and reports
problems as :class:`~rulecheck.errors.RulecheckError` naming the file, line and field;
dumping is deterministic, so regenerated files diff cleanly.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
import yaml.constructor
import yaml.nodes

from rulecheck.errors import RulecheckError

SCHEMA_VERSION = 1
SOURCES = ("extracted", "manual")
DIRECTIONS = ("increasing", "decreasing")
METRICS = ("f1", "precision", "recall", "spearman")
HEADER_KEYS = ("model", "sae_in", "sae_out", "corpus")
EXTRACTION_ORDER = (
    "method",
    "keys",
    "queries_per_key",
    "max_terms",
    "seed",
    "ln_scale",
    "rulecheck",
)
MEASURED_ORDER = (*METRICS, "n_test", "n_terms", "f1_by_terms")
FILE_NAME = re.compile(r"^L(\d+)H(\d+)\.ya?ml$")

_MAX_REPEATS = 100_000
_REF_KEYS = ("feature", "tokens")
_SKIPGRAM_KEYS = ("key", "query", "attn_score", "value_score", "importance")
_ABSENCE_KEYS = ("key", "query", "distractor", "attn_score", "value_score", "drop")
_COUNTING_KEYS = ("key", "direction", "threshold_count", "spearman")
_FEATURE_KEYS = (
    "feature",
    "source",
    "label",
    "skipgrams",
    "absence",
    "counting",
    "expect",
    "measured",
    "xfail",
)
_TOP_KEYS = (
    "rulecheck",
    *HEADER_KEYS,
    "fingerprints",
    "layer",
    "head",
    "extraction",
    "features",
)
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


# ---------------------------------------------------------------------------- the schema


@dataclass
class TokenRef:
    """An SAE feature, the tokens that typically fire it, or both."""

    feature: int | None = None
    tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.feature is not None:
            out["feature"] = self.feature
        if self.tokens:
            out["tokens"] = list(self.tokens)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenRef:
        return _parse_ref(_Ctx(), data, "")


@dataclass
class SkipGram:
    """Query ``query`` attends to key ``key`` and writes the feature: ``[key] ... [query]``."""

    key: TokenRef
    query: TokenRef
    attn_score: float | None = None
    value_score: float | None = None
    importance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_dict(), "query": self.query.to_dict()}
        _put_optional(out, attn_score=self.attn_score, value_score=self.value_score)
        _put_optional(out, importance=self.importance)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipGram:
        return _parse_skipgram(_Ctx(), data, "")


@dataclass
class AbsenceRule:
    """A skip-gram that is suppressed when ``distractor`` is also in the context."""

    key: TokenRef
    query: TokenRef
    distractor: TokenRef
    attn_score: float | None = None
    value_score: float | None = None
    drop: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key.to_dict(),
            "query": self.query.to_dict(),
            "distractor": self.distractor.to_dict(),
        }
        _put_optional(out, attn_score=self.attn_score, value_score=self.value_score)
        if self.drop:
            out["drop"] = list(self.drop)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AbsenceRule:
        return _parse_absence(_Ctx(), data, "")


@dataclass
class CountingRule:
    """The feature grows (or shrinks) with the number of ``key`` tokens in the context."""

    key: TokenRef
    direction: Literal["increasing", "decreasing"] = "increasing"
    threshold_count: int | None = None
    spearman: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key.to_dict(), "direction": self.direction}
        _put_optional(out, threshold_count=self.threshold_count, spearman=self.spearman)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CountingRule:
        return _parse_counting(_Ctx(), data, "")


@dataclass
class FeatureRules:
    """Everything claimed about one output SAE feature of the head."""

    feature: int
    source: Literal["extracted", "manual"]
    label: str = ""
    skipgrams: list[SkipGram] = field(default_factory=list)
    absence: list[AbsenceRule] = field(default_factory=list)
    counting: list[CountingRule] = field(default_factory=list)
    expect: dict[str, float] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    xfail: str | None = None  # a documented claim that is expected not to hold: the reason

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "feature": self.feature,
            "source": self.source,
            "label": self.label,
            "skipgrams": [s.to_dict() for s in self.skipgrams],
        }
        if self.absence:
            out["absence"] = [a.to_dict() for a in self.absence]
        if self.counting:
            out["counting"] = [c.to_dict() for c in self.counting]
        if self.expect:
            out["expect"] = {m: self.expect[m] for m in METRICS if m in self.expect}
        if self.measured:
            out["measured"] = _ordered(self.measured, MEASURED_ORDER)
        if self.xfail is not None:
            out["xfail"] = self.xfail
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureRules:
        return _parse_feature(_Ctx(), data, "")


@dataclass
class Rulebook:
    """The rules for every described output feature of one attention head."""

    layer: int
    head: int
    features: list[FeatureRules] = field(default_factory=list)
    model: str | None = None
    sae_in: str | None = None
    sae_out: str | None = None
    corpus: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    extraction: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @property
    def name(self) -> str:
        """``L{layer}H{head}``, the head's name and the file's stem."""
        return f"L{self.layer}H{self.head}"

    def feature(self, feature_id: int) -> FeatureRules:
        """The entry for ``feature_id``; ``KeyError`` if there is none."""
        for entry in self.features:
            if entry.feature == feature_id:
                return entry
        raise KeyError(feature_id)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rulecheck": self.schema}
        for key in HEADER_KEYS:
            _put_optional(out, **{key: getattr(self, key)})
        if self.fingerprints:
            out["fingerprints"] = _ordered(self.fingerprints, HEADER_KEYS)
        out["layer"] = self.layer
        out["head"] = self.head
        if self.extraction:
            out["extraction"] = _ordered(self.extraction, EXTRACTION_ORDER)
        out["features"] = [f.to_dict() for f in self.features]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rulebook:
        """Validate ``data`` (as read from YAML); problems raise ``RulecheckError``."""
        return _parse_rulebook(_Ctx(), data)


def _put_optional(out: dict[str, Any], **values: Any) -> None:
    out.update({k: v for k, v in values.items() if v is not None})


def _ordered(data: Mapping[Any, Any], order: Iterable[str]) -> dict[Any, Any]:
    """``data`` with the keys of ``order`` first, the rest sorted; nested mappings sorted."""
    order = tuple(order)
    keys = [k for k in order if k in data]
    keys += sorted((k for k in data if k not in order), key=_sort_key)
    return {k: _sorted_plain(data[k]) for k in keys}


def _sorted_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _ordered(value, ())
    if isinstance(value, list):
        return [_sorted_plain(v) for v in value]
    return value


def _sort_key(key: Any) -> tuple[int, Any]:
    if isinstance(key, int | float) and not isinstance(key, bool):
        return (0, key)
    return (1, str(key))


# ---------------------------------------------------------------------------- validation


@dataclass
class _Ctx:
    """Where values came from: the file and the line of every field path."""

    file: str | None = None
    lines: dict[str, int] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)

    def line(self, path: str, *, key: bool = False) -> int | None:
        if key and path in self.key_lines:
            return self.key_lines[path]
        while path not in self.lines:
            if not path:
                return None
            path = _parent(path)
        return self.lines[path]

    def fail(self, path: str, what: str, fix: str | None = None, *, key: bool = False) -> NoReturn:
        raise RulecheckError(
            what, file=self.file, line=self.line(path, key=key), field=path or None, fix=fix
        )


def _parent(path: str) -> str:
    match = re.search(r"(\.[^.\[\]]*|\[[^\[\]]*\])$", path)
    return path[: match.start()] if match else ""


def _join(path: str, key: Any) -> str:
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _describe(value: Any) -> str:
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


def _mapping(
    ctx: _Ctx, value: Any, path: str, known: tuple[str, ...], required: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        ctx.fail(path, f"expected a mapping, got {_describe(value)}", "write `key: value` lines")
    for key in value:
        if key not in known:
            ctx.fail(_join(path, key), "unknown key", _suggest(key, known), key=True)
    for key in required:
        if key not in value:
            fix = _REQUIRED_FIX.get(key, f"add `{key}:` to {path or 'the file'}")
            ctx.fail(_join(path, key), f"missing required field `{key}`", fix)
    return value


_REQUIRED_FIX = {
    "source": "add `source: manual` for a hand-written entry (or `source: extracted`)",
    "layer": "add `layer: N` (the head's layer, from 0)",
    "head": "add `head: N` (the head's index in its layer, from 0)",
}


def _int(ctx: _Ctx, value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.fail(path, f"expected an integer, got {_describe(value)}", "write a whole number")
    if value < minimum:
        ctx.fail(path, f"must be >= {minimum}, got {value}", f"use a number >= {minimum}")
    return value


def _opt_int(ctx: _Ctx, data: Mapping[str, Any], key: str, path: str) -> int | None:
    value = data.get(key)
    return None if value is None else _int(ctx, value, _join(path, key))


def _float(
    ctx: _Ctx,
    value: Any,
    path: str,
    bounds: tuple[float, float] | None = None,
    *,
    allow_nan: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.fail(path, f"expected a number, got {_describe(value)}", "write a number like 0.5")
    number = float(value)
    if math.isnan(number):
        if not allow_nan:
            ctx.fail(path, "expected a number, got .nan", "write a finite number")
        return number
    if math.isinf(number):
        ctx.fail(path, f"expected a finite number, got {number}", "write a finite number")
    if bounds is not None and not bounds[0] <= number <= bounds[1]:
        lo, hi = bounds
        ctx.fail(
            path, f"must be in [{lo:g}, {hi:g}], got {number:g}", f"use a value in [{lo:g}, {hi:g}]"
        )
    return number


def _opt_float(ctx: _Ctx, data: Mapping[str, Any], key: str, path: str) -> float | None:
    value = data.get(key)
    return None if value is None else _float(ctx, value, _join(path, key))


def _str(ctx: _Ctx, value: Any, path: str) -> str:
    if not isinstance(value, str):
        ctx.fail(path, f"expected a string, got {_describe(value)}", "put it in quotes")
    return value


def _opt_str(ctx: _Ctx, data: Mapping[str, Any], key: str, path: str) -> str | None:
    value = data.get(key)
    return None if value is None else _str(ctx, value, _join(path, key))


def _list(ctx: _Ctx, value: Any, path: str, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        fix = f"write a list of {what}" + (f', e.g. ["{value}"]' if isinstance(value, str) else "")
        ctx.fail(path, f"expected a list of {what}, got {_describe(value)}", fix)
    return value


def _choice(ctx: _Ctx, value: Any, path: str, choices: tuple[str, ...]) -> Any:
    if value not in choices or not isinstance(value, str):
        listing = " or ".join(choices)
        ctx.fail(path, f"must be {listing}, got {_describe(value)}", f"write {listing}")
    return value


def _parse_ref(ctx: _Ctx, value: Any, path: str) -> TokenRef:
    data = _mapping(ctx, value, path, _REF_KEYS)
    feature = _opt_int(ctx, data, "feature", path)
    tokens_path = _join(path, "tokens")
    tokens = [
        _str(ctx, t, f"{tokens_path}[{i}]")
        for i, t in enumerate(_list(ctx, data.get("tokens"), tokens_path, "strings"))
    ]
    if feature is None and not tokens:
        ctx.fail(path, "a reference needs `feature` or `tokens`", 'write e.g. {tokens: [" then"]}')
    return TokenRef(feature=feature, tokens=tokens)


def _parse_skipgram(ctx: _Ctx, value: Any, path: str) -> SkipGram:
    data = _mapping(ctx, value, path, _SKIPGRAM_KEYS, ("key", "query"))
    return SkipGram(
        key=_parse_ref(ctx, data["key"], _join(path, "key")),
        query=_parse_ref(ctx, data["query"], _join(path, "query")),
        attn_score=_opt_float(ctx, data, "attn_score", path),
        value_score=_opt_float(ctx, data, "value_score", path),
        importance=_opt_float(ctx, data, "importance", path),
    )


def _parse_absence(ctx: _Ctx, value: Any, path: str) -> AbsenceRule:
    data = _mapping(ctx, value, path, _ABSENCE_KEYS, ("key", "query", "distractor"))
    drop_path = _join(path, "drop")
    drop = _list(ctx, data.get("drop"), drop_path, "numbers")
    return AbsenceRule(
        key=_parse_ref(ctx, data["key"], _join(path, "key")),
        query=_parse_ref(ctx, data["query"], _join(path, "query")),
        distractor=_parse_ref(ctx, data["distractor"], _join(path, "distractor")),
        attn_score=_opt_float(ctx, data, "attn_score", path),
        value_score=_opt_float(ctx, data, "value_score", path),
        drop=[_float(ctx, d, f"{drop_path}[{i}]") for i, d in enumerate(drop)],
    )


def _parse_counting(ctx: _Ctx, value: Any, path: str) -> CountingRule:
    data = _mapping(ctx, value, path, _COUNTING_KEYS, ("key",))
    direction = data.get("direction", "increasing")
    spearman = data.get("spearman")
    return CountingRule(
        key=_parse_ref(ctx, data["key"], _join(path, "key")),
        direction=_choice(ctx, direction, _join(path, "direction"), DIRECTIONS),
        threshold_count=_opt_int(ctx, data, "threshold_count", path),
        spearman=None
        if spearman is None
        else _float(ctx, spearman, _join(path, "spearman"), (-1.0, 1.0)),
    )


def _metric_bounds(metric: str) -> tuple[float, float]:
    return (-1.0, 1.0) if metric == "spearman" else (0.0, 1.0)


def _parse_expect(ctx: _Ctx, value: Any, path: str) -> dict[str, float]:
    if value is None:
        return {}
    data = _mapping(ctx, value, path, METRICS)
    return {
        m: _float(ctx, data[m], _join(path, m), _metric_bounds(m)) for m in METRICS if m in data
    }


def _parse_measured(ctx: _Ctx, value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        ctx.fail(path, f"expected a mapping, got {_describe(value)}", "write `metric: value` lines")
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = _join(path, key)
        if not isinstance(key, str):
            ctx.fail(sub, f"keys must be strings, got {_describe(key)}", "rename the key", key=True)
        if key in METRICS and item is not None:
            out[key] = _float(ctx, item, sub, _metric_bounds(key), allow_nan=True)
        elif key in ("n_test", "n_terms") and item is not None:
            out[key] = _int(ctx, item, sub)
        elif key == "f1_by_terms" and item is not None:
            out[key] = _parse_f1_by_terms(ctx, item, sub)
        else:
            out[key] = item
    return out


def _parse_f1_by_terms(ctx: _Ctx, value: Any, path: str) -> dict[int, float]:
    if not isinstance(value, Mapping):
        ctx.fail(path, f"expected a mapping, got {_describe(value)}", "write `n_terms: f1` lines")
    out = {}
    for key, item in value.items():
        sub = _join(path, key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            ctx.fail(sub, f"keys must be term counts, got {_describe(key)}", "use 4: 0.5", key=True)
        out[key] = _float(ctx, item, sub, (0.0, 1.0), allow_nan=True)
    return out


def _parse_free(ctx: _Ctx, value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        ctx.fail(path, f"expected a mapping, got {_describe(value)}", "write `key: value` lines")
    for key in value:
        if not isinstance(key, str):
            sub = _join(path, key)
            ctx.fail(sub, f"keys must be strings, got {_describe(key)}", "quote the key", key=True)
    return dict(value)


def _parse_fingerprints(ctx: _Ctx, value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    data = _mapping(ctx, value, path, HEADER_KEYS)
    return {k: _str(ctx, data[k], _join(path, k)) for k in HEADER_KEYS if k in data}


def _parse_feature(ctx: _Ctx, value: Any, path: str) -> FeatureRules:
    data = _mapping(ctx, value, path, _FEATURE_KEYS, ("feature", "source"))
    label = data.get("label")

    def rules(key: str, parse: Any) -> list[Any]:
        sub = _join(path, key)
        items = _list(ctx, data.get(key), sub, "rules")
        return [parse(ctx, item, f"{sub}[{i}]") for i, item in enumerate(items)]

    return FeatureRules(
        feature=_int(ctx, data["feature"], _join(path, "feature")),
        source=_choice(ctx, data["source"], _join(path, "source"), SOURCES),
        label="" if label is None else _str(ctx, label, _join(path, "label")),
        skipgrams=rules("skipgrams", _parse_skipgram),
        absence=rules("absence", _parse_absence),
        counting=rules("counting", _parse_counting),
        expect=_parse_expect(ctx, data.get("expect"), _join(path, "expect")),
        measured=_parse_measured(ctx, data.get("measured"), _join(path, "measured")),
        xfail=_opt_str(ctx, data, "xfail", path),
    )


def _parse_schema(ctx: _Ctx, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        ctx.fail(
            "", f"top level must be a mapping, got {_describe(value)}", "start with `rulecheck: 1`"
        )
    if "rulecheck" not in value:
        ctx.fail(
            "",
            "not a rulebook: no top-level `rulecheck:` key",
            f"add `rulecheck: {SCHEMA_VERSION}` as the first line",
        )
    version = value["rulecheck"]
    if type(version) is not int or version != SCHEMA_VERSION:
        ctx.fail(
            "rulecheck",
            f"unsupported schema version {_describe(version)}",
            f"this rulecheck reads `rulecheck: {SCHEMA_VERSION}`",
        )
    return _mapping(ctx, value, "", _TOP_KEYS, ("layer", "head"))


def _parse_rulebook(ctx: _Ctx, value: Any) -> Rulebook:
    data = _parse_schema(ctx, value)
    features = [
        _parse_feature(ctx, item, f"features[{i}]")
        for i, item in enumerate(_list(ctx, data.get("features"), "features", "features"))
    ]
    _check_unique(ctx, features)
    return Rulebook(
        layer=_int(ctx, data["layer"], "layer"),
        head=_int(ctx, data["head"], "head"),
        features=features,
        **{k: _opt_str(ctx, data, k, "") for k in HEADER_KEYS},
        fingerprints=_parse_fingerprints(ctx, data.get("fingerprints"), "fingerprints"),
        extraction=_parse_free(ctx, data.get("extraction"), "extraction"),
        schema=SCHEMA_VERSION,
    )


def _check_unique(ctx: _Ctx, features: list[FeatureRules]) -> None:
    seen: dict[int, int] = {}
    for i, entry in enumerate(features):
        if entry.feature in seen:
            first = ctx.line(f"features[{seen[entry.feature]}].feature")
            where = f" (first at line {first})" if first is not None else ""
            ctx.fail(
                f"features[{i}].feature",
                f"duplicate feature id {entry.feature}{where}",
                "merge the two entries into one",
            )
        seen[entry.feature] = i


def _check_file_name(ctx: _Ctx, rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match is None:
        return
    layer, head = int(match[1]), int(match[2])
    if (layer, head) != (rulebook.layer, rulebook.head):
        ctx.fail(
            "layer" if layer != rulebook.layer else "head",
            f"file name says L{layer}H{head} but the file has layer {rulebook.layer}, "
            f"head {rulebook.head}",
            f"rename the file to {rulebook.name}{path.suffix} or correct layer/head",
        )


# ---------------------------------------------------------------------------- YAML in


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` (no dot) as a float, as YAML 1.2 does."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper with rulecheck's float format, flow refs and no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))

_PLAIN_TYPES = (type(None), bool, int, float, str)
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


@dataclass
class _Walk:
    """Turns a composed YAML node tree into plain values, recording each field's line."""

    ctx: _Ctx
    constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor
    )
    seen: set[int] = field(default_factory=set)
    repeats: int = 0
    active: set[int] = field(default_factory=set)

    def value(self, node: yaml.nodes.Node, path: str) -> Any:
        self.ctx.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.seen:
            self.repeats += 1
            if self.repeats > _MAX_REPEATS:
                self.ctx.fail(path, "too many YAML nodes from aliases", "write the values out")
        self.seen.add(id(node))
        if id(node) in self.active:
            self.ctx.fail(path, "recursive YAML alias", "write the value out instead of an alias")
        if isinstance(node, yaml.nodes.ScalarNode):
            return self.scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.nodes.SequenceNode) and node.tag == _SEQ_TAG:
                return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            if isinstance(node, yaml.nodes.MappingNode) and node.tag == _MAP_TAG:
                return self.mapping(node, path)
        finally:
            self.active.discard(id(node))
        self.ctx.fail(path, f"unsupported YAML tag {node.tag}", "remove the tag")

    def mapping(self, node: yaml.nodes.MappingNode, path: str) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            sub = _join(path, key)
            if key in out:
                first = self.ctx.key_lines.get(sub)
                self.ctx.lines[sub] = key_node.start_mark.line + 1
                self.ctx.fail(sub, f"duplicate key (first at line {first})", "keep only one")
            self.ctx.key_lines[sub] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, sub)
        return out

    def key(self, node: yaml.nodes.Node, path: str) -> Any:
        line = node.start_mark.line + 1
        if node.tag == "tag:yaml.org,2002:merge":
            self.ctx.lines.setdefault(path, line)
            self.ctx.fail(path, "YAML merge keys (<<) are not supported", "write the keys out")
        if not isinstance(node, yaml.nodes.ScalarNode):
            self.ctx.lines.setdefault(path, line)
            self.ctx.fail(path, "mapping keys must be plain scalars", "use a string key")
        key = self.scalar(node, path)
        try:
            hash(key)
        except TypeError:
            self.ctx.fail(path, "mapping keys must be plain scalars", "use a string key")
        return key

    def scalar(self, node: yaml.nodes.ScalarNode, path: str) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            what = f"cannot read value {node.value[:40]!r} as {node.tag}: {_first_line(exc)}"
            self.ctx.fail(path, what, "put it in quotes or correct it")
        if not isinstance(value, _PLAIN_TYPES):
            self.ctx.fail(
                path,
                f"unsupported {type(value).__name__} value {node.value[:40]!r}",
                "put it in quotes",
            )
        return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RulecheckError(
            "no such file", file=path, fix="check the path, or run `rulecheck extract`"
        ) from None
    except IsADirectoryError:
        raise RulecheckError("is a directory, not a rulebook file", file=path) from None
    except OSError as exc:
        raise RulecheckError(f"cannot read: {exc.strerror or exc}", file=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RulecheckError(
            "not UTF-8 text", file=path, line=line, fix="save the file as UTF-8"
        ) from None


def _compose(text: str, file: str) -> yaml.nodes.Node:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what += f" ({exc.context}{at})"
        raise RulecheckError(
            f"not valid YAML: {what}",
            file=file,
            line=mark.line + 1 if mark is not None else None,
            fix="correct the YAML syntax",
        ) from None
    except yaml.YAMLError as exc:
        line = text.count("\n", 0, getattr(exc, "position", 0) or 0) + 1
        raise RulecheckError(
            f"not valid YAML: {_first_line(exc)}", file=file, line=line, fix="correct the file"
        ) from None
    except RecursionError:
        raise RulecheckError("YAML nested too deeply", file=file, fix="flatten the file") from None
    if node is None:
        raise RulecheckError(
            "empty file, not a rulebook",
            file=file,
            line=1,
            fix=f"start with `rulecheck: {SCHEMA_VERSION}`, `layer:`, `head:`, `features:`",
        )
    return node


def parse_rulebook(text: str, file: str | Path = "<string>") -> Rulebook:
    """Validate the YAML ``text`` of a rulebook; ``file`` only names it in errors."""
    ctx = _Ctx(file=str(file))
    node = _compose(text, ctx.file)
    try:
        data = _Walk(ctx).value(node, "")
    except RecursionError:
        raise RulecheckError("YAML nested too deeply", file=file, fix="flatten the file") from None
    rulebook = _parse_rulebook(ctx, data)
    _check_file_name(ctx, rulebook, Path(str(file)))
    return rulebook


def load_rulebook(path: str | Path) -> Rulebook:
    """Read and validate the rulebook at ``path``; every problem is a ``RulecheckError``."""
    path = Path(path)
    return parse_rulebook(_read_text(path), path)


_TOP_KEY_LINE = re.compile(r"""^(?:rulecheck|"rulecheck"|'rulecheck')[ \t]*:(?:[ \t]|$)""", re.M)


def is_rulebook_file(path: str | Path) -> bool:
    """Whether ``path`` is a YAML file with a top-level ``rulecheck:`` key; never raises."""
    try:
        path = Path(path)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            return False
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except (OSError, ValueError):
        return False
    return _TOP_KEY_LINE.search(text) is not None


# ---------------------------------------------------------------------------- YAML out


class _FlowMap(dict):
    """A mapping written on one line: ``{feature: 1234, tokens: [If]}``."""


def _float_text(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = f"{value:.6g}"
    if "e" in text and "." not in text:
        return text.replace("e", ".0e")
    if "e" not in text and "." not in text:
        return text + ".0"
    return text


def round_float(value: float) -> float:
    """``value`` as it reads back from a dumped rulebook (6 significant digits)."""
    return float(_float_text(value)) if math.isfinite(value) else value


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.nodes.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:float", _float_text(value))


_LINE_BREAKS = frozenset("\n\r\x85\u2028\u2029")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.nodes.ScalarNode:
    style = '"' if _LINE_BREAKS.intersection(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.nodes.SequenceNode:
    flow = all(not isinstance(v, dict | list) for v in value)
    return dumper.represent_sequence(_SEQ_TAG, value, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, value: dict[Any, Any]) -> yaml.nodes.MappingNode:
    return dumper.represent_mapping(_MAP_TAG, value.items(), flow_style=False)


def _represent_flow(dumper: yaml.SafeDumper, value: _FlowMap) -> yaml.nodes.MappingNode:
    return dumper.represent_mapping(_MAP_TAG, value.items(), flow_style=True)


_Dumper.add_representer(float, _represent_float)
_Dumper.add_multi_representer(float, _represent_float)
_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, _represent_dict)
_Dumper.add_representer(_FlowMap, _represent_flow)


def _flow_refs(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for key in ("key", "query", "distractor"):
            if key in rule:
                rule[key] = _FlowMap(rule[key])


def dump_rulebook(rulebook: Rulebook) -> str:
    """The rulebook as YAML text; equal rulebooks give byte-identical text."""
    data = rulebook.to_dict()
    for entry in data["features"]:
        for key in ("skipgrams", "absence", "counting"):
            _flow_refs(entry.get(key, []))
    return yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=4096,
    )


def _check_name_matches(rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match and (int(match[1]), int(match[2])) != (rulebook.layer, rulebook.head):
        raise RulecheckError(
            f"rulebook for {rulebook.name} cannot be saved as {path.name}",
            file=path,
            fix=f"save it as {rulebook.name}{path.suffix}",
        )


def save_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Write ``rulebook`` to ``path`` atomically (temp file, fsync, rename); return the path."""
    path = Path(path)
    _check_name_matches(rulebook, path)
    data = dump_rulebook(rulebook).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- regeneration


def merge_manual(new: Rulebook, old: Rulebook | None) -> Rulebook:
    """``new`` plus every ``source: manual`` feature of ``old``, which wins on equal ids."""
    if old is None:
        return replace(new, features=sorted(new.features, key=lambda f: f.feature))
    if (old.layer, old.head) != (new.layer, new.head):
        raise RulecheckError(
            f"cannot merge rules for {new.name} into a rulebook for {old.name}",
            fix="write each head to its own L{layer}H{head}.yaml",
        )
    manual = {f.feature: f for f in old.features if f.source == "manual"}
    kept = [f for f in new.features if f.feature not in manual]
    header = {k: getattr(new, k) or getattr(old, k) for k in HEADER_KEYS}
    return replace(
        new,
        features=sorted([*kept, *manual.values()], key=lambda f: f.feature),
        fingerprints=new.fingerprints or dict(old.fingerprints),
        **header,
    )


def write_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Save ``rulebook`` at ``path``, keeping the manual features of the file already there."""
    path = Path(path)
    old = None
    if path.exists():
        try:
            old = load_rulebook(path)
        except RulecheckError as exc:
            fix = f"{exc.fix}; " if exc.fix else ""
            raise RulecheckError(
                exc.what,
                file=exc.file,
                line=exc.line,
                field=exc.field,
                fix=f"{fix}the existing file was left as it is, correct or move it",
            ) from None
    return save_rulebook(merge_manual(rulebook, old), path)
