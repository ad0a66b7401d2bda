"""Absence and counting rules checked as properties, with Hypothesis over counterfactual edits.

Absence, ``[k'] ... [q] -/-> g``: the prompts are the feature's test positives whose prefix
reads ``key ... query`` (query at ``t``, key before it; all test positives when no positive
does or the tokens are unknown). Inserting ``n = 1..4`` copies of the distractor token, each
right before a drawn position in ``[1, t]`` (occurrences of the key are never dropped to make
room), must cut the activation at the tracked token at least in half::

    after <= (1 - margin) * before        (margin = 0.5)

A neutral token leaves the activation (almost) unchanged, so it does not pass.

Counting, ``key`` with ``direction`` and ``threshold_count`` ``k``: base contexts are the
feature's test positives with the key in ``[1, t)`` replaced by the corpus's most frequent
other token (``counting.base_contexts``). Two claims:

- per context (Hypothesis): with ``N = 1..max_count`` copies of the key at drawn positions, the
  activation ``a(n)`` at ``t`` with the first ``n`` of them never falls as ``n`` grows
  (``a(n+1) >= a(n) - 1e-5 * max(1, |a(n)|)``; never rises for ``decreasing``);
- by majority (the detection protocol, ``counting.counting_curve``, copies spread over the
  prefix): for ``increasing`` at most half of the base contexts are active (activation > 0)
  at every ``n < k`` and more than half at ``n = k``; for ``decreasing`` more than half are
  active below ``k`` and at most half at ``k``. When this fails at ``n``, Hypothesis looks for
  a context that disagrees at ``n`` to show it.

The counterexample reported is Hypothesis's minimal one, moved to the shortest prompt on which
the same insertions (positions capped at its ``t``) still falsify the claim.

Tokens of a rulebook reference: the first of its ``tokens`` that is one token of the model's
tokenizer; with only a feature id, at layer 0, the token that activates that input feature most.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy
from torch import Tensor

from rulecheck.absence import matches_term, split_positives
from rulecheck.counterfactuals import Edit, render, repeat_token
from rulecheck.counting import base_contexts, counting_curve, default_filler
from rulecheck.errors import RulecheckError
from rulecheck.evaluate import token_id
from rulecheck.rulebook import AbsenceRule, CountingRule, FeatureRules, TokenRef
from rulecheck.strategies import (
    Base,
    check_settings,
    insert_at,
    insertion_plans,
    protected_positions,
    room,
    shortest_first,
)
from rulecheck.tokens import top_token

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from rulecheck.session import Head, Workbench

ABSENCE_MARGIN = 0.5
MAX_COPIES = 4
MAX_COUNT = 6
MAJORITY = 0.5
MONOTONE_RTOL = 1e-5

Case = tuple[int, list[int], list[int]]  # (prompt index, tokens to insert, their positions)
_TOP_TOKENS: WeakKeyDictionary[Any, Tensor] = WeakKeyDictionary()


# -------------------------------------------------------------------------------- absence


def check_absence(
    bench: Workbench,
    head: Head,
    rules: FeatureRules,
    rule: AbsenceRule,
    file: str,
    examples: int = 25,
    *,
    margin: float = ABSENCE_MARGIN,
    max_copies: int = MAX_COPIES,
) -> str | None:
    """None when the distractor suppresses the feature on every drawn prompt (see module doc),
    else a description of the minimal counterexample."""
    model, sae_in, _, corpus = bench.load(head)
    where = _field(rules, "absence", rule)
    refs = _Refs(model, sae_in, head.layer, file)
    distractor = refs.token(rule.distractor, f"{where}.distractor")
    key = refs.token(rule.key, f"{where}.key", required=False)
    query = refs.token(rule.query, f"{where}.query", required=False)
    assert distractor is not None
    name, term = refs.name(rule.distractor, distractor), _term(refs, rule, key, query)
    claim = f"[{name}] suppresses feature {rules.feature} ({term}) of {_head(head)}"

    rows, t = split_positives(corpus, bench.examples(head, rules.feature, file), "test")
    pool = f"{len(t)} test positives"
    if key is not None and query is not None:
        reads = matches_term(rows, t, key, query)
        if reads.any():
            rows, t = rows[reads], t[reads]
            pool = f"{len(t)} test positives reading {term} at t"
        else:
            pool += f" (none reads {term} at t)"
    if len(t) == 0:
        return f"{claim}: cannot be checked, the feature has no test positives"
    bases = _Bases(shortest_first(rows, t), () if key is None else (key,))

    def falsified(case: Case) -> dict[str, Any] | None:
        (tokens, t0), edit = bases.edit(case)
        before, after = _activation(bench, head, rules.feature, [tokens, edit.tokens], [t0, edit.t])
        if after <= (1 - margin) * before:
            return None
        return {"t0": t0, "edit": edit, "before": before, "after": after}

    cases = bases.cases(distractor, 1, max_copies)
    run = _falsify(bases, cases, falsified, examples, _key(head, rules, rule, margin, max_copies))
    if run.found is None:
        return None
    found = run.found
    drop = (found["before"] - found["after"]) / found["before"] if found["before"] else 0.0
    return "\n".join(
        [
            f"{claim}: falsified",
            f"  criterion: 1-{max_copies} copies of [{name}] inserted before t leave at "
            f"most {1 - margin:.0%} of the activation at t (after <= {1 - margin:g} * before)",
            f"  prompts: {pool}",
            f"  minimal counterexample, {_copies(len(found['edit'].inserted))} inserted "
            f"({run.summary()}):",
            *_shown(model, found),
            f"  activation at t: before {found['before']:.4f}, after {found['after']:.4f} "
            f"(drop {drop:.1%}, needed >= {margin:.0%})",
        ]
    )


# ------------------------------------------------------------------------------- counting


def check_counting(
    bench: Workbench,
    head: Head,
    rules: FeatureRules,
    rule: CountingRule,
    file: str,
    examples: int = 25,
    *,
    max_count: int = MAX_COUNT,
) -> str | None:
    """None when the feature follows the count of the key (see module doc), else a description
    of the minimal counterexample."""
    model, sae_in, _, corpus = bench.load(head)
    where = _field(rules, "counting", rule)
    key = _Refs(model, sae_in, head.layer, file).token(rule.key, f"{where}.key")
    assert key is not None
    up, k = rule.direction == "increasing", rule.threshold_count
    top = max(max_count, k or 0, 1)
    ex = bench.examples(head, rules.feature, file)
    filler = default_filler(corpus, exclude=(key,))
    rows, t = base_contexts(corpus, ex, key, filler, "test")
    claim = _counting_claim(rules.feature, head, token_name(model, key), up, k)
    if len(t) == 0:
        return f"{claim}: cannot be checked, the feature has no test positives"
    curve = counting_curve(
        bench.probe(head, rules.feature), corpus, ex, key, max_count=top, filler_token=filler
    )
    bad = _majority_violation(curve.active_by_count, up, k)
    bases = _Bases(shortest_first(rows, t))

    def falsified(case: Case) -> dict[str, Any] | None:
        (tokens, t0), at = bases.pool[case[0]], case[2]
        edits = [repeat_token(tokens, t0, key, n, positions=at[:n]) for n in range(len(at) + 1)]
        rows = [e.tokens for e in edits]
        acts = _activation(bench, head, rules.feature, rows, [e.t for e in edits])
        why = _monotone_break(acts, up)
        if why is None and bad is not None and (acts[bad] > 0) != _expected_on(bad, up, k):
            why = _state(acts[bad] > 0, bad)
        return None if why is None else {"t0": t0, "edit": edits[-1], "acts": acts, "why": why}

    cases = bases.cases(key, max(1, bad or 0), top)
    run = _falsify(bases, cases, falsified, examples, _key(head, rules, rule, max_count))
    if run.found is None and bad is None:
        return None
    lines = [
        f"{claim}: falsified",
        f"  criterion: per context, the activation at t never {'falls' if up else 'rises'} as "
        f"copies of [{token_name(model, key)}] are added; {_majority_text(up, k)}",
        f"  base contexts: {len(t)} test positives with [{token_name(model, key)}] before t "
        f"replaced by [{token_name(model, filler)}]",
        "  share of base contexts active by n (copies spread over the prefix): "
        + ", ".join(f"{n}: {s:.0%}" for n, s in enumerate(curve.active_by_count)),
    ]
    if bad is not None:
        share = curve.active_by_count[bad]
        lines.append(f"  majority violated at n = {bad}: {share:.0%} of base contexts active")
    if run.found is None:
        lines.append(f"  no single drawn context disagrees ({run.summary()})")
        return "\n".join(lines)
    found = run.found
    acts = ", ".join(f"{n}: {a:.4f}" for n, a in enumerate(found["acts"]))
    lines += [
        f"  minimal counterexample, {_copies(len(found['edit'].inserted))} inserted: "
        f"{found['why']} ({run.summary()}):",
        *_shown(model, found),
        f"  activation at t by n: {acts}",
    ]
    return "\n".join(lines)


def _monotone_break(acts: Sequence[float], increasing: bool) -> str | None:
    """Where a curve ``acts[n]`` moves against its direction (beyond float noise), or None."""
    for n in range(len(acts) - 1):
        step = acts[n + 1] - acts[n] if increasing else acts[n] - acts[n + 1]
        if step < -MONOTONE_RTOL * max(1.0, abs(acts[n])):
            return f"the activation {'falls' if increasing else 'rises'} from n = {n} to {n + 1}"
    return None


def _expected_on(n: int, increasing: bool, k: int | None) -> bool:
    """The state a counting rule claims at ``n`` copies (``k`` not None)."""
    assert k is not None
    return (n >= k) == increasing


def _majority_violation(shares: Sequence[float], increasing: bool, k: int | None) -> int | None:
    """The first ``n <= k`` whose majority state is not the claimed one, or None."""
    if k is None:
        return None
    for n in range(k + 1):
        if (shares[n] > MAJORITY) != _expected_on(n, increasing, k):
            return n
    return None


def _majority_text(increasing: bool, k: int | None) -> str:
    if k is None:
        return "no threshold claimed"
    below, at = ("off", "on") if increasing else ("on", "off")
    return f"by majority of base contexts {below} below {_copies(k)} and {at} at {k}"


def _state(on: bool, n: int) -> str:
    return f"{'on (activation > 0)' if on else 'off (activation <= 0)'} at n = {n}"


def _counting_claim(feature: int, head: Head, key: str, increasing: bool, k: int | None) -> str:
    verb = "rises" if increasing else "falls"
    state = "" if k is None else f", {'on' if increasing else 'off'} from {_copies(k)}"
    return f"feature {feature} of {_head(head)} {verb} with the count of [{key}]{state}"


# -------------------------------------------------------------------------- running a check


@dataclass(frozen=True)
class _Bases:
    """A check's prompts, shortest first, and the cases drawn on them."""

    pool: list[Base]
    protect_tokens: tuple[int, ...] = ()

    def cases(self, ids: int, min_count: int, max_count: int) -> SearchStrategy[Case]:
        """A prompt (by index, shrinking to the shortest) and insertions of ``ids``."""

        @st.composite
        def draw_case(draw: DrawFn) -> Case:
            i = draw(st.integers(0, len(self.pool) - 1))
            plan = insertion_plans(self.pool[i], ids, max_count, min_count=min_count,
                                   protect_tokens=self.protect_tokens)  # fmt: skip
            return (i, *draw(plan))

        return draw_case()

    def edit(self, case: Case) -> tuple[Base, Edit]:
        tokens, t = self.pool[case[0]]
        keep = protected_positions(tokens, t, self.protect_tokens)
        return (tokens, t), insert_at(tokens, t, case[1], case[2], keep)

    def shorter(self, case: Case) -> Iterator[Case]:
        """The case's insertions on each shorter prompt (positions capped at its ``t``)."""
        for i in range(case[0]):
            tokens, t = self.pool[i]
            keep = protected_positions(tokens, t, self.protect_tokens)
            if room(tokens, t, keep) >= len(case[1]):
                yield i, case[1], [min(a, t) for a in case[2]]


