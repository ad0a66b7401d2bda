"""What a rule kind is: the interface every kind module implements.

A kind owns one key of a feature's entry in a rulebook (``skipgrams:``, ``absence:``,
``counting:``) and everything about it:

- ``claim``: the dataclass of one rule, whose fields are its schema (``rulecheck.schema``);
- ``read(where, value, path)`` and ``write(claim, table)``: a rule as a book holds it, short
  (a one-line list or shorthand text, references by id in the book's ``refs:`` table) when it
  can be, else the long form, a mapping of the claim's fields;
- ``items(rules)``: the test items it yields for a feature, as ``(name, index)`` pairs, each
  name on one line (pytest node ids, ``-k``);
- ``check(ctx, rules, index)``: runs one item against the checkpoint and returns what the
  run report records, or raises :class:`~rulecheck.errors.RuleFailed`;
- ``find(found)``: the candidate claims extraction proposes for a feature (none for a kind
  that is only written by hand), and ``keep(claim)``, whether a measured candidate is kept;
  kept candidates are then checked with ``check`` before they are written
  (``validate``), so that a fresh rulebook passes its own tests. Candidates of one ``slot``
  (the same distractor stated strictly and with a measured strength, say) are alternatives,
  strongest first: extraction keeps the first whose check passes;
- ``text(claim)``: how a claim reads on a report's card and in ``rulecheck show``;
  ``columns()`` and ``cells(rules)``: its columns in ``rulecheck show`` (by default the
  number of its claims, headed by its key);
- ``evidence(ctx, rules, index)``: what the HTML report measures on the model for a claim
  beyond what the book and its measurements hold (a curve), and ``card(rules, outcomes,
  evidence)``: its part of a feature's card (``rulecheck.kinds.card``), each claim by its
  ``text``, its ``marks`` (scores, notes, its item's outcome) and its ``figure``. A failed
  claim's message and the counterexample its check recorded
  (``rulecheck.properties.counterexample``) are shown for every kind alike.

A claim may state how strong its effect is (absence's ``min_drop``, counting's
``min_spearman``): a number in ``[STRENGTH_FLOOR, 1]`` read by :func:`strength`, written
in a shorthand as a trailing ``(drop >= 0.3)``. A strength below the floor is refused when
the book is read: a token with no effect measures about 0 and would pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rulecheck import schema
from rulecheck.kinds.card import CardClaim, CardPart, Column, Figure, Mark
from rulecheck.refs import (
    BRACKET_COMMENT,
    BRACKET_DOC,
    BRACKET_PATTERN,
    END,
    RefTable,
    Resolver,
    ShorthandError,
    TokenRef,
    escaped,
    ref_name,
    ref_shown,
    split_shorthand,
)

if TYPE_CHECKING:
    from torch import Tensor

    from rulecheck.book import FeatureRules
    from rulecheck.core.exemplars import FeatureExamples
    from rulecheck.core.heads import HeadWeights, Probe
    from rulecheck.core.scores import Terms
    from rulecheck.session import Head, Workbench


STRENGTH_FLOOR = 0.1  # the smallest strength a claim may state (a neutral token measures ~0)
GRID = 0.05  # extraction states a measured strength rounded down to a multiple of this
# a strength in [STRENGTH_FLOOR, 1] as a shorthand writes it, in the editors' JSON Schema
STRENGTH_PATTERN = r"(?:0\.[1-9][0-9]*|1(?:\.0+)?)"


@dataclass(frozen=True)
class CheckContext:
    """What a check runs against: the session's workbench, the head, the rulebook file and
    the run's settings."""

    bench: Workbench
    head: Head
    file: str
    tolerance: float = 0.0
    examples: int = 25

    def resolver(self) -> Resolver:
        return self.bench.resolver(self.head, self.file)


@dataclass(frozen=True)
class Found:
    """One feature as extraction has it when the kinds look for claims: its exemplars, the
    head's weights in SAE space and its kept skip-gram terms."""

    feature: int
    probe: Probe
    tokens: Tensor  # the corpus [n_seq, pos]
    examples: FeatureExamples
    d: Tensor  # [d_sae_in, d_model] input directions as the head reads them
    weights: HeadWeights
    value_score: Tensor  # [d_sae_in] for this feature
    terms: Terms  # kept skip-gram terms, ranked
    token_of: Tensor | None  # [d_sae_in] top token of each input feature (-1: none)
    ref: Callable[[int], TokenRef]  # an input feature as a rulebook reference


