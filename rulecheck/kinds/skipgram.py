"""Skip-gram rules ``[key] ... [query] -> feature``: the head attends from the query to an
earlier key and writes the feature.

A feature's skip-grams are one claim: their disjunction predicts the feature. A listed term is
a claim that its pattern turns the feature on, so the binary prediction is "some term's pattern
is present"; recorded scores, when there are any, only set the magnitude used for Spearman.
Items: ``f1``, ``precision`` and ``recall`` of that prediction on the feature's test exemplars
(the same protocol, seed and split as extraction), each at least its ``expect`` minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rulecheck import schema
from rulecheck.errors import RuleFailed
from rulecheck.kinds.base import CheckContext, Found, RuleKind, as_text, shorthand
from rulecheck.refs import RefTable, Resolver, TokenRef, read_ref, ref_entry, ref_name

if TYPE_CHECKING:
    from rulecheck.book import FeatureRules
    from rulecheck.core.evaluate import Columns, Measured
    from rulecheck.core.scores import Terms
    from rulecheck.session import Head, Workbench

METRICS = ("f1", "precision", "recall")


def _score() -> Any:
    return schema.entry(schema.number(), default=None, measured=True)


SHORTHAND = '"[key] ... [query]", e.g. "[if] ... [then]"'


@dataclass
class SkipGram(schema.Record):
    """Query ``query`` attends to key ``key`` and writes the feature: ``[key] ... [query]``."""

    key: TokenRef = ref_entry(required=True)
    query: TokenRef = ref_entry(required=True)
    attn_score: float | None = _score()
    value_score: float | None = _score()
    importance: float | None = _score()


def label(term: SkipGram) -> str:
    """``[If] ... [then]``: a term as a feature's label shows it."""
    return f"[{ref_name(term.key)}] ... [{ref_name(term.query)}]"


def claim_text(rules: FeatureRules, head: str) -> str:
    """The feature's skip-gram claim in words: ``feature 94 of L0H3 ([If] ... [then])``, by its
    label, or its terms joined by ``or``."""
    terms = rules.label or " or ".join(label(t) for t in rules.skipgrams) or "no skip-grams"
    return f"feature {rules.feature} of {head} ({terms})"


def assert_minimums(
    measured: Measured, minimums: dict[str, float], claim: str, record: dict[str, Any]
) -> None:
    """The one threshold comparison: every metric in ``minimums`` reaches its minimum, else
    ``RuleFailed`` naming each short metric and what was measured."""
    short = {m: (getattr(measured, m), v) for m, v in minimums.items() if getattr(measured, m) < v}
    if not short:
        return
    detail = "; ".join(
        f"{m} is {got:.3f}, expected >= {want:.3f}" for m, (got, want) in short.items()
    )
    raise RuleFailed(
        f"{claim}: {detail}\n"
        f"  measured on {measured.n_test} test prefixes: precision {measured.precision:.3f}, "
        f"recall {measured.recall:.3f}, F1 {measured.f1:.3f}, Spearman {measured.spearman:.3f}",
        record=record,
    )


def feature_terms(rules: FeatureRules, resolver: Resolver) -> tuple[Columns, Terms]:
    """The input columns the skip-grams read (features first, then token sets) and the terms
    over them; every listed term is live, missing scores count as 1."""
    import torch

    from rulecheck.core.evaluate import Columns
    from rulecheck.core.scores import Terms

    refs = []
    for i, term in enumerate(rules.skipgrams):
        where = f"feature[{rules.feature}].skipgrams[{i}]"
        key = resolver.resolve(term.key, f"{where}.key")
        query = resolver.resolve(term.query, f"{where}.query")
        refs.append((key, query, term.attn_score, term.value_score))
    features: list[int] = []
    token_sets: list[tuple[int, ...]] = []
    for key, query, _, _ in refs:
        for r in (key, query):
            if r.feature is not None and r.feature not in features:
                features.append(r.feature)
            if r.feature is None and r.token_ids not in token_sets:
                token_sets.append(r.token_ids)
    columns = Columns(tuple(features), tuple(token_sets))
    terms = Terms(
        query=torch.tensor([columns.index(q.feature, q.token_ids) for _, q, _, _ in refs]),
        key=torch.tensor([columns.index(k.feature, k.token_ids) for k, _, _, _ in refs]),
        attn=torch.tensor([abs(a or 1.0) or 1.0 for _, _, a, _ in refs]),
        value=torch.tensor([abs(v or 1.0) or 1.0 for _, _, _, v in refs]),
    )
    return columns, terms