@dataclass
class _Run:
    """Calls of a property: how many, the first failing one, the last failing case and what it
    showed (Hypothesis replays the minimal failing example last)."""

    examples: int
    calls: int = 0
    first: int | None = None
    case: Case | None = None
    found: dict[str, Any] | None = None
    moved: bool = False

    def summary(self) -> str:
        moved = ", then moved to a shorter prompt" if self.moved else ""
        return (
            f"found at example {self.first} of at most {self.examples}, "
            f"{self.calls} examples run in all with shrinking{moved}"
        )


class _Falsified(AssertionError):
    """The property does not hold on the current example."""


def _falsify(
    bases: _Bases,
    cases: SearchStrategy[Case],
    falsified: Callable[[Case], dict[str, Any] | None],
    examples: int,
    key: str,
) -> _Run:
    """Run ``falsified`` on ``cases`` with Hypothesis (``key`` names the check); the run's
    ``found`` is the minimal counterexample, moved to the shortest prompt still falsified by
    the same insertions, or None when none was found."""
    run = _Run(examples)

    @check_settings(examples, key)
    @given(cases)
    def prop(case: Case) -> None:
        run.calls += 1
        found = falsified(case)
        if found is not None:
            run.first = run.first or run.calls
            run.case, run.found = case, found
            raise _Falsified

    with contextlib.suppress(_Falsified):
        prop()
    if run.case is not None:
        for case in bases.shorter(run.case):
            found = falsified(case)
            if found is not None:
                run.case, run.found, run.moved = case, found, True
                break
    return run


