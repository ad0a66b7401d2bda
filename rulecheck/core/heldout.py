"""Precision where a rule fires, and the distances it holds at (pure tensor functions).

The exemplar protocol (paper A.2) scores a rule on top-activating positives and *random*
inactive positions, which almost never hold a rule's pattern in the wrong place: its precision
over-states how often the rule is right where it fires. So the corpus pass also keeps every
position of a seeded sample of sequences (``held_out_sequences``; the output feature's
activation at each, ``exemplars.ExemplarCollector``), cut into a *val* and a *test* half by
sequence. For a feature, the sequences among its train or val exemplars are left out
(``HeldOut.rows``). On the test half:

- **corpus precision**: the share of the positions where the rule predicts the feature on at
  which it is on (``FireCounts.precision``);
- **hard negatives**: ``m`` of those positions, drawn with a seed (``m`` = the number of the
  feature's test negatives); the misses among them join the test negatives, so the checked
  ``precision`` and ``f1`` count them (``FireCounts.hard``).

Extraction chooses distance bounds on the val half (``choose_bounds``): a term's candidate
``max_distance`` is the farthest its nearest key is from the query among the positives it
matches, both the train and val exemplars (``nearest_key_distance``) and the val half's
positions where the feature is on (``nearest_key_distances``: exemplars are the strongest
activations, which may all sit nearer than the rule reaches), kept where it raises the F1 of
the rule over the val half's positions by at least ``BOUND_GAIN``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rulecheck.core.scores import Terms
from rulecheck.core.seeded import seeded_keys

HELD_SALT, HALF_SALT, HARD_SALT = 4, 5, 6
BOUND_GAIN = 0.01  # the val-half F1 a bound must add to be kept


def held_out_sequences(n_seq: int, n: int, seed: int) -> Tensor:
    """``[min(n, n_seq)]`` ids of the held-out sequences, ascending: the ``n`` with the
    smallest seeded keys."""
    keys = seeded_keys(seed, torch.arange(n_seq), torch.tensor(0), salt=HELD_SALT)
    return torch.sort(torch.argsort(keys, stable=True)[:n]).values


def test_half(seq: Tensor, seed: int) -> Tensor:
    """``[n]`` bool: the held-out sequences ``seq`` in the test half (the rest: val)."""
    return seeded_keys(seed, seq.cpu(), torch.tensor(0), salt=HALF_SALT) % 2 == 1


@dataclass(frozen=True)
class HeldOut:
    """One feature on the held-out sequences: its activation at every position."""

    seq: Tensor  # [n] corpus rows
    act: Tensor  # [n, pos] the feature's activation (0 at BOS)
    test: Tensor  # [n] bool, the test half
    allowed: Tensor  # [n] bool, not among the feature's train or val exemplar sequences
    key: int  # the id the feature's draws are keyed by
    seed: int

    def rows(self, half: str) -> Tensor:
        """``[n]`` bool: the rows of ``half`` ("val" or "test") the feature may be scored on."""
        return self.allowed & (self.test if half == "test" else ~self.test)


def term_matches(feats: Tensor, terms: Terms) -> Tensor:
    """``[batch, pos, n_terms]`` bool: where each term predicts the feature on, reading every
    position ``p >= 1`` as the end of a prefix (``rules.term_contributions > 0``): query active
    at ``p``, key active at some ``i <= p`` within the term's distances, scores positive.
    ``feats`` is ``[batch, pos, d]``. A view of ``term_rows``'s ``[n_terms, batch, pos]``."""
    return term_rows(feats, terms).permute(1, 2, 0)