class RuleKind:
    """Base of the rule kinds (see module doc); a kind module defines one subclass and
    registers an instance with ``rulecheck.kinds.register``."""

    key: ClassVar[str]  # the key under a feature: "skipgrams"
    claim: ClassVar[type]  # the dataclass of one rule
    item: ClassVar[str] = ""  # item name prefix: "absence" gives absence[<name>]
    always_written: ClassVar[bool] = False  # written even when empty
    validate: ClassVar[bool] = True  # extraction keeps only candidates whose check passes
    # the kind's rules are checked together (one set, as skip-grams are): a rule that cannot
    # be translated into a retrained SAE's ids leaves the set, instead of failing on its own
    together: ClassVar[bool] = False
    title: ClassVar[str] = ""  # its claims' heading on a card (default: the key, capitalised)
    figure_name: ClassVar[str] = ""  # its figures' ids on a page: "drop" (default: item)
    doc: ClassVar[str] = ""  # what the key holds, as editors show it (JSON Schema)
    rule_doc: ClassVar[str] = ""  # what one rule is, as editors show it
    def_name: ClassVar[str] = ""  # one rule's name under the JSON Schema's $defs (or ``key``)

    @property
    def json_ref(self) -> str:
        """Where the editors' JSON Schema defines one rule."""
        return f"#/$defs/{self.def_name or self.key}"

    def json_forms(self) -> list[dict[str, Any]]:
        """The forms ``read`` takes besides the long form, as JSON Schema (``shorthand_form``
        for a shorthand)."""
        return []

    def json_schema(self) -> dict[str, Any]:
        """One rule as JSON Schema: the forms of ``json_forms``, then the long form."""
        long_form = schema.json_schema(self.claim)
        forms = self.json_forms()
        head = {"description": self.rule_doc} if self.rule_doc else {}
        if not forms:
            return {**head, **long_form}
        return {**head, "anyOf": [*forms, {"description": "The mapping form.", **long_form}]}

    def read(self, where: schema.Where, value: Any, path: str) -> Any:
        """One rule as a book writes it; this default reads the long form (a mapping)."""
        return schema.parse(self.claim, where, value, path)

    def write(self, claim: Any, table: RefTable) -> Any:
        """One rule as a book holds it; this default writes the long form, one line."""
        return schema.Flow(long_form(claim, table))

    def items(self, rules: FeatureRules) -> list[tuple[str, int]]:
        """One item per rule, ``item[<name>]``, names on one line (a line break in a token as
        ``\\n``, ``refs.escaped``) and made unique with ``#2``, ``#3``."""
        names = [f"{self.item}[{escaped(self.name(r))}]" for r in rules.claims[self.key]]
        return list(zip(unique(names), range(len(names)), strict=True))

    def name(self, claim: Any) -> str:
        """How one rule is named in its item."""
        raise NotImplementedError

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        """Check item ``index``; the fields the run report keeps, or ``RuleFailed``."""
        raise NotImplementedError

    def find(self, found: Found) -> list[Any]:
        """Candidate claims for a feature (a kind written only by hand finds none)."""
        return []

    def keep(self, claim: Any) -> bool:
        """Whether a measured candidate is worth checking and writing."""
        return True

    def slot(self, claim: Any) -> Hashable:
        """Which claim ``claim`` is an alternative form of: extraction keeps the first
        candidate of a slot whose check passes (by default each claim is its own slot)."""
        return schema.identity(claim)

    def field(self, rules: FeatureRules, index: int) -> str:
        """The field path of one rule in errors: ``feature[94].absence[0]``."""
        return f"feature[{rules.feature}].{self.key}[{index}]"

    # ------------------------------------------------------------ how its claims are shown

    def text(self, claim: Any) -> str:
        """How one claim reads on a card and in ``rulecheck show``; this default lists the
        fields a book holds, references as shown (``text: the if a then, active: true``)."""
        return ", ".join(f"{k}: {_shown_value(getattr(claim, k, v), v)}" for k, v in _fields(claim))

    def columns(self) -> tuple[Column, ...]:
        """Its columns in ``rulecheck show``; this default: the number of its claims."""
        return (Column(self.key),)

    def cells(self, rules: FeatureRules) -> list[str]:
        """A feature's cells in ``columns()``, each on one line."""
        return [str(len(rules.claims[self.key]))]

    def evidence(self, ctx: CheckContext, rules: FeatureRules, index: int) -> Any:
        """What the HTML report measures on the model for claim ``index`` beyond what the book
        and its measurements hold (plain values, a curve, say), or None (this default: it
        measures nothing). A reference that does not resolve raises its ``RulecheckError``:
        the card notes it."""
        return None

    def marks(self, claim: Any, outcome: str | None, evidence: Any) -> list[Mark]:
        """What a card shows after a claim; this default, its item's outcome (None: its item
        did not run)."""
        return Mark.outcome(outcome)

    def figure(self, claim: Any, evidence: Any) -> Figure | None:
        """A figure of a claim on its card (a plotly.js figure spec), or None (this default)."""
        return None

    def card(
        self, rules: FeatureRules, outcomes: Mapping[int, str], evidence: Mapping[int, Any]
    ) -> CardPart:
        """Its part of a feature's card: each claim by ``text``, ``marks`` and ``figure``, given
        the outcome of each item that ran and the ``evidence`` measured for each claim, both by
        the index ``items`` gives it; left out of the card when the feature has none."""
        claims = tuple(
            CardClaim(
                i,
                self.text(claim),
                ref_ids(claim),
                tuple(self.marks(claim, outcomes.get(i), evidence.get(i))),
                self.figure(claim, evidence.get(i)),
            )
            for i, claim in enumerate(rules.claims[self.key])
        )
        return CardPart(self.title or self.key.capitalize(), claims)

    def figure_id(self, index: int) -> str:
        """The id of claim ``index``'s figure within its card: ``drop0``."""
        return f"{self.figure_name or self.item or self.key}{index}"


