"""Absence rules ``[k'] ... [q] -/-> feature`` (paper 4.2, A.4): a distractor key steals the
query's attention from the term's key and suppresses the feature.

The prompts of a check are the feature's test positives whose prefix reads ``key ... query``
(query at ``t``, key before it; all test positives when no positive does or the tokens are
unknown). A rule states one of two claims:

- **Without a strength** (``"[if] ... [then] unless [unless]"``), on every prompt
  (Hypothesis over counterfactual edits): inserting ``n = 1..4`` copies of the distractor
  token, each right before a drawn position in ``[1, t]`` (occurrences of the key are never
  dropped to make room), cuts the activation at the tracked token at least in half::

      after <= (1 - margin) * before        (margin = 0.5)

- **With a strength** ``min_drop`` (``"[if] ... [then] unless [unless] (drop >= 0.3)"``, or
  ``min_drop: 0.3`` in the long form), on average (the paper's Fig. 6c): one copy of the
  distractor inserted right after BOS (the paper's protocol, and the first point of the
  ``drop`` curve extraction measures; deterministic, nothing drawn) lowers the activation at
  ``t`` by a mean relative drop of at least ``min_drop``::

      mean over the prompts of (before - after) / before >= min_drop

  over the prompts with room for the copy and an activation above 0
  (``rulecheck.core.distractors.copy_drops``). A failure names the measured mean, the number
  of prompts and the prompt with the smallest drop. ``min_drop`` lies in ``[0.1, 1]``
  (``STRENGTH_FLOOR``): a neutral token measures a drop of about 0, so it does not pass.

Finding: for the top terms ``(q, k)``, a distractor is a key ``k'`` with ``attn-score(q, k') >
attn-score(q, k)`` and ``value-score(k') < 0`` beyond numerical noise, whose token occurs in
the corpus body and is not BOS (``rulecheck.core.distractors.find_distractors``); its token
inserted 1..4 times right after BOS into the prompts gives the mean relative drop per number
of copies (``drop``, Fig. 6c). Each distractor yields up to two candidates, strongest first
(one ``slot``): the claim without a strength when one copy halves the activation on average
(``MIN_DROP``), and the claim with ``min_drop`` the measured mean one-copy drop rounded down
to a multiple of 0.05 when that is at least ``KEEP_DROP``. Extraction keeps the first whose
check passes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rulecheck import schema
from rulecheck.errors import RuleFailed
from rulecheck.kinds.base import (
    CheckContext,
    Found,
    RuleKind,
    as_text,
    grid_down,
    read_strength,
    shorthand,
    shorthand_form,
    shorthand_pattern,
    strength,
    strength_pattern,
    strength_text,
)
from rulecheck.kinds.card import ORANGE, Column, Figure, Mark, layout, rounded, visible
from rulecheck.refs import RefTable, TokenRef, ref_entry, ref_name, ref_shown

if TYPE_CHECKING:
    from rulecheck.book import FeatureRules

MARGIN = 0.5  # the check: inserted distractors leave at most half of the activation
MAX_COPIES = 4
MIN_DROP = 0.5  # finding: one copy halves the activation, on average (the claim without strength)
KEEP_DROP = 0.25  # finding: the smallest mean one-copy drop stated as a strength
TOP_TERMS = 3  # finding: distractors of this many top terms


_min_drop = strength("min_drop", "that 1-4 copies halve the activation on every prompt")


@dataclass
class AbsenceRule(schema.Record):
    """A skip-gram that is suppressed when ``distractor`` is also in the context."""

    key: TokenRef = ref_entry(required=True, doc="The skip-gram's key.")
    query: TokenRef = ref_entry(
        required=True, doc="The skip-gram's query, where the feature fires."
    )
    distractor: TokenRef = ref_entry(
        required=True,
        doc="The key whose presence steals the query's attention and suppresses the feature.",
    )
    attn_score: float | None = schema.entry(schema.number(), default=None, measured=True)
    value_score: float | None = schema.entry(schema.number(), default=None, measured=True)
    drop: list[float] = schema.entry(
        schema.list_of(schema.number(), "numbers"),
        default_factory=list,
        dump=list,
        omit=lambda v: not v,
        measured=True,
    )
    # the claim's strength: the smallest mean relative drop of one copy (see module doc)
    min_drop: float | None = schema.entry(
        _min_drop,
        default=None,
        doc="The claim's strength: one copy of the distractor inserted right after BOS lowers "
        "the activation at the query by at least this share on average over the test positives "
        "that read key ... query (mean of (before - after) / before). At least 0.1: a token with "
        "no effect measures about 0. Left out: 1-4 copies must halve the activation on every "
        "prompt.",
    )


SHORTHAND = (
    '"[key] ... [query] unless [distractor]", optionally ending "(drop >= 0.3)", e.g. '
    '"[if] ... [then] unless [unless]"'
)
TEMPLATE = "{} ... {} unless {}"  # the shorthand, brackets as ``{}``


class Absence(RuleKind):
    key = "absence"
    claim = AbsenceRule
    item = "absence"
    figure_name = "drop"
    doc = (
        "Absence rules [key] ... [query] unless [distractor]: a distractor key in the context "
        "suppresses the skip-gram. Checked by inserting the distractor into positive examples: "
        "without a strength, 1-4 copies must halve the activation on every prompt; with one "
        "(drop >= 0.3, min_drop), one copy must lower it by that share on average. An empty "
        "list, or a key with nothing after it (null), claims nothing."
    )
    rule_doc = (
        'One absence rule: the shorthand "[key] ... [query] unless [distractor]", optionally '
        'ending " (drop >= 0.3)", or {key, query, distractor, min_drop}.'
    )

    def json_forms(self) -> list[dict[str, Any]]:
        text = shorthand_form(
            'Shorthand "[key] ... [query] unless [distractor]" (quote it in YAML), optionally '
            'ending " (drop >= X)" with X in [0.1, 1] written 0.d... or 1 (min_drop).',
            shorthand_pattern(TEMPLATE, strength_pattern("drop")),
            ["[if] ... [then] unless [unless]", "[if] ... [then] unless [unless] (drop >= 0.3)"],
        )
        return [text]

    def read(self, where: schema.Where, value: Any, path: str) -> AbsenceRule:
        """``"[key] ... [query] unless [distractor]"`` or the long form."""
        if isinstance(value, str):
            words = ("", "...", "unless", None)
            [tail], (key, query, distractor) = shorthand(where, value, path, words, SHORTHAND)
            field = schema.join(path, "min_drop")
            min_drop = read_strength(where, value, tail, field, "drop", _min_drop)
            return AbsenceRule(key=key, query=query, distractor=distractor, min_drop=min_drop)
        return super().read(where, value, path)

    def write(self, claim: AbsenceRule, table: RefTable) -> Any:
        refs = [claim.key, claim.query, claim.distractor]
        template = TEMPLATE + strength_text("drop", claim.min_drop)
        text = as_text(table, refs, template)
        return text if text is not None else super().write(claim, table)

    def name(self, claim: AbsenceRule) -> str:
        return ref_name(claim.distractor)

    def text(self, claim: AbsenceRule) -> str:
        """``[if] ... [then] unless [unless]``, and its strength (`` (drop >= 0.3)``)."""
        key, query, dis = (ref_shown(r) for r in (claim.key, claim.query, claim.distractor))
        return f"{key} ... {query} unless {dis}{strength_text('drop', claim.min_drop)}"

    def columns(self) -> tuple[Column, ...]:
        return (Column("abs"),)

    def evidence(
        self, ctx: CheckContext, rules: FeatureRules, index: int
    ) -> list[float | None] | None:
        """The distractor's drop curve as extraction measures it (``drop``), where the
        measurements beside the book lack it (a hand-written rule)."""
        from rulecheck.core.distractors import distractor_drop

        rule: AbsenceRule = rules.absence[index]
        if rule.drop:
            return None
        where, refs = self.field(rules, index), ctx.resolver()
        distractor = refs.token(rule.distractor, f"{where}.distractor")
        key = refs.token(rule.key, f"{where}.key", required=False)
        query = refs.token(rule.query, f"{where}.query", required=False)
        bench, head = ctx.bench, ctx.head
        ex = bench.examples(head, rules.feature, ctx.file)
        probe, corpus = bench.probe(head, rules.feature), bench.load(head)[3]
        drop = distractor_drop(probe, corpus, ex, distractor, key_token=key, query_token=query)
        return [rounded(x, 4) for x in drop]

    def marks(self, claim: AbsenceRule, outcome: str | None, evidence: Any) -> list[Mark]:
        unmeasured = [] if claim.drop or evidence else [Mark.note("drop not measured")]
        return Mark.outcome(outcome) + unmeasured

    def figure(self, claim: AbsenceRule, evidence: Any) -> Figure | None:
        """Fig. 6c: the mean relative drop of the activation per inserted copy."""
        drop, source = list(claim.drop), "measured at extraction"
        if not drop and evidence:
            drop, source = evidence, "measured for this report"
        return _drop_figure(visible(ref_name(claim.distractor)), drop, source) if drop else None

    def find(self, found: Found) -> list[AbsenceRule]:
        from rulecheck.core.distractors import (
            copy_drops,
            distractor_drop,
            find_distractors,
            matches_term,
            split_positives,
            text_keys,
        )

        if found.token_of is None:
            return []
        w = found.weights
        text = text_keys(found.tokens, found.token_of)
        rows, t = split_positives(found.tokens, found.examples, "test")
        out = []
        for dis in find_distractors(
            found.d,
            w.W_Q,
            w.W_K,
            w.form,
            found.value_score,
            found.terms,
            TOP_TERMS,
            text,
            max_distance=found.tokens.shape[1] - 1,
        ):
            ids = [int(found.token_of[f]) for f in (dis.distractor, dis.key, dis.query)]
            if min(ids) < 0:
                continue
            drop = distractor_drop(
                found.probe,
                found.tokens,
                found.examples,
                ids[0],
                key_token=ids[1],
                query_token=ids[2],
            )
            claim = AbsenceRule(
                key=found.ref(dis.key),
                query=found.ref(dis.query),
                distractor=found.ref(dis.distractor),
                attn_score=schema.significant(dis.attn_score, 4),
                value_score=schema.significant(dis.value_score, 4),
                drop=[schema.significant(x, 4) for x in drop],
            )
            out.append(claim)
            # the strength as the check measures it, on the check's prompts
            reads = matches_term(rows, t, ids[1], ids[2])
            mean = copy_drops(
                found.probe, rows[reads], t[reads], ids[0], protect=rows[reads] == ids[1]
            ).mean()
            if not math.isnan(mean) and mean >= KEEP_DROP:
                out.append(replace(claim, min_drop=grid_down(mean)))
        return out

    def keep(self, claim: AbsenceRule) -> bool:
        if claim.min_drop is not None:
            return claim.min_drop >= KEEP_DROP
        return not any(math.isnan(x) for x in claim.drop) and claim.drop[0] >= MIN_DROP

    def slot(self, claim: AbsenceRule) -> Hashable:
        return schema.identity((claim.key, claim.query, claim.distractor))

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        from rulecheck.core.distractors import matches_term, split_positives
        from rulecheck.properties import Bases

        rule: AbsenceRule = rules.absence[index]
        bench, head = ctx.bench, ctx.head
        where = self.field(rules, index)
        refs = ctx.resolver()
        distractor = refs.token(rule.distractor, f"{where}.distractor")
        assert distractor is not None
        key = refs.token(rule.key, f"{where}.key", required=False)
        query = refs.token(rule.query, f"{where}.query", required=False)
        name = refs.shown(rule.distractor, distractor)
        term = f"{refs.shown(rule.key, key)} ... {refs.shown(rule.query, query)}"
        claim = f"{name} suppresses feature {rules.feature} ({term}) of {head.name}"
        claim += strength_text("drop", rule.min_drop)
        record = {"rule": self.key, "passed": False}

        corpus = bench.load(head)[3]
        rows, t = split_positives(corpus, bench.examples(head, rules.feature, ctx.file), "test")
        pool = f"{len(t)} test positives"
        if key is not None and query is not None:
            reads = matches_term(rows, t, key, query)
            if reads.any():
                rows, t = rows[reads], t[reads]
                pool = f"{len(t)} test positives reading {term} at t"
            else:
                pool += f" (none reads {term} at t)"
        if len(t) == 0:
            raise RuleFailed(
                f"{claim}: cannot be checked, the feature has no test positives", record=record
            )
        prompts = _Prompts(rows, t, key, distractor, name, claim, pool, record)
        if rule.min_drop is not None:
            return _check_strength(ctx, rules, rule.min_drop, prompts)
        bases = Bases.of(rows, t, () if key is None else (key,))
        return _check_every_prompt(ctx, rules, rule, bases, prompts)


@dataclass(frozen=True)
class _Prompts:
    """What both checks of a rule share: its prompts and how its messages name things."""

    rows: Any  # Tensor [n, T]
    t: Any  # Tensor [n]
    key: int | None
    distractor: int
    name: str  # the distractor as messages show it, in its brackets
    claim: str  # the claim's first words in messages
    pool: str  # which prompts, in words
    record: dict[str, Any]


def _check_strength(
    ctx: CheckContext, rules: FeatureRules, min_drop: float, p: _Prompts
) -> dict[str, Any]:
    """The mean relative drop of one copy inserted right after BOS is at least ``min_drop``."""
    from rulecheck.core.distractors import copy_drops
    from rulecheck.properties import counterexample, shown

    model = ctx.bench.load(ctx.head)[0]
    protect = None if p.key is None else p.rows == p.key
    m = copy_drops(ctx.bench.probe(ctx.head, rules.feature), p.rows, p.t, p.distractor, 1, protect)
    n_left = len(p.t) - len(m)
    left = f"; {n_left} left out (no room for the copy, or not active now)" if n_left else ""
    if len(m) == 0:
        raise RuleFailed(
            f"{p.claim}: cannot be checked, none of the {p.pool} is active with room for a copy",
            record=p.record,
        )
    mean = m.mean()
    record = {**p.record, "mean_drop": mean, "min_drop": min_drop, "prompts": len(m)}
    if mean >= min_drop:
        return {**record, "passed": True}
    i = m.weakest()
    found = {
        "t0": int(p.t[m.index[i]]),
        "edit": m.edit.row(i),
        "before": float(m.before[i]),
        "after": float(m.after[i]),
    }
    raise RuleFailed(
        "\n".join(
            [
                f"{p.claim}: falsified: mean drop {mean:.3f} < {min_drop:g} stated, over "
                f"{len(m)} prompts",
                f"  criterion: one copy of {p.name} inserted right after BOS lowers the "
                f"activation at t by (before - after) / before >= {min_drop:g} on average",
                f"  prompts: {p.pool}{left}",
                f"  the prompt with the smallest drop ({float(m.drop[i]):.1%}):",
                *shown(model, found),
                f"  activation at t: before {found['before']:.4f}, after {found['after']:.4f}",
            ]
        ),
        record={**record, "counterexample": counterexample(model, found)},
    )


def _check_every_prompt(
    ctx: CheckContext, rules: FeatureRules, rule: AbsenceRule, bases: Any, p: _Prompts
) -> dict[str, Any]:
    """Hypothesis looks for a prompt and 1-4 inserted copies that leave more than half."""
    from rulecheck.properties import activations, copies, counterexample, falsify, run_key, shown

    bench, head = ctx.bench, ctx.head
    model = bench.load(head)[0]

    def falsified(case: Any) -> dict[str, Any] | None:
        (tokens, t0), edit = bases.edit(case)
        before, after = activations(bench, head, rules.feature, [tokens, edit.tokens], [t0, edit.t])
        if after <= (1 - MARGIN) * before:
            return None
        return {"t0": t0, "edit": edit, "before": before, "after": after}

    cases = bases.cases(p.distractor, 1, MAX_COPIES)
    run_id = run_key(head, rules, rule, MARGIN, MAX_COPIES)
    run = falsify(bases, cases, falsified, ctx.examples, run_id)
    if run.found is None:
        return {**p.record, "passed": True}
    found = run.found
    drop = (found["before"] - found["after"]) / found["before"] if found["before"] else 0.0
    raise RuleFailed(
        "\n".join(
            [
                f"{p.claim}: falsified",
                f"  criterion: 1-{MAX_COPIES} copies of {p.name} inserted before t leave "
                f"at most {1 - MARGIN:.0%} of the activation at t (after <= "
                f"{1 - MARGIN:g} * before)",
                f"  prompts: {p.pool}",
                f"  minimal counterexample, {copies(len(found['edit'].inserted))} inserted "
                f"({run.summary()}):",
                *shown(model, found),
                f"  activation at t: before {found['before']:.4f}, after "
                f"{found['after']:.4f} (drop {drop:.1%}, needed >= {MARGIN:.0%})",
            ]
        ),
        record={**p.record, "counterexample": counterexample(model, found)},
    )


def _drop_figure(name: str, drop: Sequence[float | None], source: str) -> Figure:
    """Fig. 6c: the mean relative drop of the activation per inserted copy of a distractor."""
    copies = list(range(1, len(drop) + 1))
    return {
        "data": [
            {
                "type": "bar",
                "x": copies,
                "y": list(drop),
                "marker": {"color": ORANGE},
                "hovertemplate": "%{x} copies: drop %{y:.1%}<extra></extra>",
            }
        ],
        "layout": layout(
            f"drop with [{name}] inserted ({source})",
            "copies inserted",
            "mean relative drop",
            yaxis={"title": {"text": "mean relative drop"}, "tickformat": ".1%"},
            xaxis={"title": {"text": "copies inserted"}, "dtick": 1},
        ),
    }