def term_rows(feats: Tensor, terms: Terms) -> Tensor:
    """``term_matches`` as ``[n_terms, batch, pos]``: each column of ``feats`` is one
    contiguous row here, so picking a term's query and key columns copies rows instead of
    gathering one element at a time. Keys are counted once per column (running counts), and
    a bounded term reads its window as the difference of two counts."""
    n_pos, dev = feats.shape[1], feats.device
    active = _columns_first(feats)  # [d, batch, pos]
    keys, column = torch.unique(terms.key.to(dev), return_inverse=True)  # column [n_terms]
    count = active[keys].to(torch.int32).cumsum(dim=2)  # [n_keys, batch, pos]: keys in [0, p]
    query = terms.query.to(dev)
    out = active[query] & (count > 0)[column]
    none = torch.full((len(terms),), -1, dtype=torch.long, device=dev)
    lo = (none if terms.min_distance is None else terms.min_distance.to(dev)).clamp(min=0)
    hi = none if terms.max_distance is None else terms.max_distance.to(dev)
    hi = torch.where(hi < 0, n_pos, hi)
    bounded = torch.nonzero((lo > 0) | (hi < n_pos - 1)).flatten()
    if len(bounded):
        padded = torch.nn.functional.pad(count[column[bounded]], (1, 0))  # [n_b, batch, pos + 1]
        p = torch.arange(n_pos, device=dev)[None, :]
        upper = (p - lo[bounded][:, None] + 1).clamp(min=0)  # keys at i <= p - lo
        lower = (p - hi[bounded][:, None]).clamp(min=0)  # keys at i >= p - hi
        shape = (len(bounded), feats.shape[0], n_pos)
        inside = padded.gather(2, upper[:, None].expand(shape)) - padded.gather(
            2, lower[:, None].expand(shape)
        )  # [n_b, batch, pos]
        out[bounded] = active[query[bounded]] & (inside > 0)
    dead = torch.nonzero(~((terms.attn > 0) & (terms.value > 0))).flatten().to(dev)
    out[dead] = False
    out[:, :, 0] = False
    return out


def joined(terms: list[Terms]) -> tuple[Terms, Tensor]:
    """The terms of several features as one ``Terms`` (bounds -1 where a feature has none)
    and ``[n_features + 1]`` offsets of each feature's terms in it: one ``term_matches`` for
    all of them."""
    sizes = torch.tensor([len(t) for t in terms], dtype=torch.long)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])

    def bound(t: Terms, d: Tensor | None) -> Tensor:
        return torch.full((len(t),), -1, dtype=torch.long) if d is None else d.cpu().long()

    out = Terms(
        query=torch.cat([t.query.cpu() for t in terms]).long(),
        key=torch.cat([t.key.cpu() for t in terms]).long(),
        attn=torch.cat([t.attn.cpu().float() for t in terms]),
        value=torch.cat([t.value.cpu().float() for t in terms]),
        max_distance=torch.cat([bound(t, t.max_distance) for t in terms]),
        min_distance=torch.cat([bound(t, t.min_distance) for t in terms]),
    )
    return out, offsets


def any_of(matches: Tensor, offsets: Tensor) -> Tensor:
    """``[..., n_features]``: whether any of each feature's terms matches, from ``matches
    [..., n_terms]`` of ``joined`` terms at ``offsets`` (``term_matches``: its terms are
    contiguous rows of ``term_rows``)."""
    rows = matches.movedim(-1, 0)
    return segments_any(rows, offsets).movedim(0, -1)


