"""Counting rules (paper 4.3, Fig. 7): the feature grows (or shrinks) with how often a key
occurs, and turns on (off) at a threshold count.

The count ``n`` is the number of occurrences of the key in ``[1, t]``, the query position
included: copies inserted before ``t``, plus one when the query token is the key itself (a
feature that fires at a token once it occurred before has threshold 2).

Finding: the key of the top term is inserted into base contexts until its count reaches 6
(``rulecheck.core.counts.counting_curve``); a rule is reported when the curve's Spearman is
strong and the majority state changes at ``n* >= 2`` (one occurrence would be a presence rule).

Checking, ``key`` with ``direction`` and ``threshold_count`` ``k``: base contexts are the
feature's test positives with the key in ``[1, t)`` replaced by the corpus's most frequent
other token (``counting.base_contexts``). Two claims:

- the trend, one of two forms:

  - **without a strength**, per context (Hypothesis): with ``1..max_count`` copies of the
    key at drawn positions, the activation ``a(n)`` at ``t`` with the first copies of them
    never falls as ``n`` grows (``a(n+1) >= a(n) - 1e-5 * max(1, |a(n)|)``; never rises for
    ``decreasing``);
  - **with a strength** ``min_spearman`` (``"count [games] >= 2 (spearman >= 0.6)"``, or
    ``min_spearman: 0.6`` in the long form), over all contexts (deterministic, nothing
    drawn): the Spearman correlation of the activation with ``n`` over every (base context,
    ``n``) pair of the detection protocol (copies spread over the prefix, ``n`` up to
    ``max(6, k)``; ``rulecheck.core.counts.counting_curve``), taken with the sign of
    ``direction``, is at least ``min_spearman``, the statistic extraction measures. A failure
    names the measured correlation, the number of contexts and the context whose own curve
    follows the direction least. ``min_spearman`` lies in ``[0.1, 1]`` (``STRENGTH_FLOOR``):
    a key with no effect correlates about 0;

- by majority (the detection protocol, copies spread over the prefix): for ``increasing`` at
  most half of the base contexts are active (activation > 0) at every count ``n < k`` and more
  than half at ``n = k``; for ``decreasing`` more than half are active below ``k`` and at most
  half at ``k``; counts no context has (0 when every query is the key) are skipped. When this
  fails at ``n``, Hypothesis looks for a context that disagrees at ``n`` to show it (a claim
  with a strength shows its weakest context instead).

Extraction proposes, for a detected curve, the claim without a strength and, as its
alternative (one ``slot``), the claim with ``min_spearman`` the measured Spearman rounded
down to a multiple of 0.05 when that is at least ``KEEP_SPEARMAN``; it keeps the first whose
check passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

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
from rulecheck.kinds.card import GREEN, GREY, Column, Figure, Mark, fixed, layout, rounded, visible
from rulecheck.refs import RefTable, TokenRef, ref_entry, ref_name, ref_shown

if TYPE_CHECKING:
    from rulecheck.book import FeatureRules
    from rulecheck.core.counts import CountingCurve

DIRECTIONS = ("increasing", "decreasing")
MAX_COUNT = 6
MAJORITY = 0.5
MONOTONE_RTOL = 1e-5
TOP_KEYS = 1  # finding: counting curves of the keys of this many top terms
KEEP_SPEARMAN = 0.5  # finding: the smallest Spearman stated as a strength

_min_spearman = strength("min_spearman", "that the activation is monotone in every context")

Direction = Literal["increasing", "decreasing"]


@dataclass
class CountingRule(schema.Record):
    """The feature grows (or shrinks) with the number of ``key`` tokens in the context."""

    key: TokenRef = ref_entry(required=True, doc="The token whose copies are counted.")
    direction: Direction = schema.entry(
        schema.choice(*DIRECTIONS),
        default="increasing",
        doc="increasing (the default): the feature grows with the count; decreasing: it shrinks.",
    )
    threshold_count: int | None = schema.entry(
        schema.integer(),
        default=None,
        doc="The count at which the feature turns on (increasing) or off (decreasing); left "
        "out: no threshold is claimed.",
    )
    spearman: float | None = schema.entry(schema.number((-1.0, 1.0)), default=None, measured=True)
    # the claim's strength: the smallest Spearman of the counting curve (see module doc)
    min_spearman: float | None = schema.entry(
        _min_spearman,
        default=None,
        doc="The claim's strength: the Spearman correlation of the activation at the query with "
        "the count of the key, over every (base context, count) pair with copies spread over the "
        "prefix, taken with the direction's sign, is at least this. At least 0.1: a key with no "
        "effect correlates about 0. Left out: the activation must never move against the "
        "direction in any context.",
    )


SHORTHAND = (
    '"count [key] >= N" (on from N copies), "count [key] < N" (off from N), or '
    '"count [key] increasing" (or decreasing), optionally ending "(spearman >= 0.6)", e.g. '
    '"count [games] >= 2"'
)
_STATE = re.compile(
    r"^(?:(?P<op>>=|<) ?(?P<n>[0-9]+)|(?P<direction>increasing|decreasing))"
    r"(?: (?P<tail>\(.*\)))?$"
)
# what follows the key in the shorthand, as the editors' JSON Schema matches it
STATE_PATTERN = r" (?:>= [0-9]+|< [0-9]+|increasing|decreasing)"


class Counting(RuleKind):
    key = "counting"
    claim = CountingRule
    item = "counting"
    figure_name = "count"
    doc = (
        "Counting rules: the feature grows (or shrinks) with the number of key tokens in the "
        "context, and turns on (off) at a threshold count. An empty list, or a key with nothing "
        "after it (null), claims nothing."
    )
    rule_doc = (
        'One counting rule: the shorthand "count [key] >= N" (increasing, on from N copies), '
        '"count [key] < N" (decreasing, on while fewer than N), "count [key] increasing" or '
        '"count [key] decreasing" (no threshold), each optionally ending " (spearman >= 0.6)"; '
        "or {key, direction, threshold_count, min_spearman}."
    )

    def json_forms(self) -> list[dict[str, Any]]:
        text = shorthand_form(
            "Shorthand: count [key] >= N, count [key] < N, count [key] increasing, count [key] "
            'decreasing, each optionally ending " (spearman >= X)" with X in [0.1, 1] written '
            "0.d... or 1 (min_spearman).",
            shorthand_pattern("count {}", STATE_PATTERN + strength_pattern("spearman")),
            [
                "count [games] >= 2",
                "count [https] < 6",
                "count [x] increasing",
                "count [games] >= 2 (spearman >= 0.6)",
            ],
        )
        return [text]

    def read(self, where: schema.Where, value: Any, path: str) -> CountingRule:
        """``"count [key] >= N"``, ``"count [key] < N"``, ``"count [key] increasing"`` (or
        ``decreasing``), or the long form."""
        if not isinstance(value, str):
            return super().read(where, value, path)
        [state], [key] = shorthand(where, value, path, ("count", None), SHORTHAND)
        match = _STATE.match(state)
        if match is None:
            where.fail(path, f"cannot read {value!r}: expected {SHORTHAND}", f"write {SHORTHAND}")
        field = schema.join(path, "min_spearman")
        tail = match["tail"] or ""
        min_spearman = read_strength(where, value, tail, field, "spearman", _min_spearman)
        if match["direction"]:
            direction = cast(Direction, match["direction"])
            return CountingRule(key=key, direction=direction, min_spearman=min_spearman)
        up = match["op"] == ">="
        return CountingRule(
            key=key,
            direction="increasing" if up else "decreasing",
            threshold_count=int(match["n"]),
            min_spearman=min_spearman,
        )

    def write(self, claim: CountingRule, table: RefTable) -> Any:
        text = as_text(table, [claim.key], f"count {{}} {state_text(claim)}")
        return text if text is not None else super().write(claim, table)

    def name(self, claim: CountingRule) -> str:
        return ref_name(claim.key)

    def text(self, claim: CountingRule) -> str:
        """``count [games] >= 2``, and its strength (`` (spearman >= 0.6)``)."""
        return f"count {ref_shown(claim.key)} {state_text(claim)}"

    def columns(self) -> tuple[Column, ...]:
        return (Column("cnt"),)

    def evidence(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        """The counting curve (Fig. 7; the measurements beside the book never hold it): the
        mean activation and the share of active contexts by count, as extraction measures it."""
        from rulecheck.core.counts import counting_curve, default_filler

        rule: CountingRule = rules.counting[index]
        key = ctx.resolver().token(rule.key, f"{self.field(rules, index)}.key")
        assert key is not None
        bench, head = ctx.bench, ctx.head
        corpus, top = bench.load(head)[3], max(MAX_COUNT, rule.threshold_count or 0)
        ex, probe = bench.examples(head, rules.feature, ctx.file), bench.probe(head, rules.feature)
        filler = default_filler(corpus, exclude=(key,))
        curve = counting_curve(probe, corpus, ex, key, max_count=top, filler_token=filler)
        return {
            "mean": [rounded(x, 4) for x in curve.mean_by_count],
            "active": [rounded(x, 4) for x in curve.active_by_count],
            "spearman": rounded(curve.spearman, 4),
            "threshold": curve.threshold_count,
            "contexts": curve.n_contexts,
        }

    def marks(self, claim: CountingRule, outcome: str | None, evidence: Any) -> list[Mark]:
        spearman = (
            [] if claim.spearman is None else [Mark.score(f"Spearman {fixed(claim.spearman, 3)}")]
        )
        return spearman + Mark.outcome(outcome)

    def figure(self, claim: CountingRule, evidence: Any) -> Figure | None:
        return None if evidence is None else _curve_figure(visible(ref_name(claim.key)), evidence)

    def slot(self, claim: CountingRule) -> Hashable:
        return schema.identity((claim.key, claim.direction, claim.threshold_count))

    def keep(self, claim: CountingRule) -> bool:
        return claim.min_spearman is None or claim.min_spearman >= KEEP_SPEARMAN

    def find(self, found: Found) -> list[CountingRule]:
        from rulecheck.core.counts import as_counting_rule, counting_curve

        if found.token_of is None:
            return []
        keys: list[int] = []
        for k in found.terms.key.tolist():
            if int(found.token_of[k]) >= 0 and k not in keys:
                keys.append(k)
            if len(keys) == TOP_KEYS:
                break
        out = []
        for k in keys:
            curve = counting_curve(
                found.probe, found.tokens, found.examples, int(found.token_of[k])
            )
            rule = as_counting_rule(curve)
            if rule is None:
                continue
            claim = CountingRule(
                key=found.ref(k),
                direction=rule.direction,
                threshold_count=rule.threshold_count,
                spearman=schema.significant(rule.spearman, 4),
            )
            out.append(claim)
            signed = abs(rule.spearman)  # as_counting_rule: the sign agrees with the direction
            if signed >= KEEP_SPEARMAN:
                out.append(replace(claim, min_spearman=grid_down(signed)))
        return out

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        import torch

        from rulecheck.core.counterfactuals import repeat_token
        from rulecheck.core.counts import base_contexts, counting_curve, default_filler, own_counts
        from rulecheck.properties import (
            Bases,
            activations,
            copies,
            counterexample,
            falsify,
            run_key,
            shown,
        )

        rule: CountingRule = rules.counting[index]
        bench, head = ctx.bench, ctx.head
        model, _, _, corpus = bench.load(head)
        refs = ctx.resolver()
        key = refs.token(rule.key, f"{self.field(rules, index)}.key")
        assert key is not None
        up, k = rule.direction == "increasing", rule.threshold_count
        top = max(MAX_COUNT, k or 0, 1)
        ex = bench.examples(head, rules.feature, ctx.file)
        filler = default_filler(corpus, exclude=(key,))
        rows, t = base_contexts(corpus, ex, key, filler, "test")
        key_name, filler_name = refs.shown(rule.key, key), refs.shown(rule.key, filler)
        claim = _claim(rules.feature, head.name, key_name, up, k)
        record = {"rule": self.key, "passed": False}
        if len(t) == 0:
            raise RuleFailed(
                f"{claim}: cannot be checked, the feature has no test positives", record=record
            )
        curve = counting_curve(
            bench.probe(head, rules.feature), corpus, ex, key, max_count=top, filler_token=filler
        )
        bad = _majority_violation(curve.active_by_count, up, k)
        if rule.min_spearman is not None:
            claim += strength_text("spearman", rule.min_spearman)
            what = _Contexts(rows, t, key, key_name, filler_name, claim, record)
            return _check_strength(model, curve, rule.min_spearman, up, k, bad, what)
        bases = Bases.of(rows, t)

        def falsified(case: Any) -> dict[str, Any] | None:
            (tokens, t0), at = bases.pool[case[0]], case[2]
            own = int(own_counts(tokens.unsqueeze(0), torch.tensor([t0]), key)[0])
            edits = [repeat_token(tokens, t0, key, n, positions=at[:n]) for n in range(len(at) + 1)]
            rows_n, t_n = [e.tokens for e in edits], [e.t for e in edits]
            acts = activations(bench, head, rules.feature, rows_n, t_n)  # acts[i]: count own + i
            why = _monotone_break(acts, up, own)
            if why is None and bad is not None and 0 <= bad - own < len(acts):
                on = acts[bad - own] > 0
                if on != _expected_on(bad, up, k):
                    why = _state(on, bad)
            if why is None:
                return None
            return {"t0": t0, "edit": edits[-1], "acts": acts, "own": own, "why": why}

        # copies that reach count ``bad``; one fewer where every query is the key
        own_all = int(own_counts(rows, t, key).all())
        cases = bases.cases(key, max(1, (bad or 0) - own_all), top)
        run = falsify(bases, cases, falsified, ctx.examples, run_key(head, rules, rule, MAX_COUNT))
        if run.found is None and bad is None:
            return {**record, "passed": True}
        lines = [
            f"{claim}: falsified",
            f"  criterion: per context, the activation at t never "
            f"{'falls' if up else 'rises'} as copies of {key_name} are added; "
            f"{_majority_text(up, k)} (n: the count of {key_name} in [1, t], t included)",
            f"  base contexts: {len(t)} test positives with {key_name} before t replaced by "
            f"{filler_name}",
            "  share of base contexts active by n (copies spread over the prefix): "
            + ", ".join(
                f"{n}: {s:.0%}" for n, s in enumerate(curve.active_by_count) if not math.isnan(s)
            ),
        ]
        if bad is not None:
            share = curve.active_by_count[bad]
            lines.append(f"  majority violated at n = {bad}: {share:.0%} of base contexts active")
        if run.found is None:
            lines.append(f"  no single drawn context disagrees ({run.summary()})")
        else:
            found = run.found
            acts = ", ".join(f"{n}: {a:.4f}" for n, a in enumerate(found["acts"], found["own"]))
            lines += [
                f"  minimal counterexample, {copies(len(found['edit'].inserted))} inserted: "
                f"{found['why']} ({run.summary()}):",
                *shown(model, found),
                f"  activation at t by n: {acts}",
            ]
            record["counterexample"] = counterexample(model, found)
        raise RuleFailed("\n".join(lines), record=record)


@dataclass(frozen=True)
class _Contexts:
    """A check's base contexts and how its messages name things."""

    rows: Any  # Tensor [n, T]
    t: Any  # Tensor [n]
    key: int
    key_name: str
    filler_name: str
    claim: str
    record: dict[str, Any]


