"""Precision where a rule fires (``core.heldout``) against slow, obviously-correct references:
matches at every position, nearest keys, the held-out positions a corpus pass keeps, the
hard-negative draw and the choice of distance bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import random_sae
from test_math import HEAD, LAYER, full_pass

from rulecheck.config import ExemplarConfig, ExtractConfig
from rulecheck.core.evaluate import Measured, score_predictions
from rulecheck.core.extract import collect_layer
from rulecheck.core.heldout import (
    FireCounts,
    HeldOut,
    any_of,
    candidate_bounds,
    choose_bounds,
    fire_counts,
    held_out_sequences,
    nearest_key_distance,
    nearest_key_distances,
    term_matches,
)
from rulecheck.core.metrics import binary_scores
from rulecheck.core.rules import predict
from rulecheck.core.scores import Terms
from rulecheck.core.seeded import seeded_keys


def random_terms(n: int, d: int, seed: int, bounded: bool = True) -> Terms:
    g = torch.Generator().manual_seed(seed)
    terms = Terms(
        query=torch.randint(0, d, (n,), generator=g),
        key=torch.randint(0, d, (n,), generator=g),
        attn=torch.rand(n, generator=g) - 0.1,  # some dead terms
        value=torch.rand(n, generator=g),
    )
    if bounded:
        terms = Terms(
            terms.query,
            terms.key,
            terms.attn,
            terms.value,
            max_distance=torch.randint(-1, 6, (n,), generator=g),
            min_distance=torch.randint(-1, 3, (n,), generator=g),
        )
    return terms


@pytest.fixture(scope="module")
def feats(model, tokens) -> torch.Tensor:
    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=4)
    return sae_in.encode(full_pass(model, tokens)[f"blocks.{LAYER}.hook_resid_pre"]).detach()


@pytest.mark.parametrize("bounded", [False, True])
def test_term_matches_are_predict_at_every_position(feats, bounded) -> None:
    """Each term alone through ``predict``, its prefix ending at each position in turn."""
    terms = random_terms(10, feats.shape[2], seed=5, bounded=bounded)
    got = term_matches(feats, terms)
    assert got.shape == (feats.shape[0], feats.shape[1], len(terms))
    for j in range(len(terms)):
        one = terms.take(torch.tensor([j]))
        for p in range(feats.shape[1]):
            t = torch.full((feats.shape[0],), p)
            want = (predict(feats, t, one) > 0) & (p > 0)  # BOS is never a prediction
            assert torch.equal(got[:, p, j], want), (j, p)
    assert got.any() and not got.all()


@pytest.mark.parametrize("sizes", [[3, 0, 1, 2, 5, 17, 16, 33, 0, 4], [0, 0], [1], []])
def test_any_of_is_each_feature_s_terms_or_ed_in_a_loop(sizes) -> None:
    """Features of every size (none, one, around each power of two) read from ``[..., n_terms]``
    matches, some of them all false, against a loop over each feature's slice."""
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    g = torch.Generator().manual_seed(len(sizes))
    matches = torch.rand(3, 5, int(offsets[-1]), generator=g) > 0.97
    got = any_of(matches, offsets)
    assert got.shape == (3, 5, len(sizes))
    for i, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        assert torch.equal(got[..., i], matches[..., lo:hi].any(dim=-1)), i
    if sum(sizes) > 10:
        assert got.any() and not got.all()


def test_nearest_key_distances_at_every_position_are_the_prefixes(feats) -> None:
    """Every position read as the end of a prefix: the per-prefix distance there; a term
    bounded at that distance still matches, one step tighter it does not."""
    terms = random_terms(8, feats.shape[2], seed=6, bounded=False)
    got = nearest_key_distances(feats, terms)  # [batch, pos, n_terms]
    b, p = (
        x.flatten()
        for x in torch.meshgrid(
            torch.arange(feats.shape[0]), torch.arange(feats.shape[1]), indexing="ij"
        )
    )
    assert torch.equal(got[b, p], nearest_key_distance(feats, p, b, terms))
    assert (got > 0).any()
    live = (terms.attn > 0) & (terms.value > 0)
    free = term_matches(feats, terms)
    tight = term_matches(feats, replace(terms, max_distance=got.amax(dim=(0, 1))))
    assert torch.equal(free, tight)  # the farthest distance seen bounds nothing
    assert torch.equal(free & (got >= 0), free) and not (free & ~live).any()


def test_nearest_key_distance_against_a_loop(feats) -> None:
    terms = random_terms(8, feats.shape[2], seed=6, bounded=False)
    g = torch.Generator().manual_seed(7)
    where = torch.randint(0, feats.shape[0], (30,), generator=g)
    t = torch.randint(1, feats.shape[1], (30,), generator=g)
    got = nearest_key_distance(feats, t, where, terms)
    for m in range(30):
        for j in range(len(terms)):
            row, end = feats[where[m]], int(t[m])
            want = -1
            if row[end, terms.query[j]] > 0:
                keys = [i for i in range(end + 1) if row[i, terms.key[j]] > 0]
                want = end - max(keys) if keys else -1
            assert int(got[m, j]) == want
    assert (got >= 0).any()