def segments_any(rows: Tensor, offsets: Tensor) -> Tensor:
    """``[n_features, ...]``: for each feature, whether any of its rows ``[offsets[i],
    offsets[i + 1])`` of ``rows [n_terms, ...]`` (bool) is true. Features of about one size
    (counts up to each power of two) are read together, each padded with an all-false row to
    that size: one row copy and one reduction per size, at most twice the rows there are."""
    n_features = len(offsets) - 1
    flat = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])]).view(torch.uint8)
    out = flat.new_zeros(n_features, flat.shape[1])
    offsets = offsets.to(rows.device)
    sizes = offsets.diff()
    biggest = int(sizes.max()) if n_features else 0
    width = 1
    while width // 2 < biggest:
        mine = torch.nonzero((sizes > width // 2) & (sizes <= width)).flatten()
        if len(mine):
            slot = torch.arange(width, device=rows.device)
            index = offsets[mine, None] + slot
            index = torch.where(slot < sizes[mine, None], index, rows.shape[0])  # the false row
            picked = flat.index_select(0, index.flatten()).view(len(mine), width, -1)
            out[mine] = picked.amax(dim=1)
        width *= 2
    return out.bool().view(n_features, *rows.shape[1:])


def nearest_key_distance(feats: Tensor, t: Tensor, where: Tensor, terms: Terms) -> Tensor:
    """``[m, n_terms]``: for the prefixes ending at ``t [m]`` (reading rows ``where [m]`` of
    ``feats [batch, pos, d]``), how far each term's nearest key is from ``t`` (``t - i`` of
    the last ``i <= t`` where the key is active), -1 where the query is inactive at ``t`` or
    no key is active (``nearest_key_distances`` read at ``t``)."""
    rows = torch.arange(len(t), device=feats.device)
    return nearest_key_distances(feats[where], terms)[rows, t]


def nearest_key_distances(feats: Tensor, terms: Terms) -> Tensor:
    """``[batch, pos, n_terms]``: at every position ``p`` of ``feats [batch, pos, d]``, how
    far each term's nearest key is (``p - i`` of the last ``i <= p`` where it is active), -1
    where the query is inactive at ``p`` or no key is active up to it (a view of
    ``[n_terms, batch, pos]``, its terms' columns copied as rows, as ``term_rows``)."""
    dev = feats.device
    active = _columns_first(feats)
    keys, column = torch.unique(terms.key.to(dev), return_inverse=True)
    pos = torch.arange(feats.shape[1], device=dev)
    last = torch.where(active[keys], pos, -1).cummax(dim=2).values[column]  # [n_terms, b, pos]
    query = active[terms.query.to(dev)]
    return torch.where(query & (last >= 0), pos - last, -1).permute(1, 2, 0)


def _columns_first(feats: Tensor) -> Tensor:
    """``[d, batch, pos]`` bool: where each column of ``feats [batch, pos, d]`` is active."""
    return (feats > 0).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class FireCounts:
    """A rule's firing on the test half of the held-out sequences."""

    fire: int  # positions where the rule predicts the feature on
    hit: int  # of them, where the feature is on
    sampled: int  # hard-negative draws among the ``fire`` positions
    hard: int  # of the draws, misses: the test's hard negatives

    @property
    def precision(self) -> float:
        """Corpus precision, NaN where the rule never fires."""
        return self.hit / self.fire if self.fire else float("nan")


def fire_counts(fire: Tensor, held: HeldOut, m: int) -> FireCounts:
    """``FireCounts`` of the prediction ``fire [n, pos]`` (bool) on ``held``'s test rows,
    with ``m`` seeded hard-negative draws among the firing positions."""
    rows = held.rows("test").to(fire.device)
    on = fire & rows[:, None]
    act = held.act.to(fire.device)
    hit = int((on & (act > 0)).sum())
    r, p = torch.nonzero(on, as_tuple=True)
    ids = held.seq.to(fire.device)[r] * fire.shape[1] + p
    keys = seeded_keys(held.seed, ids, torch.tensor(held.key), salt=HARD_SALT)
    drawn = torch.argsort(keys, stable=True)[:m]
    hard = int((act[r[drawn], p[drawn]] <= 0).sum())
    return FireCounts(fire=len(r), hit=hit, sampled=len(drawn), hard=hard)


def _f1(fire: Tensor, on: Tensor, elsewhere: int) -> float:
    tp = float((fire & on).sum())
    denominator = float(fire.sum()) + float(on.sum()) + elsewhere
    return 2 * tp / denominator if denominator else 0.0


def choose_bounds(
    terms: Terms, cand: Tensor, free: Tensor, bound: Tensor, on: Tensor, elsewhere: int = 0
) -> Terms:
    """``terms`` with ``max_distance`` set where a bound makes the rule more precise.

    ``cand [n_terms]`` are the candidate bounds (``candidate_bounds``); ``free``/``bound``
    ``[N, n_terms]`` are ``term_matches`` at the val half's positions without bounds and with
    each term bounded at its candidate, ``on [N]`` the feature there; ``elsewhere`` counts the
    val positions where the feature is on and no term matches. Terms are tried in rank order;
    each bound is kept where the F1 of the whole rule over the val half's positions rises by at
    least ``BOUND_GAIN``."""
    cand = cand.cpu()
    free, bound, on = free.cpu(), bound.cpu(), on.cpu()
    chosen = torch.full((len(terms),), -1, dtype=torch.long)
    current = free.clone()
    best = _f1(current.any(dim=1), on, elsewhere)
    for j in torch.nonzero(cand >= 0).flatten().tolist():
        trial = current.clone()
        trial[:, j] = bound[:, j]
        f1 = _f1(trial.any(dim=1), on, elsewhere)
        if f1 >= best + BOUND_GAIN:
            current, best, chosen[j] = trial, f1, int(cand[j])
    return with_bounds(terms, chosen) if bool((chosen >= 0).any()) else terms


MIN_SEEN = 3  # positives a term must match for its distances to say anything


def candidate_bounds(distance: Tensor) -> Tensor:
    """``[n_terms]``: each term's candidate ``max_distance``, the farthest nearest key among
    the positives it matches (``distance``, ``nearest_key_distance``), -1 where it matches
    fewer than ``MIN_SEEN``."""
    seen = (distance >= 0).sum(dim=0)
    return torch.where(seen >= MIN_SEEN, distance.amax(dim=0), -1)


def with_bounds(terms: Terms, max_distance: Tensor) -> Terms:
    """``terms`` bounded at ``max_distance [n_terms]`` (-1: unbounded)."""
    return replace(terms, max_distance=max_distance.to(terms.query.device), min_distance=None)
