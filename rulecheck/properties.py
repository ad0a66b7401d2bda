"""Running a claim as a Hypothesis property over counterfactual edits of real prompts.

A check (``rulecheck.kinds.absence``, ``rulecheck.kinds.counting``) gives a pool of prompts
(:class:`Bases`, shortest first), a strategy of cases (a prompt and tokens inserted at drawn
positions) and a function that says whether a case falsifies the claim. :func:`falsify` runs
it under the loaded Hypothesis profile; the counterexample reported is Hypothesis's minimal
one, moved to the shortest prompt on which the same insertions (positions capped at its
``t``) still falsify the claim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy
from torch import Tensor

from rulecheck.core.counterfactuals import Edit, render
from rulecheck.strategies import (
    Base,
    check_settings,
    insert_at,
    insertion_plans,
    protected_positions,
    room,
    shortest_first,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from rulecheck.book import FeatureRules
    from rulecheck.session import Head, Workbench

Case = tuple[int, list[int], list[int]]  # (prompt index, tokens to insert, their positions)


@dataclass(frozen=True)
class Bases:
    """A check's prompts, shortest first, and the cases drawn on them."""

    pool: list[Base]
    protect_tokens: tuple[int, ...] = ()

    @classmethod
    def of(cls, rows: Tensor, t: Tensor, protect_tokens: tuple[int, ...] = ()) -> Bases:
        """The prompts ``(rows[i], t[i])``, shortest first."""
        return cls(shortest_first(rows, t), protect_tokens)

    def cases(self, ids: int, min_count: int, max_count: int) -> SearchStrategy[Case]:
        """A prompt (by index, shrinking to the shortest) and insertions of ``ids``."""

        @st.composite
        def draw_case(draw: DrawFn) -> Case:
            i = draw(st.integers(0, len(self.pool) - 1))
            plan = insertion_plans(
                self.pool[i],
                ids,
                max_count,
                min_count=min_count,
                protect_tokens=self.protect_tokens,
            )
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


def falsify(
    bases: Bases,
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


def shown(model: HookedTransformer, found: dict[str, Any]) -> list[str]:
    """The counterexample's prompt (inserted tokens marked) and position."""
    edit = found["edit"]
    return [
        f"    {render(model, edit, upto_t=True)}",
        f"  position: t = {edit.t} ({found['t0']} before the insertion)",
    ]


def counterexample(model: HookedTransformer, found: dict[str, Any]) -> dict[str, Any]:
    """The counterexample as plain values for the run report (and the HTML report): each
    token of the prompt after BOS up to ``t`` as decoded, the positions of the inserted ones
    and of ``t`` in that list, and what the check measured (``before``/``after``, or the
    activation ``by_count`` from ``first_count``)."""
    edit = found["edit"]
    ids = edit.tokens[1 : edit.t + 1].tolist()
    tok = model.tokenizer
    out: dict[str, Any] = {
        "tokens": [tok.decode([i]) if tok is not None else str(i) for i in ids],
        "inserted": sorted(p - 1 for p in edit.inserted if 0 < p <= edit.t),
        "t": edit.t - 1,
    }
    if "before" in found:
        out["before"], out["after"] = float(found["before"]), float(found["after"])
    if "acts" in found:
        out["by_count"], out["first_count"] = [float(a) for a in found["acts"]], found["own"]
    return out


def activations(
    bench: Workbench, head: Head, feature: int, rows: Sequence[Tensor], t: Sequence[int]
) -> list[float]:
    """The feature's activation at ``t[i]`` of each row, in one forward pass."""
    return bench.probe(head, feature).at(torch.stack(list(rows)), torch.tensor(list(t))).tolist()


def run_key(head: Head, rules: FeatureRules, rule: Any, *settings: Any) -> str:
    """What a check is about, as its example-database key."""
    return repr((head, rules.feature, rule, settings))


def copies(n: int) -> str:
    return f"{n} {'copy' if n == 1 else 'copies'}"
