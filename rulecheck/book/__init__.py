"""A rulebook in memory: the rules for the described output features of one attention head.

The schema of a rulebook file is these dataclasses' fields (``rulecheck.schema``) plus one key
per registered rule kind under each feature (``rulecheck.kinds``); the parsers of the fields
that are not claims, and what editors are told of them, are in ``rulecheck.book.fields``.
Reading and writing the YAML is ``rulecheck.rulebook``'s job; nothing here touches a file.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NoReturn

from rulecheck import kinds
from rulecheck import schema as sc
from rulecheck.book.fields import (
    CHECKED,
    EXTRACTION_ORDER,
    HEADER_KEYS,
    MEASURED_ORDER,
    REFS_HINT,
    expect_hint,
    extraction_hint,
    fingerprints_hint,
    parse_expect,
    parse_fingerprints,
    parse_measured,
    parse_refs,
)
from rulecheck.config import PROTOCOL, ExemplarConfig, bound_of
from rulecheck.errors import InvalidRulebook, InvalidSpec
from rulecheck.refs import RefTable

SCHEMA_VERSION = 2
VERSIONS = (1, 2)  # format 1 still loads, with a FormatWarning
SOURCES = ("extracted", "manual")
FILE_NAME = re.compile(r"^L(\d+)H(\d+)\.ya?ml$")
FEATURE_DEF, LOST_DEF = "#/$defs/feature", "#/$defs/lost_feature"


class FormatWarning(FutureWarning):
    """A rulebook in an old format: it loads, and ``rulecheck upgrade`` rewrites it."""


def _kind_specs() -> dict[str, sc.Spec]:
    """One field per registered rule kind: a list of its claims (built again only when the
    registry changed: a book asks once a feature)."""
    registered = kinds.kinds()
    cached, specs = _KIND_SPECS
    if len(cached) != len(registered) or any(
        a is not b for a, b in zip(cached, registered, strict=True)
    ):
        specs = {
            kind.key: sc.Spec(
                sc.list_of(kind.read, "rules"),
                omit=(lambda rules: False) if kind.always_written else (lambda rules: not rules),
                doc=kind.doc or None,
                hint={"type": ["array", "null"], "items": {"$ref": kind.json_ref}},
            )
            for kind in registered
        }
        _KIND_SPECS[:] = [registered, specs]
    return specs


_KIND_SPECS: list[Any] = [[], {}]  # the registry the specs were built for, and the specs


def _empty(value: Any) -> bool:
    return not value


@dataclass(frozen=True)
class BestCandidate(sc.Record):
    """On a lost feature: the new SAE's feature that scored best with it, and that score
    (below the matching's threshold, or above it when the one-to-one assignment gave that
    feature to a better-scoring old one); where to look when re-homing its claims."""

    feature: int | None = sc.entry(
        sc.integer(), default=None, doc="The candidate's id in the new output SAE."
    )
    confidence: float | None = sc.entry(
        sc.number((-1.0, 1.0)),
        default=None,
        doc="Its matching score, -1..1 (decoder cosine, averaged with the activation "
        "correlation where one was measured).",
    )


@dataclass(init=False)
class FeatureRules(sc.Record):
    """Everything claimed about one output SAE feature of the head.

    ``claims`` holds each rule kind's list by its key; ``rules.skipgrams``, ``rules.absence``
    (any registered key) read and assign those lists.
    """

    feature: int = sc.entry(sc.integer(), required=True, doc="The output SAE feature id, from 0.")
    source: Literal["extracted", "manual"] = sc.entry(
        sc.choice(*SOURCES),
        required=True,
        fix="add `source: manual` for a hand-written entry (or `source: extracted`)",
        doc="extracted: written by `rulecheck extract`, replaced when the head is extracted "
        "again; manual: written by hand, kept as it is.",
    )
    label: str = sc.entry(
        sc.text,
        default="",
        omit=_empty,
        doc="A short description shown in test names and reports, e.g. the top skip-gram: "
        "'[ un] ... [po]'.",
    )
    claims: dict[str, list[Any]] = sc.entry(None, spread=_kind_specs)  # type: ignore[arg-type]
    expect: dict[str, float] = sc.entry(
        parse_expect,
        omit=lambda v: not any(m in v for m in CHECKED),
        dump=lambda v: sc.Flow({m: v[m] for m in CHECKED if m in v}),
        doc="The minimums the skip-gram rules must reach on the test split, each in [0, 1]; a "
        "metric left out is not checked.",
        hint=expect_hint,
    )
    measured: dict[str, Any] = sc.entry(
        parse_measured,
        omit=_empty,
        dump=lambda v: sc.ordered(v, MEASURED_ORDER),
        measured=True,
    )
    xfail: str | None = sc.entry(  # a claim expected not to hold: the reason
        sc.text,
        doc="The claims are expected not to hold, for this reason: their tests are reported as "
        "expected failures.",
    )
    # only under a book's ``lost:``: the best candidate of a feature lost in remapping
    best_candidate: BestCandidate | None = sc.entry(
        sc.parser(BestCandidate),
        flow=True,
        doc="The new SAE's feature that scored best with this one, and that score (below the "
        "matching's threshold): where to look when re-homing the claims.",
    )

    def __init__(
        self,
        feature: int,
        source: Literal["extracted", "manual"],
        label: str = "",
        *,
        claims: Mapping[str, list[Any]] | None = None,
        expect: dict[str, float] | None = None,
        measured: dict[str, Any] | None = None,
        xfail: str | None = None,
        best_candidate: BestCandidate | None = None,
        **by_kind: list[Any],
    ) -> None:
        unknown = set(by_kind) - set(kinds.KINDS)
        if unknown:
            raise TypeError(f"no rule kind {sorted(unknown)}; registered: {list(kinds.KINDS)}")
        object.__setattr__(self, "feature", feature)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "label", label)
        merged = {**(claims or {}), **by_kind}
        object.__setattr__(
            self, "claims", {k: list(merged.get(k) or []) for k in (*kinds.KINDS, *merged)}
        )
        object.__setattr__(self, "expect", dict(expect or {}))
        object.__setattr__(self, "measured", dict(measured or {}))
        object.__setattr__(self, "xfail", xfail)
        object.__setattr__(self, "best_candidate", best_candidate)

    def __getattr__(self, name: str) -> list[Any]:
        if name in kinds.KINDS and "claims" in self.__dict__:
            return self.__dict__["claims"].setdefault(name, [])
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in kinds.KINDS:
            self.claims[name] = value
        else:
            object.__setattr__(self, name, value)


@dataclass(kw_only=True)
class Rulebook(sc.Record):
    """The rules for every described output feature of one attention head."""

    # required: ``parse_book`` checks the version before anything else
    schema: int = sc.entry(
        lambda w, v, p: v,
        key="rulecheck",
        required=True,
        default=SCHEMA_VERSION,
        doc=f"The rulebook format version: {SCHEMA_VERSION}. A version 1 book (`rulecheck: 1`) "
        "still loads, with a deprecation warning, but is not described by this schema: run "
        f"`rulecheck upgrade PATH` to rewrite it as version {SCHEMA_VERSION}.",
        hint={"type": "integer", "const": SCHEMA_VERSION, "default": SCHEMA_VERSION},
    )
    model: str | None = sc.entry(
        sc.text,
        default=None,
        doc="The model the head belongs to: a zoo name (rulecheck-tiny) or a spec.",
        hint={"examples": ["rulecheck-tiny"]},
    )
    sae_in: str | None = sc.entry(
        sc.text,
        default=None,
        doc="The input SAE (on the residual stream the head reads): the source of the input "
        "feature ids that references name.",
        hint={"examples": ["rulecheck-tiny:sae_in/L0"]},
    )
    sae_out: str | None = sc.entry(
        sc.text,
        default=None,
        doc="The output SAE (on the head's output): the source of the ids under `features`.",
        hint={"examples": ["rulecheck-tiny:sae_out/L0H0"]},
    )
    corpus: str | None = sc.entry(
        sc.text,
        default=None,
        doc="The corpus the rules are measured on.",
        hint={"examples": ["rulecheck-tiny:eval"]},
    )
    fingerprints: dict[str, str] = sc.entry(
        parse_fingerprints,
        default_factory=dict,
        omit=_empty,
        dump=lambda v: sc.ordered(v, HEADER_KEYS),
        doc="SHA-256 of the files the book was extracted from, so that a check against other "
        "weights or another corpus is noticed.",
        hint=fingerprints_hint,
    )
    layer: int = sc.entry(
        sc.integer(),
        required=True,
        fix="add `layer: N` (the head's layer, from 0)",
        doc="The head's layer, from 0 (the L in the file name L{layer}H{head}).",
    )
    head: int = sc.entry(
        sc.integer(),
        required=True,
        fix="add `head: N` (the head's index in its layer, from 0)",
        doc="The head's index in its layer, from 0 (the H in the file name L{layer}H{head}).",
    )
    extraction: dict[str, Any] = sc.entry(
        sc.free_mapping,
        default_factory=dict,
        omit=_empty,
        dump=lambda v: sc.ordered(v, EXTRACTION_ORDER),
        doc="The settings `rulecheck extract` used, recorded so that `rulecheck regenerate` can "
        "repeat it. Free: keys other than the ones described here are kept as written.",
        hint=extraction_hint,
    )
    # the table as read; written anew from the claims (``RefTable.of``)
    refs: dict[int, list[str]] = sc.entry(
        parse_refs,
        default_factory=dict,
        omit=_empty,
        doc="The input features that rules name by id: feature id -> the tokens that fire it "
        "most (shown in names and messages; may be an empty list). Keys are integers >= 0 "
        "written without leading zeros (YAML 1.1 readers take 010 as octal). JSON Schema sees "
        "mapping keys as strings, so a key is checked as the text of a whole number: a quoted "
        "'29' passes here, although rulecheck wants the integer.",
        hint=REFS_HINT,
    )
    features: list[FeatureRules] = sc.entry(
        sc.list_of(sc.parser(FeatureRules), "features"),
        default_factory=list,
        omit=lambda v: False,
        doc="One entry per described output feature of the head.",
        hint={"items": {"$ref": FEATURE_DEF}},
    )
    # features of the SAE the book was remapped from that the new one has no confident
    # partner for, by their old ids (``rulecheck remap``): each one's items fail, or skip
    # within ``--rulecheck-allow-lost``, until a person re-homes or removes it
    lost: list[FeatureRules] = sc.entry(
        sc.list_of(sc.parser(FeatureRules), "features"),
        default_factory=list,
        omit=_empty,
        doc="Features lost in remapping to retrained SAEs (`rulecheck remap`), by their old "
        "ids: see $defs/lost_feature.",
        hint={"items": {"$ref": LOST_DEF}},
    )

    # where each field path was read from (file and line), for errors about values that only
    # turn out wrong later (a model spec that does not load); not part of the schema
    origin: sc.Where = dataclasses.field(default_factory=sc.Where, compare=False, repr=False)

    def fail(self, field: str, what: str, fix: str | None = None) -> NoReturn:
        """``InvalidRulebook`` about ``field`` of this book, at the line it was read from."""
        self.origin.fail(field, what, fix)

    def recorded(self, cls: type, names: tuple[str, ...]) -> dict[str, Any]:
        """The settings ``names`` of the config dataclass ``cls`` that the ``extraction:``
        block records, each checked against its field's bound (``InvalidRulebook`` at its
        line otherwise); a setting not recorded is left out."""
        values = {}
        for name in names:
            if name in self.extraction:
                bound = bound_of(cls, name)
                try:
                    value = self.extraction[name]
                    values[name] = bound.check(value, name) if bound else value
                except InvalidSpec as e:
                    self.fail(f"extraction.{name}", e.what, e.fix)
        return values

    def protocol(self) -> ExemplarConfig:
        """The exemplar protocol the book was measured with (``ExemplarConfig``): what its
        ``extraction:`` block records, the defaults for the rest (a hand-written book)."""
        return ExemplarConfig(**self.recorded(ExemplarConfig, PROTOCOL))

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

    @classmethod
    def from_dict(cls, data: Any) -> Rulebook:
        return parse_book(sc.Where(), data)

    def to_dict(self) -> dict[str, Any]:
        """The book as written (format 2): ``book_dict``."""
        return book_dict(self)

    def __schema_check__(self, where: sc.Where, path: str) -> None:
        seen: dict[int, int] = {}
        for i, entry in enumerate(self.features):
            if entry.feature in seen:
                first = where.line(f"features[{seen[entry.feature]}].feature")
                at = f" (first at line {first})" if first is not None else ""
                where.fail(
                    f"features[{i}].feature",
                    f"duplicate feature id {entry.feature}{at}",
                    "merge the two entries into one",
                )
            seen[entry.feature] = i
            if entry.best_candidate is not None:
                where.fail(
                    f"features[{i}].best_candidate",
                    "only a lost feature has a best candidate",
                    "remove it, or move the entry under `lost:`",
                    key=True,
                )
        lost: set[int] = set()
        for i, entry in enumerate(self.lost):
            if entry.feature in lost:
                where.fail(
                    f"lost[{i}].feature",
                    f"duplicate lost feature id {entry.feature}",
                    "keep one entry per old feature",
                )
            lost.add(entry.feature)


def parse_book(where: sc.Where, value: Any) -> Rulebook:
    """A rulebook from plain values (as read from YAML); every problem is ``InvalidRulebook``.
    A format-1 book loads with a :class:`FormatWarning`."""
    if not isinstance(value, Mapping):
        where.fail(
            "",
            f"top level must be a mapping, got {sc.describe(value)}",
            f"start with `rulecheck: {SCHEMA_VERSION}`",
        )
    if "rulecheck" not in value:
        where.fail(
            "",
            "not a rulebook: no top-level `rulecheck:` key",
            f"add `rulecheck: {SCHEMA_VERSION}` as the first line",
        )
    version = value["rulecheck"]
    if type(version) is not int or version not in VERSIONS:
        where.fail(
            "rulecheck",
            f"unsupported format version {sc.describe(version)}",
            f"this rulecheck reads `rulecheck: {SCHEMA_VERSION}` (and the older 1)",
        )
    where.measured = version == 1
    book = sc.parse(Rulebook, where, value)
    book.origin = where
    if version == 1:
        name = where.file or "this rulebook"
        warnings.warn(
            FormatWarning(
                f"{name}: rulebook format 1 is deprecated; `rulecheck upgrade {name}` rewrites "
                "it as format 2"
            ),
            stacklevel=2,
        )
    return book


def ref_table(book: Rulebook) -> RefTable:
    """The ``refs:`` table a book is written with: each input feature its claims name."""
    return RefTable.of(
        ref
        for rules in (*book.features, *book.lost)
        for claims in rules.claims.values()
        for claim in claims
        for ref in kinds.refs_of(claim)
    )


def book_dict(book: Rulebook) -> dict[str, Any]:
    """The book as plain values in format 2: claims short, measurements left out."""
    table = ref_table(book)
    out = sc.dump(book, measured=False)
    out["rulecheck"] = SCHEMA_VERSION
    refs = {k: list(v) for k, v in table.tokens.items()}
    out = {k: v for k, v in out.items() if k not in ("features", "lost")}
    if refs:
        out["refs"] = refs
    elif "refs" in out:
        del out["refs"]
    out["features"] = [_feature_dict(rules, table) for rules in book.features]
    if book.lost:
        out["lost"] = [_feature_dict(rules, table) for rules in book.lost]
    return out


def _feature_dict(rules: FeatureRules, table: RefTable) -> dict[str, Any]:
    out = sc.dump(rules, measured=False)
    for kind in kinds.kinds():
        if kind.key in out:
            out[kind.key] = sc.Block(kind.write(c, table) for c in rules.claims[kind.key])
    return out


def measured_dict(book: Rulebook) -> dict[str, Any]:
    """What extraction measured for the book's features (the report beside the book):
    per feature its quality at the chosen terms and curves, and each claim's scores."""
    features = []
    for rules in book.features:
        entry: dict[str, Any] = {"feature": rules.feature}
        if rules.measured:
            entry.update(sc.ordered(rules.measured, MEASURED_ORDER))
        for key, claims in rules.claims.items():
            measured = [sc.dump(claim, measured=True) for claim in claims]
            if any(measured):
                entry[key] = measured
        if len(entry) > 1:
            features.append(entry)
    return {
        "rulecheck": SCHEMA_VERSION,
        "layer": book.layer,
        "head": book.head,
        "features": features,
    }