def strength(key: str, without: str) -> schema.Parse:
    """The parser of a claim's strength field ``key``: a number in ``[STRENGTH_FLOOR, 1]``;
    ``without`` says what the claim means without one (for the fix)."""

    def parse(where: schema.Where, value: Any, path: str) -> float:
        x = schema.number()(where, value, path)
        if x < STRENGTH_FLOOR:
            where.fail(
                path,
                f"{key} {x:g} is below {STRENGTH_FLOOR:g}: a token with no effect measures "
                "about 0 and would pass",
                f"state {key} >= {STRENGTH_FLOOR:g}, or remove {key} to claim {without}",
            )
        if x > 1:
            where.fail(
                path,
                f"{key} must be at most 1, got {x:g}",
                f"state {key} in [{STRENGTH_FLOOR:g}, 1]",
            )
        return x

    return schema.hinted(parse, {"type": "number", "minimum": STRENGTH_FLOOR, "maximum": 1})


NOISE = 0.005  # how far a strength measured on another machine may lie from this one's


def grid_down(x: float, step: float = GRID) -> float:
    """``x - NOISE`` rounded down to a multiple of ``step``: the strength that extraction
    states for a measured one, so that the claim holds when checked, here and on a machine
    whose floating-point sums differ."""
    x -= NOISE
    k = math.floor(x / step)
    while round(k * step, 10) > x:
        k -= 1
    return round(k * step, 10)


_STRENGTH = re.compile(r"^\((?P<name>[a-z]+) >= (?P<x>[^ ()]+)\)$")


def strength_text(word: str, value: float | None) -> str:
    """A strength as a shorthand ends: `` (drop >= 0.3)``, or nothing."""
    return "" if value is None else f" ({word} >= {float(value)!r})"