def _check_strength(
    model: Any,
    curve: CountingCurve,
    min_spearman: float,
    up: bool,
    k: int | None,
    bad: int | None,
    c: _Contexts,
) -> dict[str, Any]:
    """The Spearman of the curve, with the direction's sign, is at least ``min_spearman``,
    and the majority changes state at ``k``."""
    import torch

    from rulecheck.core.counterfactuals import repeat_token, spread_positions
    from rulecheck.core.counts import context_spearman
    from rulecheck.properties import counterexample, shown

    measured = curve.spearman if up else -curve.spearman
    n = curve.n_contexts
    record = {**c.record, "spearman": measured, "min_spearman": min_spearman, "contexts": n}
    if measured >= min_spearman and bad is None:
        return {**record, "passed": True}
    assert curve.by_context is not None
    sign = 1.0 if up else -1.0
    i = int(torch.sort(sign * context_spearman(curve.by_context), stable=True).indices[0])
    row = curve.by_context[i]
    acts = row[~row.isnan()].tolist()
    own = int(torch.nonzero(~row.isnan())[0])  # the lowest count this context has
    t0, copies_in = int(c.t[i]), len(acts) - 1
    at = spread_positions(torch.tensor([t0]), copies_in)[0].tolist()
    found = {
        "t0": t0,
        "edit": repeat_token(c.rows[i], t0, c.key, copies_in, positions=at),
        "acts": acts,
        "own": own,
    }
    fails = []
    if measured < min_spearman:
        fails.append(f"Spearman {measured:.3f} < {min_spearman:g} stated")
    if bad is not None:
        share = curve.active_by_count[bad]
        fails.append(f"majority violated at n = {bad} ({share:.0%} of base contexts active)")
    trend = "rises" if up else "falls"
    by_n = ", ".join(f"{m}: {a:.4f}" for m, a in enumerate(acts, own))
    lines = [
        f"{c.claim}: falsified: {', '.join(fails)}, over {n} base contexts",
        f"  criterion: the Spearman correlation of the activation at t with n over every "
        f"(base context, n) pair, copies spread over the prefix, {'' if up else 'negated '}"
        f">= {min_spearman:g}; {_majority_text(up, k)} (n: the count of {c.key_name} in "
        "[1, t], t included)",
        f"  base contexts: {n} test positives with {c.key_name} before t replaced by "
        f"{c.filler_name}",
        "  share of base contexts active by n (copies spread over the prefix): "
        + ", ".join(
            f"{m}: {s:.0%}" for m, s in enumerate(curve.active_by_count) if not math.isnan(s)
        ),
        f"  the context whose activation {trend} least with n, {len(acts) - 1} copies inserted:",
        *shown(model, found),
        f"  activation at t by n: {by_n}",
    ]
    record["counterexample"] = counterexample(model, found)
    raise RuleFailed("\n".join(lines), record=record)