def test_the_corpus_pass_keeps_every_position_of_the_held_out_sequences(model, tokens) -> None:
    sae_out = random_sae(8, 10, f"blocks.{LAYER}.attn.hook_z", head=HEAD, seed=3)
    cfg = ExemplarConfig(n_pos=3, n_neg=3, min_active=1, min_inactive=1, n_held=9, seed=2)
    collectors, _ = collect_layer(
        model, {HEAD: sae_out}, tokens, LAYER, ExtractConfig(batch_size=5, exemplars=cfg)
    )
    col = collectors[HEAD]
    held = held_out_sequences(tokens.shape[0], 9, seed=2)
    assert torch.equal(col.held_seq, held) and len(held) == 9 and len(set(held.tolist())) == 9
    z = full_pass(model, tokens)[f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD]
    acts = sae_out.encode(z).detach()
    for f in col.eligible().tolist():
        ex = col.examples(f)
        out = col.held_out(f, ex)
        for r, s in enumerate(held.tolist()):
            assert float(out.act[r, 0]) == 0.0  # BOS never counts
            for p in range(1, tokens.shape[1]):
                assert float(out.act[r, p]) == pytest.approx(float(acts[s, p, f]), abs=1e-6)
            seen = s in ex.seq[ex.split != 2].tolist()
            assert bool(out.allowed[r]) == (not seen)


def test_hard_negatives_are_the_misses_of_a_seeded_draw_of_firing_positions() -> None:
    g = torch.Generator().manual_seed(8)
    n, pos = 12, 10
    held = HeldOut(
        seq=torch.arange(100, 100 + 2 * n, 2),
        act=torch.where(torch.rand(n, pos, generator=g) < 0.4, 1.0, 0.0),
        test=torch.rand(n, generator=g) < 0.6,
        allowed=torch.rand(n, generator=g) < 0.8,
        key=17,
        seed=3,
    )
    fire = torch.rand(n, pos, generator=g) < 0.5
    for m in (0, 5, 1000):
        got = fire_counts(fire, held, m)
        spots = [
            (int(held.seq[r]) * pos + p, r, p)
            for r in range(n)
            for p in range(pos)
            if fire[r, p] and held.test[r] and held.allowed[r]
        ]
        key = {
            s: int(seeded_keys(3, torch.tensor(s), torch.tensor(17), salt=6)) for s, _, _ in spots
        }
        drawn = sorted(spots, key=lambda x: key[x[0]])[:m]
        assert got.fire == len(spots)
        assert got.hit == sum(held.act[r, p] > 0 for _, r, p in spots)
        assert got.sampled == len(drawn)
        assert got.hard == sum(held.act[r, p] <= 0 for _, r, p in drawn)
        assert got.precision == pytest.approx(got.hit / got.fire)
    assert fire_counts(torch.zeros(n, pos, dtype=torch.bool), held, 5).fire == 0


def test_hard_negatives_count_in_precision_and_f1_but_not_in_the_protocol() -> None:
    from rulecheck.core.exemplars import FeatureExamples

    act = torch.tensor([1.0, 2.0, 0.5, 0.0, 0.0, 0.0])
    pred = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    ex = FeatureExamples(
        0, torch.arange(6), torch.ones(6, dtype=torch.long), act, torch.full((6,), 2)
    )
    fire = FireCounts(fire=40, hit=30, sampled=8, hard=3)
    got: Measured = score_predictions(pred, ex, fire)
    want = binary_scores(torch.cat([act, torch.zeros(3)]), torch.cat([pred, torch.ones(3)]))
    assert got.precision == pytest.approx(float(want["precision"])) == pytest.approx(2 / 6)
    assert got.f1 == pytest.approx(float(want["f1"]))
    assert got.protocol_precision == pytest.approx(2 / 3)
    assert got.recall == pytest.approx(2 / 3)
    assert (got.corpus_precision, got.n_fire, got.n_hard) == (0.75, 40, 3)


def test_a_bound_is_kept_only_where_it_makes_the_rule_more_precise() -> None:
    """Term 0's bound drops false fires (kept); term 1's drops true ones (not kept); term 2
    matched too few positives for a candidate."""
    terms = Terms(torch.arange(3), torch.arange(3), torch.ones(3), torch.ones(3))
    distance = torch.tensor([[1, 4, -1], [3, 2, -1], [2, 6, 2], [1, 1, -1]])
    cand = candidate_bounds(distance)
    assert cand.tolist() == [3, 6, -1]
    on = torch.tensor([True] * 6 + [False] * 6)
    free = torch.zeros(12, 3, dtype=torch.bool)
    free[:, 0] = True  # fires everywhere: right at half
    free[:6, 1] = True
    bound = free.clone()
    bound[6:, 0] = False  # bounded, term 0 fires only where the feature is on
    bound[:3, 1] = False  # bounded, term 1 loses true fires
    chosen = choose_bounds(terms, cand, free, bound, on, elsewhere=2)
    assert chosen.max_distance is not None and chosen.max_distance.tolist() == [3, -1, -1]
    # nothing gained: the terms come back as they were
    assert choose_bounds(terms, cand, free, free, on).max_distance is None