def _shown(model: HookedTransformer, found: dict[str, Any]) -> list[str]:
    """The counterexample's prompt (inserted tokens marked) and position."""
    edit = found["edit"]
    return [
        f"    {render(model, edit, upto_t=True)}",
        f"  position: t = {edit.t} ({found['t0']} before the insertion)",
    ]


def _activation(
    bench: Workbench, head: Head, feature: int, rows: Sequence[Tensor], t: Sequence[int]
) -> list[float]:
    """The feature's activation at ``t[i]`` of each row, in one forward pass."""
    return bench.probe(head, feature).at(torch.stack(list(rows)), torch.tensor(list(t))).tolist()


# ------------------------------------------------------------------------------------ tokens


def ref_token(
    ref: TokenRef,
    model: HookedTransformer,
    sae_in: SAE,
    layer: int,
    *,
    file: str,
    field: str,
    required: bool = True,
) -> int | None:
    """The token id of a rulebook reference: the first of its ``tokens`` that is one token of
    the model's tokenizer; with only a feature id, at layer 0, the token that activates that
    input feature most. Otherwise a one-line ``RulecheckError`` (None when not ``required``)."""
    by_feature = ref.feature is not None and layer == 0
    if ref.tokens and not (by_feature and model.tokenizer is None):
        return _first_token(model.tokenizer, ref.tokens, file, field)
    if by_feature:
        return _feature_token(model, sae_in, ref.feature, file, field)  # type: ignore[arg-type]
    if not required:
        return None
    raise RulecheckError(
        f"input feature {ref.feature} is given by id only; at layer {layer} a property check "
        "needs its token",
        file=file,
        field=field,
        fix='add `tokens: ["..."]` with the token that fires it',
    )


