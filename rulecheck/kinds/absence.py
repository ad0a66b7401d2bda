"""Absence rules ``[k'] ... [q] -/-> feature`` (paper 4.2, A.4): a distractor key steals the
query's attention from the term's key and suppresses the feature.

Finding: for the top terms ``(q, k)``, a distractor is a key ``k'`` with ``attn-score(q, k') >
attn-score(q, k)`` and ``value-score(k') < 0`` beyond numerical noise, whose token occurs in
the corpus body and is not BOS (``rulecheck.core.distractors.find_distractors``); its token
inserted 1..4 times into test positives that read ``k ... q`` gives the mean relative drop
(Fig. 6c), and a candidate whose one copy halves the activation on average is kept.

Checking (Hypothesis over counterfactual edits): the prompts are the feature's test positives
whose prefix reads ``key ... query`` (query at ``t``, key before it; all test positives when
no positive does or the tokens are unknown). Inserting ``n = 1..4`` copies of the distractor
token, each right before a drawn position in ``[1, t]`` (occurrences of the key are never
dropped to make room), must cut the activation at the tracked token at least in half::

    after <= (1 - margin) * before        (margin = 0.5)

A neutral token leaves the activation (almost) unchanged, so it does not pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rulecheck import schema
from rulecheck.errors import RuleFailed
from rulecheck.kinds.base import CheckContext, Found, RuleKind, as_text, shorthand
from rulecheck.refs import RefTable, TokenRef, ref_entry, ref_name

if TYPE_CHECKING:
    from rulecheck.book import FeatureRules

MARGIN = 0.5  # the check: inserted distractors leave at most half of the activation
MAX_COPIES = 4
MIN_DROP = 0.5  # finding: one copy halves the activation, on average
TOP_TERMS = 3  # finding: distractors of this many top terms


@dataclass
class AbsenceRule(schema.Record):
    """A skip-gram that is suppressed when ``distractor`` is also in the context."""

    key: TokenRef = ref_entry(required=True)
    query: TokenRef = ref_entry(required=True)
    distractor: TokenRef = ref_entry(required=True)
    attn_score: float | None = schema.entry(schema.number(), default=None, measured=True)
    value_score: float | None = schema.entry(schema.number(), default=None, measured=True)
    drop: list[float] = schema.entry(
        schema.list_of(schema.number(), "numbers"),
        default_factory=list,
        dump=list,
        omit=lambda v: not v,
        measured=True,
    )


SHORTHAND = '"[key] ... [query] unless [distractor]", e.g. "[if] ... [then] unless [unless]"'


class Absence(RuleKind):
    key = "absence"
    claim = AbsenceRule
    item = "absence"

    def read(self, where: schema.Where, value: Any, path: str) -> AbsenceRule:
        """``"[key] ... [query] unless [distractor]"`` or the long form."""
        if isinstance(value, str):
            words = ("", "...", "unless", "")
            _, (key, query, distractor) = shorthand(where, value, path, words, SHORTHAND)
            return AbsenceRule(key=key, query=query, distractor=distractor)
        return super().read(where, value, path)

    def write(self, claim: AbsenceRule, table: RefTable) -> Any:
        refs = [claim.key, claim.query, claim.distractor]
        text = as_text(table, refs, "{} ... {} unless {}")
        return text if text is not None else super().write(claim, table)

    def name(self, claim: AbsenceRule) -> str:
        return ref_name(claim.distractor)

    def find(self, found: Found) -> list[AbsenceRule]:
        from rulecheck.core.distractors import distractor_drop, find_distractors, text_keys

        if found.token_of is None:
            return []
        w = found.weights
        text = text_keys(found.tokens, found.token_of)
        out = []
        for dis in find_distractors(
            found.d, w.W_Q, w.W_K, w.attn_scale, found.value_score, found.terms, TOP_TERMS, text
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
            out.append(
                AbsenceRule(
                    key=found.ref(dis.key),
                    query=found.ref(dis.query),
                    distractor=found.ref(dis.distractor),
                    attn_score=schema.significant(dis.attn_score, 4),
                    value_score=schema.significant(dis.value_score, 4),
                    drop=[schema.significant(x, 4) for x in drop],
                )
            )
        return out

    def keep(self, claim: AbsenceRule) -> bool:
        return not any(math.isnan(x) for x in claim.drop) and claim.drop[0] >= MIN_DROP

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        from rulecheck.core.distractors import matches_term, split_positives
        from rulecheck.properties import (
            Bases,
            activations,
            copies,
            counterexample,
            falsify,
            run_key,
            shown,
        )

        rule: AbsenceRule = rules.absence[index]
        bench, head = ctx.bench, ctx.head
        model, _, _, corpus = bench.load(head)
        where = self.field(rules, index)
        refs = ctx.resolver()
        distractor = refs.token(rule.distractor, f"{where}.distractor")
        key = refs.token(rule.key, f"{where}.key", required=False)
        query = refs.token(rule.query, f"{where}.query", required=False)
        name = refs.name(rule.distractor, distractor)
        term = f"[{refs.name(rule.key, key)}] ... [{refs.name(rule.query, query)}]"
        claim = f"[{name}] suppresses feature {rules.feature} ({term}) of {head.name}"
        record = {"rule": self.key, "passed": False}

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
        bases = Bases.of(rows, t, () if key is None else (key,))

        def falsified(case: Any) -> dict[str, Any] | None:
            (tokens, t0), edit = bases.edit(case)
            before, after = activations(
                bench, head, rules.feature, [tokens, edit.tokens], [t0, edit.t]
            )
            if after <= (1 - MARGIN) * before:
                return None
            return {"t0": t0, "edit": edit, "before": before, "after": after}

        assert distractor is not None
        cases = bases.cases(distractor, 1, MAX_COPIES)
        run_id = run_key(head, rules, rule, MARGIN, MAX_COPIES)
        run = falsify(bases, cases, falsified, ctx.examples, run_id)
        if run.found is None:
            return {**record, "passed": True}
        found = run.found
        drop = (found["before"] - found["after"]) / found["before"] if found["before"] else 0.0
        raise RuleFailed(
            "\n".join(
                [
                    f"{claim}: falsified",
                    f"  criterion: 1-{MAX_COPIES} copies of [{name}] inserted before t leave "
                    f"at most {1 - MARGIN:.0%} of the activation at t (after <= "
                    f"{1 - MARGIN:g} * before)",
                    f"  prompts: {pool}",
                    f"  minimal counterexample, {copies(len(found['edit'].inserted))} inserted "
                    f"({run.summary()}):",
                    *shown(model, found),
                    f"  activation at t: before {found['before']:.4f}, after "
                    f"{found['after']:.4f} (drop {drop:.1%}, needed >= {MARGIN:.0%})",
                ]
            ),
            record={**record, "counterexample": counterexample(model, found)},
        )