def changes(old: Rulebook, new: Rulebook) -> tuple[dict[int, str], list[int]]:
    """What regeneration changed: for each extracted feature of ``new`` whose claims or
    minimums differ from ``old``'s, a line saying how; and the extracted features of ``old``
    that ``new`` no longer has."""
    before = {f.feature: f for f in old.features if f.source == "extracted"}
    after = {f.feature: f for f in new.features if f.source == "extracted"}
    changed = {}
    for feature, rules in after.items():
        if feature not in before:
            changed[feature] = "new feature"
        elif what := _feature_changes(before[feature], rules):
            changed[feature] = what
    return changed, sorted(set(before) - set(after))


def claim_changes(old: FeatureRules, new: FeatureRules) -> dict[str, tuple[list[str], list[str]]]:
    """Per kind whose rules differ between ``old`` and ``new``: the rules added and the rules
    removed, each one line of text as a book writes it with the references spelled out (id
    and tokens, whatever a book's ``refs:`` table); both empty when only the order changed.
    Rules are compared by what they claim (``schema.identity``); only changed ones are
    written out. What regeneration and ``rulecheck diff`` compare."""
    table = RefTable()
    out = {}
    for kind in kinds.kinds():
        if old.claims.get(kind.key, []) == new.claims.get(kind.key, []):
            continue  # equal, measured scores included: the same claims, nothing to write
        was = {sc.identity(c): c for c in old.claims.get(kind.key, [])}
        now = {sc.identity(c): c for c in new.claims.get(kind.key, [])}
        if list(was) == list(now):
            continue
        added = [_text(kind.write(now[k], table)) for k in now if k not in was]
        removed = [_text(kind.write(was[k], table)) for k in was if k not in now]
        out[kind.key] = (added, removed)
    return out


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _feature_changes(old: FeatureRules, new: FeatureRules) -> str:
    parts = []
    for key, (added, removed) in claim_changes(old, new).items():
        counts = [
            f"{n} {what}" for n, what in ((len(added), "added"), (len(removed), "removed")) if n
        ]
        parts.append(f"{key} {', '.join(counts) or 'reordered'}")
    for metric in CHECKED:
        a, b = old.expect.get(metric), new.expect.get(metric)
        if a != b:
            parts.append(f"expect.{metric} {'none' if a is None else a} -> {b}")
    return "; ".join(parts)


def merge_manual(new: Rulebook, old: Rulebook | None) -> Rulebook:
    """``new`` plus every ``source: manual`` feature of ``old``, which wins on equal ids."""
    if old is None:
        return replace(new, features=sorted(new.features, key=lambda f: f.feature))
    if (old.layer, old.head) != (new.layer, new.head):
        raise InvalidRulebook(
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
