"""Skip-gram rules ``[key] ... [query] -> feature``: the head attends from the query to an
earlier key and writes the feature.

A feature's skip-grams are one claim: their disjunction predicts the feature. A listed term is
a claim that its pattern turns the feature on, so the binary prediction is "some term's pattern
is present"; recorded scores, when there are any, only set the magnitude used for Spearman.
Items: ``f1``, ``precision`` and ``recall`` of that prediction on the feature's test exemplars
(the same protocol, seed and split as extraction), each at least its ``expect`` minimum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from rulecheck import schema
from rulecheck.errors import RuleFailed
from rulecheck.kinds.base import (
    CheckContext,
    Found,
    RuleKind,
    as_text,
    ref_ids,
    shorthand,
    shorthand_form,
    shorthand_pattern,
)
from rulecheck.kinds.card import CardClaim, CardPart, Column, Mark, fixed
from rulecheck.refs import (
    REFERENCE,
    RefTable,
    Resolver,
    TokenRef,
    escaped,
    read_ref,
    ref_entry,
    ref_name,
    ref_shown,
    shown_token,
)

if TYPE_CHECKING:
    from rulecheck.book import FeatureRules
    from rulecheck.core.evaluate import Columns, Measured
    from rulecheck.core.exemplars import FeatureExamples
    from rulecheck.core.heldout import FireCounts
    from rulecheck.core.scores import Terms
    from rulecheck.session import Head, Workbench

METRICS = ("f1", "precision", "recall")
SHOWN_TERMS = 10  # skip-grams listed on a card (the rest are in the book)
NEXT_TERMS = 3  # skip-grams ``rulecheck show`` lists after the label

T = TypeVar("T")


def _score() -> Any:
    return schema.entry(schema.number(), default=None, measured=True)


SHORTHAND = '"[key] ... [query]", e.g. "[if] ... [then]"'
TEMPLATE = "{} ... {}"  # the shorthand, brackets as ``{}``


def _distance(doc: str) -> Any:
    return schema.entry(schema.integer(0), default=None, doc=doc)


@dataclass
class SkipGram(schema.Record):
    """Query ``query`` attends to key ``key`` and writes the feature: ``[key] ... [query]``;
    with ``max_distance`` (``min_distance``) only where the query is at most (at least) that
    many tokens after the key (0: the same token)."""

    key: TokenRef = ref_entry(required=True, doc="The earlier token the query attends to.")
    query: TokenRef = ref_entry(required=True, doc="The token where the feature fires.")
    attn_score: float | None = _score()
    value_score: float | None = _score()
    importance: float | None = _score()
    max_distance: int | None = _distance(
        "The term holds only where the query is at most this many tokens after the key (query "
        "position minus key position; 0: the same token). Omit it for any distance."
    )
    min_distance: int | None = _distance(
        "The term holds only where the query is at least this many tokens after the key (1: a "
        "previous-token rule with max_distance 1). At most max_distance."
    )


def distance_text(term: SkipGram) -> str:
    """`` (distance <= 3)``, `` (distance 1-3)``, ``(distance >= 2)``, or nothing for a
    term without bounds."""
    lo, hi = term.min_distance, term.max_distance
    if lo is None and hi is None:
        return ""
    if lo is None:
        return f" (distance <= {hi})"
    if hi is None:
        return f" (distance >= {lo})"
    return f" (distance {lo})" if lo == hi else f" (distance {lo}-{hi})"


def label(term: SkipGram) -> str:
    """``[If] ... [then]``: a term as extraction writes it as a feature's label (with its
    distances)."""
    return f"[{ref_name(term.key)}] ... [{ref_name(term.query)}]{distance_text(term)}"


def shown_term(term: SkipGram) -> str:
    """``[If] ... [" then"]``: a term as messages and tables show it, every character of its
    tokens visible (``refs.shown_token``), with its distances."""
    return f"{ref_shown(term.key)} ... {ref_shown(term.query)}{distance_text(term)}"


def shown_label(rules: FeatureRules) -> str:
    """A feature's label as messages and tables show it: a label extraction wrote from one of
    its terms as that term is shown (``shown_term``), any other on one line (``escaped``)."""
    term = next((t for t in rules.skipgrams if rules.label == label(t)), None)
    return escaped(rules.label) if term is None else shown_term(term)


def ranked(rules: FeatureRules, n: int) -> list[tuple[int, SkipGram]]:
    """The ``n`` most important skip-grams with their indices, in file order where importance
    is not given."""

    def rank(pair: tuple[int, SkipGram]) -> tuple[bool, float, int]:
        index, term = pair
        return (term.importance is None, -(term.importance or 0.0), index)

    return sorted(enumerate(rules.skipgrams), key=rank)[:n]


def claim_text(rules: FeatureRules, head: str) -> str:
    """The feature's skip-gram claim in words: ``feature 94 of L0H3 ([If] ... [then])``, by its
    label, or its terms joined by ``or``."""
    terms = shown_label(rules) or " or ".join(map(shown_term, rules.skipgrams))
    return f"feature {rules.feature} of {head} ({terms or 'no skip-grams'})"


def assert_minimums(
    measured: Measured,
    minimums: dict[str, float],
    claim: str,
    record: dict[str, Any],
    missed: Callable[[], list[str]] | None = None,
) -> None:
    """The one threshold comparison: every metric in ``minimums`` reaches its minimum, else
    ``RuleFailed`` naming each short metric and what was measured, and, where recall or F1
    falls short with positives missed, the lines of ``missed`` (``missed_lines``)."""
    short = {m: (getattr(measured, m), v) for m, v in minimums.items() if getattr(measured, m) < v}
    if not short:
        return
    detail = "; ".join(
        f"{m} is {got:.3f}, expected >= {want:.3f}" for m, (got, want) in short.items()
    )
    lines = [
        f"{claim}: {detail}",
        f"  measured on {measured.n_test} test prefixes and {measured.n_hard} hard negatives: "
        f"precision {measured.precision:.3f}, recall {measured.recall:.3f}, F1 "
        f"{measured.f1:.3f}, Spearman {measured.spearman:.3f}",
    ]
    if measured.n_fire:
        lines.append(
            f"  where the rule fires ({measured.n_fire} held-out positions) the feature is on at "
            f"{measured.corpus_precision:.1%}; on the protocol's random negatives alone "
            f"precision is {measured.protocol_precision:.3f}, F1 {measured.protocol_f1:.3f}"
        )
    if missed is not None and measured.recall < 1 and short.keys() & {"recall", "f1"}:
        lines += missed()
    raise RuleFailed("\n".join(lines), record=record)


MISSED_SHOWN = 3  # missed positives a failed recall shows
TAIL = 12  # tokens of each missed prompt shown, the query's last


def missed_lines(
    bench: Workbench, head: Head, rules: FeatureRules, file: str = "", n: int = MISSED_SHOWN
) -> list[str]:
    """What a failed recall shows: the ``n`` strongest test positives the skip-grams predict
    off (``core.misses``), each with its prompt's tail, position and activation, and what
    would have matched it: the feature's terms that match once their distance bounds are
    dropped, else the head's candidate skip-grams present in the prompt (by the tokens there
    and their input-feature ids)."""
    import torch

    from rulecheck.core.evaluate import input_columns
    from rulecheck.core.heads import head_encoder, head_weights, input_directions
    from rulecheck.core.misses import candidate_matches, strongest_missed, unbounded_matches
    from rulecheck.core.rules import prefix_stats
    from rulecheck.core.scores import value_scores

    measure(bench, head, rules, file)  # its predictions on the exemplars, kept
    ex = bench.examples(head, rules.feature, file)
    positives = torch.nonzero(ex.part("test") & (ex.act > 0)).flatten().cpu()
    columns, terms = feature_terms(rules, bench.resolver(head, file))
    seq, t = ex.seq.cpu()[positives], ex.t.cpu()[positives]
    kept = bench.memo(_predictions_key(head, rules), lambda: None)
    assert kept is not None  # measure keeps them
    pred = kept[positives]
    act = ex.act.cpu()[positives]
    picked = strongest_missed(act, pred, n)
    if not len(picked):
        return []
    model, sae_in, sae_out, tokens = bench.load(head)
    w = head_weights(model, head.layer, head.head)
    # one scale for every direction: LayerNorm's mean scale would change no ranking
    d = input_directions(sae_in, w, 1.0)
    u = head_encoder(sae_out, head.head, model.cfg.d_head).to(d.dtype)[:, [rules.feature]]
    value = value_scores(d, w.W_V, u)[:, 0]
    tok = model.tokenizer

    def token(ids: Any, i: int) -> str:
        return shown_token(tok.decode([int(ids[i])])) if tok is not None else f"[{int(ids[i])}]"

    found: dict[int, str] = {}
    for chunk in bench.sequence_chunks(head, seq[picked], t[picked]):  # every input feature
        q_act, k_max = prefix_stats(
            input_columns(chunk.feats, chunk.tokens, columns), chunk.t, chunk.where
        )
        near = unbounded_matches(q_act, k_max, terms.to(q_act.device)).cpu()
        for m, row in enumerate(chunk.rows.tolist()):
            end, ids = int(chunk.t[m]), chunk.tokens[int(chunk.where[m])].cpu()
            book = [shown_term(rules.skipgrams[i]) for i in torch.nonzero(near[m]).flatten()]
            if book:
                its = "its" if len(book) == 1 else "their"
                found[row] = f"the book's {', '.join(book)} without {its} distance bounds"
                continue
            feats = chunk.feats[int(chunk.where[m]), : end + 1]
            cands = candidate_matches(feats, d, w.W_Q, w.W_K, w.form, value, MISSED_SHOWN)
            named = [
                f"{token(ids, c.key_pos)} ... {token(ids, end)} ([#{c.key}] ... [#{c.query}])"
                for c in cands
            ]
            found[row] = (
                "none of the book's terms; the head's candidates here: " + ", ".join(named)
                if named
                else "none of the book's terms, nor a candidate of the head"
            )
    n_missed = int(((act > 0) & (pred <= 0)).sum())
    lines = [
        f"  missed: {n_missed} of {len(positives)} test positives predicted off; the "
        f"{len(picked)} strongest, and what would match them:"
    ]
    for row, i in enumerate(picked.tolist()):
        end = int(t[i])
        start = max(1, end - TAIL + 1)
        tail = _text(model, tokens[int(seq[i]), start : end + 1])
        lines.append(
            f"    t = {end}, activation {float(act[i]):.4f}: {'…' if start > 1 else ''}{tail}"
        )
        lines.append(f"      would match: {found[row]}")
    return lines


def _text(model: Any, ids: Any) -> str:
    """Token ids as text on one line (ids as numbers without a tokenizer)."""
    if model.tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return escaped(model.tokenizer.decode([int(i) for i in ids]))


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
    bounds = [(t.max_distance, t.min_distance) for t in rules.skipgrams]
    features: list[int] = []
    token_sets: list[tuple[int, ...]] = []
    for key, query, _, _ in refs:
        for r in (key, query):
            if r.feature is not None and r.feature not in features:
                features.append(r.feature)
            if r.feature is None and r.token_ids not in token_sets:
                token_sets.append(r.token_ids)
    columns = Columns(tuple(features), tuple(token_sets))
    long, number = torch.long, torch.get_default_dtype()  # typed even with no terms at all
    terms = Terms(
        query=torch.tensor(
            [columns.index(q.feature, q.token_ids) for _, q, _, _ in refs], dtype=long
        ),
        key=torch.tensor(
            [columns.index(k.feature, k.token_ids) for k, _, _, _ in refs], dtype=long
        ),
        attn=torch.tensor([abs(a or 1.0) or 1.0 for _, _, a, _ in refs], dtype=number),
        value=torch.tensor([abs(v or 1.0) or 1.0 for _, _, _, v in refs], dtype=number),
    )
    if any(b != (None, None) for b in bounds):
        terms = replace(
            terms,
            max_distance=torch.tensor([-1 if hi is None else hi for hi, _ in bounds]),
            min_distance=torch.tensor([-1 if lo is None else lo for _, lo in bounds]),
        )
    return columns, terms


def _measure_key(head: Head, rules: FeatureRules) -> tuple:
    return ("skipgrams", head, rules.feature, repr(rules.skipgrams))


def _predictions_key(head: Head, rules: FeatureRules) -> tuple:
    """Where a measurement keeps its predictions on the exemplars, for ``missed_lines``."""
    return ("skipgram predictions", *_measure_key(head, rules)[1:])


def measure(bench: Workbench, head: Head, rules: FeatureRules, file: str = "") -> Measured:
    """Precision, recall, F1 and Spearman of the skip-grams on the feature's test split
    (computed once per session for the same terms). The other features of the book announced
    from ``file`` whose items run this session are measured with it: one pass over the
    distinct sequences of their test prefixes, encoding only the input features they read."""
    return bench.memo(
        _measure_key(head, rules), lambda: _measure_with_book(bench, head, rules, file)
    )


def measure_all(
    bench: Workbench, head: Head, batch: Sequence[FeatureRules], file: str = ""
) -> None:
    """Measure those of ``batch`` (claims of ``head``'s features) not yet measured this
    session, together: one prefix pass and one held-out pass for all, where ``measure`` one
    by one would take one each. A feature that cannot be measured is skipped (``measure``
    then says why)."""
    todo = [r for r in batch if r.skipgrams and not bench.memoized(_measure_key(head, r))]
    if todo:
        _measure_batch(bench, head, todo, file, strict=False)


def _measure_with_book(bench: Workbench, head: Head, rules: FeatureRules, file: str) -> Measured:
    """``measure`` of ``rules``; the book's other features measured on the way are kept."""
    book = bench.announced_features(file)
    batch = [rules]
    if any(r is rules for r in book):  # the book's own claims, on its own head
        batch += [
            r
            for r in book
            if r is not rules and r.skipgrams and not bench.memoized(_measure_key(head, r))
        ]
    measured = _measure_batch(bench, head, batch, file, strict=True)
    assert measured is not None
    return measured


def _measure_batch(
    bench: Workbench, head: Head, batch: Sequence[FeatureRules], file: str, strict: bool
) -> Measured | None:
    """Measure ``batch`` in one prefix pass and one held-out pass, each measurement kept for
    the session; when ``strict``, the first's is returned instead (its caller's memo keeps
    it) and its error raised. A feature that cannot be measured is skipped (its own items
    report why)."""
    import torch

    from rulecheck.core.evaluate import predict_prefixes, score_predictions, union_columns
    from rulecheck.errors import RulecheckError

    prepared = []
    for r in batch:
        try:
            columns, terms = feature_terms(r, bench.resolver(head, file))
            ex = bench.examples(head, r.feature, file)
        except RulecheckError:
            if strict and r is batch[0]:
                raise
            continue  # reported by that feature's own items
        prepared.append((r, columns, terms, ex, ex.part("test")))
    if not prepared:
        return None
    union, index = union_columns([columns for _, columns, _, _, _ in prepared])
    read = [
        replace(terms, query=i[terms.query], key=i[terms.key])
        for i, (_, _, terms, _, _) in zip(index, prepared, strict=True)
    ]
    sizes = [int(test.sum()) for *_, test in prepared]
    owner = torch.repeat_interleave(torch.arange(len(prepared)), torch.tensor(sizes))
    chunks = bench.sequence_chunks(
        head,
        torch.cat([ex.seq[test] for *_, ex, test in prepared]),
        torch.cat([ex.t[test] for *_, ex, test in prepared]),
        union.features,
    )
    preds = predict_prefixes(chunks, owner, union, read).split(sizes)
    fires = held_out_fires(
        bench, head, [(r.feature, ex) for r, _, _, ex, _ in prepared], union, read
    )
    first = None
    for (r, _, _, ex, test), pred, fire in zip(prepared, preds, fires, strict=True):
        full = torch.zeros(len(ex.seq))
        full[test] = pred
        bench.memo(_predictions_key(head, r), functools.partial(_given, full))  # misses read it
        measured = score_predictions(full, ex, fire)
        if strict and r is batch[0]:  # kept by its caller's memo
            first = measured
        else:
            bench.memo(_measure_key(head, r), functools.partial(_given, measured))
    return first


def held_out_fires(
    bench: Workbench,
    head: Head,
    features: list[tuple[int, FeatureExamples]],
    columns: Columns,
    terms: list[Terms],
) -> list[FireCounts | None]:
    """Per feature (with its exemplars), where its ``terms`` fire on the held-out sequences
    (``core.heldout``): one pass over them for all, reading only ``columns``; None each when
    the protocol holds no sequences out."""
    from rulecheck.core.evaluate import fire_positions
    from rulecheck.core.heldout import fire_counts

    col = bench.collector(head)
    if len(col.held_seq) == 0 or not features:
        return [None] * len(features)
    seq = col.held_seq.cpu()
    fires = fire_positions(bench.held_out_chunks(head), len(seq), columns, terms)
    out: list[FireCounts | None] = []
    for (f, ex), fire in zip(features, fires, strict=True):
        n_neg = int((ex.part("test") & (ex.act <= 0)).sum())
        out.append(fire_counts(fire, col.held_out(f, ex), n_neg))
    return out


class SkipGrams(RuleKind):
    key = "skipgrams"
    claim = SkipGram
    always_written = True
    validate = False  # extraction measured them on the same exemplars
    together = True  # the terms of one F1 claim
    def_name = "skipgram"
    doc = (
        "Skip-gram rules [key] ... [query]: the feature fires at the query token when the key "
        "occurred before it. Checked together: the feature's F1, precision and recall against "
        "`expect`. An empty list, or a key with nothing after it (null), claims nothing."
    )
    rule_doc = (
        'One skip-gram: [key, query] (two references), the shorthand "[key] ... [query]", or '
        "{key, query}, which alone can bound the distance: {key, query, max_distance: 3}."
    )

    def json_forms(self) -> list[dict[str, Any]]:
        pair = {
            "description": "[key, query]: two references.",
            "type": "array",
            "items": {"$ref": REFERENCE},
            "minItems": 2,
            "maxItems": 2,
        }
        text = shorthand_form(
            'Shorthand "[key] ... [query]" (quote it in YAML: it starts with [).',
            shorthand_pattern(TEMPLATE),
            ["[if] ... [then]", "[#501] ... [ then]"],
        )
        return [pair, text]

    def read(self, where: schema.Where, value: Any, path: str) -> SkipGram:
        """``[key, query]``, ``"[key] ... [query]"`` or ``{key: ..., query: ...}``, the
        last with ``max_distance``/``min_distance`` where the term is bounded."""
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
        term = super().read(where, value, path)
        lo, hi = term.min_distance, term.max_distance
        if lo is not None and hi is not None and lo > hi:
            where.fail(
                f"{path}.min_distance",
                f"min_distance {lo} is more than max_distance {hi}: no position is that far",
                "swap them, or drop min_distance",
            )
        return term

    def write(self, claim: SkipGram, table: RefTable) -> Any:
        if claim.max_distance is not None or claim.min_distance is not None:
            return super().write(claim, table)  # only the long form says how far
        key, query = table.short(claim.key), table.short(claim.query)
        if isinstance(key, int) and isinstance(query, int):
            return [key, query]
        text = as_text(table, [claim.key, claim.query], TEMPLATE)
        return text if text is not None else super().write(claim, table)

    def items(self, rules: FeatureRules) -> list[tuple[str, int]]:
        return [(m, i) for i, m in enumerate(METRICS) if m in rules.expect]

    def text(self, claim: SkipGram) -> str:
        return shown_term(claim)

    def columns(self) -> tuple[Column, ...]:
        return (Column("terms"), Column("next terms", text=True))

    def cells(self, rules: FeatureRules) -> list[str]:
        """How many terms, and the strongest after the label (the label is normally the
        first term)."""
        terms = [t for _, t in ranked(rules, NEXT_TERMS + 1)]
        shown = [shown_term(t) for t in terms]
        rest = shown[1:] if terms and rules.label == label(terms[0]) else shown[:NEXT_TERMS]
        return [str(len(rules.skipgrams)), ", ".join(rest)]

    def card(
        self, rules: FeatureRules, outcomes: Mapping[int, str], evidence: Mapping[int, Any]
    ) -> CardPart:
        """The ``SHOWN_TERMS`` most important terms with their scores, numbered; the items
        (``f1``, ...) are the feature's, listed with the others on the card."""
        ordered = ranked(rules, SHOWN_TERMS)
        claims = tuple(
            CardClaim(i, shown_term(t), ref_ids(t), tuple(_marks(t))) for i, t in ordered
        )
        more = max(0, len(rules.skipgrams) - len(ordered))
        return CardPart("Skip-grams", claims, rules.source, ordered=True, more=more, empty="none")

    def check(self, ctx: CheckContext, rules: FeatureRules, index: int) -> dict[str, Any]:
        metric = METRICS[index]
        measured = measure(ctx.bench, ctx.head, rules, ctx.file)
        value, minimum = getattr(measured, metric), rules.expect[metric] - ctx.tolerance
        record = {"metric": metric, "measured": value, "expected": minimum, "f1": measured.f1}
        claim = claim_text(rules, ctx.head.name)

        def missed() -> list[str]:
            return missed_lines(ctx.bench, ctx.head, rules, ctx.file)

        assert_minimums(measured, {metric: minimum}, claim, {**record, "passed": False}, missed)
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
                max_distance=None
                if t.max_distance is None or int(t.max_distance[i]) < 0
                else int(t.max_distance[i]),
            )
            for i, (q, k, a, v) in enumerate(zip(t.query, t.key, t.attn, t.value, strict=True))
        ]


def _marks(term: SkipGram) -> list[Mark]:
    marks = []
    if term.importance is not None:
        marks.append(Mark.score(f"importance {fixed(term.importance, 4)}"))
    if term.attn_score is not None:
        value = "–" if term.value_score is None else fixed(term.value_score, 3)
        marks.append(Mark.score(f"attn {fixed(term.attn_score, 3)}", f"value {value}"))
    return marks


def _given(value: T) -> T:
    """``value``: what ``memo`` keeps when it was computed already."""
    return value
