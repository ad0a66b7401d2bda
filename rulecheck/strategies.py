"""Hypothesis strategies over counterfactual edits, for rulecheck's property checks and for
property tests of one's own.

A *base* is a prompt ``(tokens [T], t)``: a corpus row with BOS at position 0 and the tracked
position ``t`` (the query). Every strategy that edits a base takes either a base or a strategy
of bases, so they compose::

    @given(distractor_insertions(prompts(examples, corpus), [unless_id]))
    def test_unless_suppresses(edit): ...

Shrinking goes towards fewer inserted tokens, insertion points right after BOS, the first of
the given token ids and the shortest prompts (prompts are ordered by ``t``).

Edits keep the sequence length (see ``rulecheck.core.counterfactuals``); a base with too little room
for the drawn tokens is rejected with ``assume``. ``protect_tokens`` are never dropped from
before ``t`` to make room (e.g. the key of the term under test).

Profiles, registered on import: ``rulecheck`` (``deadline=None``: a forward pass has no fixed
duration), which the checks use while Hypothesis's own ``default`` profile is loaded, and
``rulecheck-ci`` (derandomized, no example database, no reproduction blobs), which makes a CI
gate give the same verdict and the same counterexample on every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from hypothesis import Phase, assume, settings
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase
from hypothesis.strategies import DrawFn, SearchStrategy
from torch import Tensor

from rulecheck.core.counterfactuals import Edit, insert_filler, insert_tokens_batch, repeat_token
from rulecheck.core.distractors import split_positives
from rulecheck.core.exemplars import FeatureExamples
from rulecheck.profiles import DEFAULT_PROFILE

Base = tuple[Tensor, int]


def check_settings(max_examples: int, key: str | None = None) -> settings:
    """Settings of one property check: the loaded profile (``rulecheck`` in place of
    Hypothesis's ``default``) with ``max_examples``; one reported failure per check and no
    explain phase (the check writes its own report).

    Checks that share one property function share its database entries, and Hypothesis does
    not shrink a failure it replays from there again: ``key`` (what is checked) gives each
    check its own entries."""
    current = settings.get_current_profile_name()
    parent = settings.get_profile(DEFAULT_PROFILE) if current == "default" else settings.default
    assert parent is not None  # None only before a profile is loaded, and one is (``current``)
    database = parent.database
    if key is not None and database is not None:
        database = KeyedDatabase(database, key)
    return settings(
        parent,
        max_examples=max_examples,
        report_multiple_bugs=False,
        database=database,
        phases=[phase for phase in parent.phases if phase is not Phase.explain],
    )


class KeyedDatabase(ExampleDatabase):
    """``database`` with every key prefixed by a digest of ``name``."""

    def __init__(self, database: ExampleDatabase, name: str) -> None:
        super().__init__()
        self.database = database
        self.prefix = hashlib.sha256(name.encode()).digest()[:16]

    def save(self, key: bytes, value: bytes) -> None:
        self.database.save(self.prefix + key, value)

    def fetch(self, key: bytes) -> Iterable[bytes]:
        yield from self.database.fetch(self.prefix + key)

    def delete(self, key: bytes, value: bytes) -> None:
        self.database.delete(self.prefix + key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.database.move(self.prefix + src, self.prefix + dest, value)


# --------------------------------------------------------------------------------- prompts


def shortest_first(rows: Tensor, t: Tensor) -> list[Base]:
    """Bases ``(rows[i], t[i])`` from ``rows [n, T]`` and ``t [n]``, shortest prefix first
    (ties in row order)."""
    order = sorted(range(len(t)), key=lambda i: (int(t[i]), i))
    return [(rows[i], int(t[i])) for i in order]


def contexts(rows: Tensor, t: Tensor) -> SearchStrategy[Base]:
    """Bases from ``rows [n, T]`` and ``t [n]``, shrinking to the shortest prefix
    (``shortest_first`` order). ``nothing()`` when ``n == 0``."""
    return st.sampled_from(shortest_first(rows, t))


def prompts(examples: FeatureExamples, tokens: Tensor, split: str = "test") -> SearchStrategy[Base]:
    """Bases drawn from a feature's positives of ``split``; ``tokens`` is the corpus ``[N, T]``
    the examples index."""
    rows, t = split_positives(tokens, examples, split)
    return contexts(rows, t)


def insertion_points(t: int, n: int) -> SearchStrategy[list[int]]:
    """``n`` original positions in ``[1, t]``; a token goes right before its position."""
    return st.lists(st.integers(1, t), min_size=n, max_size=n)


def token_lists(ids: int | Sequence[int], n: int) -> SearchStrategy[list[int]]:
    """``n`` tokens drawn from ``ids`` (shrinking to the first)."""
    return st.lists(st.sampled_from(_ids(ids)), min_size=n, max_size=n)


# ---------------------------------------------------------------------------------- edits


@st.composite
def insertion_plans(
    draw: DrawFn,
    base: Base,
    ids: int | Sequence[int],
    max_count: int,
    *,
    min_count: int = 1,
    protect_tokens: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
    """``(insert, at)`` for ``base``: ``n`` in ``[min_count, max_count]`` tokens drawn from
    ``ids``, token ``i`` to go right before original position ``at[i]`` in ``[1, t]``; ``n`` is
    capped by the room the base has (``room``)."""
    tokens, t = base
    most = min(max_count, room(tokens, t, protected_positions(tokens, t, protect_tokens)))
    assume(most >= min_count)
    n = draw(st.integers(min_count, most))
    return draw(token_lists(ids, n)), draw(insertion_points(t, n))


@st.composite
def distractor_insertions(
    draw: DrawFn,
    base: Base | SearchStrategy[Base],
    distractor_ids: int | Sequence[int],
    max_copies: int = 4,
    *,
    protect_tokens: Sequence[int] = (),
) -> Edit:
    """``1..max_copies`` distractor tokens, each inserted right before a drawn position in
    ``[1, t]``."""
    tokens, t = _draw_base(draw, base)
    plan = insertion_plans((tokens, t), distractor_ids, max_copies, protect_tokens=protect_tokens)
    insert, at = draw(plan)
    return insert_at(tokens, t, insert, at, protected_positions(tokens, t, protect_tokens))


@st.composite
def key_repetitions(
    draw: DrawFn,
    base: Base | SearchStrategy[Base],
    key_id: int,
    max_count: int = 6,
    *,
    min_count: int = 1,
    protect_tokens: Sequence[int] = (),
) -> tuple[int, Edit]:
    """``(n, edit)``: ``n`` in ``[min_count, max_count]`` copies of ``key_id``, each right
    before a drawn position in ``[1, t]``."""
    tokens, t = _draw_base(draw, base)
    plan = insertion_plans(
        (tokens, t), key_id, max_count, min_count=min_count, protect_tokens=protect_tokens
    )
    _, at = draw(plan)
    keep = protected_positions(tokens, t, protect_tokens)
    return len(at), repeat_token(tokens, t, key_id, len(at), positions=at, protect=keep)


@st.composite
def filler_insertions(
    draw: DrawFn,
    base: Base | SearchStrategy[Base],
    filler_ids: int | Sequence[int],
    max_len: int = 8,
    *,
    key_id: int | None = None,
) -> Edit:
    """``1..max_len`` filler tokens right after the key, moving it away from the query. The key
    is the last ``key_id`` before ``t`` (bases without one are rejected) or, without
    ``key_id``, a drawn position in ``[0, t - 1]``; find it with ``edit.position_of``."""
    tokens, t = _draw_base(draw, base)
    if key_id is None:
        key_pos = draw(st.integers(0, t - 1))
    else:
        hits = torch.nonzero(tokens[1:t] == key_id).flatten()
        assume(len(hits) > 0)
        key_pos = int(hits[-1]) + 1
    most = min(max_len, room(tokens, t, [key_pos]))
    assume(most >= 1)
    n = draw(st.integers(1, most))
    return insert_filler(tokens, t, key_pos, draw(token_lists(filler_ids, n)))


# -------------------------------------------------------------------------------- helpers


def insert_at(
    tokens: Tensor, t: int, insert: Sequence[int], at: Sequence[int], protect: Sequence[int] = ()
) -> Edit:
    """Insert ``insert[i]`` right before original position ``at[i]`` (each in ``[1, t]``) of
    ``tokens [T]``; ``protect`` are original positions before ``t`` never dropped."""
    mask = None
    if protect:
        mask = torch.zeros(1, tokens.shape[0], dtype=torch.bool, device=tokens.device)
        mask[0, list(protect)] = True
    ins = torch.tensor([list(insert)], dtype=tokens.dtype, device=tokens.device)
    pos = torch.tensor([list(at)], dtype=torch.long, device=tokens.device)
    edit = insert_tokens_batch(tokens.unsqueeze(0), torch.tensor([t]), ins, pos, mask)
    return edit.row(0)


def protected_positions(tokens: Tensor, t: int, protect_tokens: Sequence[int]) -> list[int]:
    """Positions in ``[1, t)`` of ``tokens [T]`` holding one of ``protect_tokens``."""
    if not protect_tokens:
        return []
    guard = torch.tensor(list(protect_tokens), dtype=tokens.dtype, device=tokens.device)
    return (torch.nonzero(torch.isin(tokens[1:t], guard)).flatten() + 1).tolist()


def room(tokens: Tensor, t: int, protect: Sequence[int] = ()) -> int:
    """How many tokens an edit can insert at or before ``t``: the tokens after ``t`` plus the
    unprotected body tokens before it."""
    body = set(range(1, t)) - set(protect)
    return tokens.shape[0] - 1 - t + len(body)


def _draw_base(draw: DrawFn, base: Base | SearchStrategy[Base]) -> Base:
    tokens, t = draw(base) if isinstance(base, SearchStrategy) else base
    return tokens, int(t)


def _ids(ids: int | Sequence[int]) -> list[int]:
    out = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    if not out:
        raise ValueError("no token ids to draw from")
    return out