def measure(bench: Workbench, head: Head, rules: FeatureRules, file: str = "") -> Measured:
    """Precision, recall, F1 and Spearman of the skip-grams on the feature's test split
    (computed once per session for the same terms)."""
    key = ("skipgrams", head, rules.feature, repr(rules.skipgrams))

    def compute() -> Measured:
        import torch

        from rulecheck.core.evaluate import Columns, predict_examples, score_predictions

        columns, terms = feature_terms(rules, bench.resolver(head, file))
        ex = bench.examples(head, rules.feature, file)
        # only the test split is scored: run only its prefixes, and encode only the input
        # features the rules read (they come first, numbered 0..n-1)
        test = ex.part("test")
        chunks = bench.prefix_chunks(head, ex.seq[test], ex.t[test], columns.features)
        read = Columns(tuple(range(len(columns.features))), columns.token_sets)
        device = torch.device(bench.device)
        pred = torch.zeros(len(ex.seq), device=device)
        pred[test.to(device)] = predict_examples(chunks, read, terms, int(test.sum()), device)
        return score_predictions(pred, ex)

    return bench.memo(key, compute)


class SkipGrams(RuleKind):
    key = "skipgrams"
    claim = SkipGram
    always_written = True
    validate = False  # extraction measured them on the same exemplars
    together = True  # the terms of one F1 claim

    def read(self, where: schema.Where, value: Any, path: str) -> SkipGram:
        """``[key, query]``, ``"[key] ... [query]"`` or ``{key: ..., query: ...}``."""
        if isinstance(value, str):
            _, (key, query) = shorthand(where, value, path, ("", "...", ""), SHORTHAND)
            return SkipGram(key=key, query=query)
        if isinstance(value, list):
            if len(value) != 2:
                where.fail(
                    path,
                    f"a skip-gram list is [key, query], got {len(value)} items",
                    f"write [key, query] (input feature ids or tokens) or {SHORTHAND}",
                )
            return SkipGram(
                key=read_ref(where, value[0], f"{path}[0]"),
                query=read_ref(where, value[1], f"{path}[1]"),
            )
        return super().read(where, value, path)

    def write(self, claim: SkipGram, table: RefTable) -> Any:
        key, query = table.short(claim.key), table.short(claim.query)
        if isinstance(key, int) and isinstance(query, int):
            return [key, query]
        text = as_text(table, [claim.key, claim.query], "{} ... {}")
        return text if text is not None else super().write(claim, table)

    def items(self, rules: FeatureRules) -> list[tuple[str, int]]:
        return [(m, i) for i, m in enumerate(METRICS) if m in rules.expect]

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        metric = METRICS[index]
        measured = measure(ctx.bench, ctx.head, rules, ctx.file)
        value, minimum = getattr(measured, metric), rules.expect[metric] - ctx.tolerance
        record = {"metric": metric, "measured": value, "expected": minimum, "f1": measured.f1}
        claim = claim_text(rules, ctx.head.name)
        assert_minimums(measured, {metric: minimum}, claim, {**record, "passed": False})
        return {**record, "passed": True}

    def find(self, found: Found) -> list[SkipGram]:
        t = found.terms
        return [
            SkipGram(
                key=found.ref(int(k)),
                query=found.ref(int(q)),
                attn_score=schema.significant(float(a), 4),
                value_score=schema.significant(float(v), 4),
                importance=None
                if t.importance is None
                else schema.significant(float(t.importance[i]), 4),
            )
            for i, (q, k, a, v) in enumerate(zip(t.query, t.key, t.attn, t.value, strict=True))
        ]