def token_name(model: HookedTransformer, token: int) -> str:
    """How a token is shown in a claim: its text without surrounding spaces."""
    if model.tokenizer is None:
        return str(token)
    text = model.tokenizer.decode([token])
    return text.strip() or text


def _first_token(tokenizer: Any, texts: Sequence[str], file: str, field: str) -> int:
    errors = []
    for i, text in enumerate(texts):
        try:
            return token_id(tokenizer, text, file=file, field=f"{field}.tokens[{i}]")
        except RulecheckError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise RulecheckError(
        f"none of the tokens {list(texts)} is one token of the model's tokenizer",
        file=file,
        field=f"{field}.tokens",
        fix="list at least one single token",
    )


def _feature_token(
    model: HookedTransformer, sae_in: SAE, feature: int, file: str, field: str
) -> int:
    d_sae = sae_in.cfg.d_sae
    if not 0 <= feature < d_sae:
        raise RulecheckError(
            f"input feature {feature} is out of range: the input SAE has {d_sae} features",
            file=file,
            field=f"{field}.feature",
            fix=f"use a feature id in 0..{d_sae - 1}",
        )
    if sae_in not in _TOP_TOKENS:
        _TOP_TOKENS[sae_in] = top_token(model, sae_in).cpu()
    token = int(_TOP_TOKENS[sae_in][feature])
    if token < 0:
        raise RulecheckError(
            f"input feature {feature} is not activated by any single token",
            file=file,
            field=f"{field}.feature",
            fix='add `tokens: ["..."]` with the token that fires it',
        )
    return token


@dataclass(frozen=True)
class _Refs:
    """Resolves and names one check's references."""

    model: HookedTransformer
    sae_in: SAE
    layer: int
    file: str

    def token(self, ref: TokenRef, field: str, required: bool = True) -> int | None:
        return ref_token(ref, self.model, self.sae_in, self.layer, file=self.file,
                         field=field, required=required)  # fmt: skip

    def name(self, ref: TokenRef, token: int | None) -> str:
        if token is not None:
            return token_name(self.model, token)
        return ref.tokens[0] if ref.tokens else f"f{ref.feature}"


def _term(refs: _Refs, rule: AbsenceRule, key: int | None, query: int | None) -> str:
    return f"[{refs.name(rule.key, key)}] ... [{refs.name(rule.query, query)}]"


def _field(rules: FeatureRules, kind: str, rule: Any) -> str:
    items = getattr(rules, kind)
    index = next((i for i, r in enumerate(items) if r is rule), None)
    if index is None:
        index = next((i for i, r in enumerate(items) if r == rule), 0)
    return f"feature[{rules.feature}].{kind}[{index}]"


def _key(head: Head, rules: FeatureRules, rule: Any, *settings: Any) -> str:
    """What a check is about, as its example-database key."""
    return repr((head, rules.feature, rule, settings))


def _head(head: Head) -> str:
    return f"L{head.layer}H{head.head}"


def _copies(n: int) -> str:
    return f"{n} {'copy' if n == 1 else 'copies'}"