def state_text(claim: CountingRule) -> str:
    """What a counting shorthand says after its key: ``>= 2``, ``< 6``, ``increasing``, then
    its strength (`` (spearman >= 0.6)``) when it states one."""
    state: str
    if claim.threshold_count is None:
        state = claim.direction
    else:
        op = ">=" if claim.direction == "increasing" else "<"
        state = f"{op} {claim.threshold_count}"
    return state + strength_text("spearman", claim.min_spearman)


def _monotone_break(acts: Sequence[float], increasing: bool, first: int = 0) -> str | None:
    """Where a curve ``acts[i]`` (at count ``first + i``) moves against its direction (beyond
    float noise), or None."""
    for i in range(len(acts) - 1):
        step = acts[i + 1] - acts[i] if increasing else acts[i] - acts[i + 1]
        if step < -MONOTONE_RTOL * max(1.0, abs(acts[i])):
            n = first + i
            return f"the activation {'falls' if increasing else 'rises'} from n = {n} to {n + 1}"
    return None


def _expected_on(n: int, increasing: bool, k: int | None) -> bool:
    """The state a counting rule claims at ``n`` copies (``k`` not None)."""
    assert k is not None
    return (n >= k) == increasing


def _majority_violation(shares: Sequence[float], increasing: bool, k: int | None) -> int | None:
    """The first count ``n <= k`` whose majority state is not the claimed one, or None; counts
    no context has (NaN share) are skipped."""
    if k is None:
        return None
    for n in range(k + 1):
        if not math.isnan(shares[n]) and (shares[n] > MAJORITY) != _expected_on(n, increasing, k):
            return n
    return None