def read_strength(
    where: schema.Where, text: str, tail: str, path: str, word: str, parse: schema.Parse
) -> float | None:
    """The strength a shorthand ``text`` states in its ``tail`` (``(drop >= 0.3)``, or
    nothing), read by ``parse`` as field ``path``."""
    if not tail:
        return None
    match = _STRENGTH.match(tail)
    if match is None or match["name"] != word:
        where.fail(
            path,
            f"cannot read {tail!r} at the end of {text!r}",
            f"end it with ({word} >= 0.3), or with nothing",
        )
    try:
        value = float(match["x"])
    except ValueError:
        where.fail(path, f"cannot read {match['x']!r} in {text!r} as a number", "write 0.3")
    return parse(where, value, path)


def _fields(claim: Any) -> list[tuple[str, Any]]:
    """A claim's fields as a book holds them (omitted ones left out)."""
    return list(schema.dump(claim, measured=False).items())


def _shown_value(value: Any, plain: Any) -> str:
    """A field's value on one line: a reference as shown, a flag as YAML writes it."""
    if isinstance(value, TokenRef):
        return ref_shown(value)
    if isinstance(plain, bool):
        return "true" if plain else "false"
    return escaped(str(plain))


def ref_ids(claim: Any) -> str:
    """The input features a claim names, for a tooltip: ``#22, #35`` (a token without an id
    by its name)."""
    refs = refs_of(claim)
    return ", ".join(f"#{r.feature}" if r.feature is not None else ref_name(r) for r in refs)


def refs_of(claim: Any) -> list[TokenRef]:
    """The references a claim holds, in field order."""
    return [
        v for f in dataclasses.fields(claim) if isinstance(v := getattr(claim, f.name), TokenRef)
    ]


def long_form(claim: Any, table: RefTable) -> dict[str, Any]:
    """A claim's book fields as a mapping, references short where they can be."""
    out = schema.dump(claim, measured=False)
    for name in out:
        if isinstance(ref := getattr(claim, name, None), TokenRef):
            out[name] = table.value(ref)
    return out


def as_text(table: RefTable, refs: Sequence[TokenRef], template: str) -> str | None:
    """``template`` filled with the references in shorthand brackets, or None when one of
    them needs the long form."""
    brackets = [table.bracket(ref) for ref in refs]
    return None if None in brackets else template.format(*brackets)


def shorthand_pattern(template: str, tail: str = "") -> str:
    """The JSON Schema pattern of the shorthand ``template`` writes (``as_text``: ``{}`` a
    bracket), then ``tail`` (a pattern), then the end of the text."""
    # a space unescaped: ``\ `` is no escape in an ECMAScript pattern with the u flag
    literal = (re.escape(part).replace("\\ ", " ") for part in template.split("{}"))
    return "^" + BRACKET_PATTERN.join(literal) + tail + END


def strength_pattern(word: str) -> str:
    """The pattern of an optional strength at a shorthand's end: `` (drop >= 0.3)``."""
    return rf"(?: \({word} >= {STRENGTH_PATTERN}\))?"


def shorthand_form(description: str, pattern: str, examples: Sequence[str]) -> dict[str, Any]:
    """A shorthand as a JSON Schema form: ``description`` (how the brackets read is added)."""
    return {
        "description": f"{description} {BRACKET_DOC}",
        "type": "string",
        "$comment": BRACKET_COMMENT,
        "pattern": pattern,
        "examples": list(examples),
    }


def shorthand(
    where: schema.Where, text: str, path: str, words: Sequence[str | None], form: str
) -> tuple[list[str], list[TokenRef]]:
    """The references of shorthand ``text`` whose words between brackets must be ``words``
    (a None word matches anything and is returned); ``form`` shows the expected shape."""
    try:
        got, refs = split_shorthand(text)
    except ShorthandError as e:
        where.fail(path, f"cannot read {text!r}: {e.what}", e.fix)
    if len(got) != len(words) or any(
        w is not None and w != g for w, g in zip(words, got, strict=True)
    ):
        where.fail(path, f"cannot read {text!r}: expected {form}", f"write {form}")
    table = RefTable(where.refs)  # a bare [#858] takes the book's tokens for 858
    return [g for w, g in zip(words, got, strict=True) if w is None], [table.fill(r) for r in refs]


def unique(names: list[str], sep: str = "#") -> list[str]:
    """Names made unique: a repeated ``absence[x]`` becomes ``absence[x]#2``, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}{sep}{seen[name]}")
    return out