def _majority_text(increasing: bool, k: int | None) -> str:
    from rulecheck.properties import copies

    if k is None:
        return "no threshold claimed"
    below, at = ("off", "on") if increasing else ("on", "off")
    return f"by majority of base contexts {below} below {copies(k)} and {at} at {k}"


def _state(on: bool, n: int) -> str:
    return f"{'on (activation > 0)' if on else 'off (activation <= 0)'} at n = {n}"


def _claim(feature: int, head: str, key: str, increasing: bool, k: int | None) -> str:
    from rulecheck.properties import copies

    verb = "rises" if increasing else "falls"
    state = "" if k is None else f", {'on' if increasing else 'off'} from {copies(k)}"
    return f"feature {feature} of {head} {verb} with the count of {key}{state}"


def _curve_figure(name: str, curve: dict[str, Any]) -> Figure:
    """Fig. 7: the mean activation and the share of active contexts against the count of the
    key (NaN-free: counts no context has are gaps)."""
    counts = list(range(len(curve["mean"])))
    fig_layout = layout(
        f"activation against the count of [{name}]",
        "count of the key in the prefix",
        "mean activation",
        yaxis2={
            "title": {"text": "share active"},
            "overlaying": "y",
            "side": "right",
            "range": [0, 1.02],
            "tickformat": ".0%",
        },
        legend={"orientation": "h", "y": -0.3},
    )
    fig_layout["xaxis"]["dtick"] = 1
    if curve.get("threshold") is not None:
        fig_layout["shapes"] = [
            {
                "type": "line",
                "x0": curve["threshold"],
                "x1": curve["threshold"],
                "y0": 0,
                "y1": 1,
                "yref": "paper",
                "line": {"dash": "dot", "color": GREY},
            }
        ]
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": "mean activation",
                "x": counts,
                "y": curve["mean"],
                "line": {"color": GREEN},
            },
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": "share active",
                "x": counts,
                "y": curve["active"],
                "yaxis": "y2",
                "line": {"color": GREY, "dash": "dash"},
            },
        ],
        "layout": fig_layout,
    }
