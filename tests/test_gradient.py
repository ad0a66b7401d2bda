"""Gradient-based term importance against finite differences and slow per-term loops."""

from __future__ import annotations

import math

import pytest
import torch

from rulecheck.core.gradient import surrogate_activation, term_importance, with_importance
from rulecheck.core.scores import Terms, candidate_terms, rank_by_importance, rank_by_weight

F64 = torch.float64
BATCH, POS, D_SAE = 5, 7, 12


def sparse_feats(batch: int, pos: int, d_sae: int, seed: int, density: float = 0.3) -> torch.Tensor:
    """Non-negative activations ``[batch, pos, d_sae]``, about ``density`` of them nonzero."""
    g = torch.Generator().manual_seed(seed)
    values = 2 * torch.rand(batch, pos, d_sae, generator=g, dtype=F64)
    return values * (torch.rand(batch, pos, d_sae, generator=g) < density)


def random_ends(batch: int, pos: int, seed: int, last: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, pos if last is None else last + 1, (batch,), generator=g)


def random_terms(d_sae: int, seed: int) -> Terms:
    """20 of the candidates for 6 keys from random directions, both score signs present."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(d_sae, 16, generator=g, dtype=F64)
    W_Q = torch.randn(16, 4, generator=g, dtype=F64) / 4
    W_K = torch.randn(16, 4, generator=g, dtype=F64) / 4
    value = torch.randn(d_sae, generator=g, dtype=F64) - 0.8
    terms = candidate_terms(d, W_Q, W_K, 2.0, value, n_keys=6, queries_per_key=d_sae)
    terms = terms.take(torch.randperm(len(terms), generator=g)[:20])
    assert bool((terms.attn < 0).any()) and bool((terms.value < 0).any())
    return terms


def finite_difference(feats, t, terms: Terms, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the batch-mean surrogate, one mask entry at a time."""
    ones = torch.ones(len(terms), dtype=F64)
    out = []
    for j in range(len(terms)):
        step = torch.zeros(len(terms), dtype=F64)
        step[j] = eps
        up = surrogate_activation(feats, t, terms, ones + step).mean()
        down = surrogate_activation(feats, t, terms, ones - step).mean()
        out.append(float(up - down) / (2 * eps))
    return torch.tensor(out, dtype=F64)


def loop_surrogate(feats, t, terms: Terms, mask) -> list[float]:
    """The surrogate by explicit loops over positions and terms."""
    f = feats.tolist()
    columns = (terms.query, terms.key, terms.attn, mask)
    rows = list(zip(*(c.tolist() for c in columns), strict=True))
    key_value = dict(zip(terms.key.tolist(), terms.value.tolist(), strict=True))
    preds = []
    for b, end in enumerate(t.tolist()):
        scores = []
        for i in range(end + 1):
            scores.append(sum(m * f[b][end][q] * f[b][i][k] * a for q, k, a, m in rows))
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        pred = 0.0
        for i, w in enumerate(weights):
            v = sum(f[b][i][k] * val for k, val in key_value.items())
            pred += w / total * v
        preds.append(pred)
    return preds


def test_importance_matches_central_differences():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=0)
    t = random_ends(BATCH, POS, seed=1)
    terms = random_terms(D_SAE, seed=2)
    assert len(set(terms.key.tolist())) < len(terms)  # keys repeat across terms
    importance = term_importance(feats, t, terms)
    reference = finite_difference(feats, t, terms)
    assert int((reference.abs() > 1e-3).sum()) >= 5  # a check on gradients that are not all 0
    torch.testing.assert_close(importance, reference, rtol=1e-5, atol=1e-9)


def test_surrogate_matches_per_position_loop():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=3, density=0.5)
    t = random_ends(BATCH, POS, seed=4)
    terms = random_terms(D_SAE, seed=5)
    g = torch.Generator().manual_seed(6)
    for mask in (torch.ones(len(terms), dtype=F64), 0.5 + torch.rand(len(terms), generator=g)):
        fast = surrogate_activation(feats, t, terms, mask.to(F64))
        slow = torch.tensor(loop_surrogate(feats, t, terms, mask), dtype=F64)
        assert slow.abs().max() > 1e-2
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_chunking_does_not_change_importance():
    feats = sparse_feats(9, POS, D_SAE, seed=7)
    t = random_ends(9, POS, seed=8)
    terms = random_terms(D_SAE, seed=9)
    whole = term_importance(feats, t, terms, batch_size=64)
    assert whole.abs().max() > 1e-3
    for batch_size in (1, 2, 4):
        chunked = term_importance(feats, t, terms, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_positions_after_end_and_silent_queries_do_not_count():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=10)
    t = random_ends(BATCH, POS, seed=11, last=POS - 2)
    terms = random_terms(D_SAE, seed=12)
    base = term_importance(feats, t, terms)

    changed = feats.clone()
    noise = 3 * torch.rand(feats.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    for b, end in enumerate(t.tolist()):
        changed[b, end + 1 :] = noise[b, end + 1 :]
    assert not torch.equal(changed, feats)
    torch.testing.assert_close(term_importance(changed, t, terms), base, rtol=1e-12, atol=0)

    silent = int(terms.query[0])
    quiet = feats.clone()
    quiet[:, :, silent] = 0
    importance = term_importance(quiet, t, terms)
    assert torch.all(importance[terms.query == silent] == 0)
    assert importance[terms.query != silent].abs().max() > 1e-3


def test_driving_pair_ranks_first():
    batch, pos, d_sae = 6, 8, 10
    query, key, idle_q, idle_k = 7, 3, 9, 8
    feats = 0.2 * sparse_feats(batch, pos, d_sae, seed=14)
    feats[:, :, [query, key, idle_q, idle_k]] = 0
    t = random_ends(batch, pos, seed=15)
    t = t.clamp(min=2)
    feats[torch.arange(batch), t, query] = 1.0
    feats[:, 1, key] = 1.0  # the key sits early in every prefix
    g = torch.Generator().manual_seed(16)
    noise_q = torch.tensor([0, 1, 2, 4, 5, 6]).repeat_interleave(4)
    noise_k = torch.tensor([0, 1, 2, 4]).repeat(6)
    noise_v = (0.3 * torch.randn(d_sae, generator=g, dtype=F64))[noise_k]
    terms = Terms(
        query=torch.cat([torch.tensor([query, idle_q]), noise_q]),
        key=torch.cat([torch.tensor([key, idle_k]), noise_k]),
        attn=torch.cat([torch.tensor([3.0, 10.0], dtype=F64), 0.3 * torch.randn(24, generator=g)]),
        value=torch.cat([torch.tensor([2.0, 10.0], dtype=F64), noise_v]),
    )
    importance = term_importance(feats, t, terms)
    ranked = rank_by_importance(with_importance(terms, importance))
    assert (int(ranked.query[0]), int(ranked.key[0])) == (query, key)
    assert ranked.importance[0] > 3 * ranked.importance[1].abs()
    # the largest weight belongs to a pair that never fires: no importance at all
    heavy = rank_by_weight(terms)
    assert (int(heavy.query[0]), int(heavy.key[0])) == (idle_q, idle_k)
    assert float(importance[1]) == 0.0


def test_importance_under_no_grad_and_inference_mode():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=17)
    t = random_ends(BATCH, POS, seed=18)
    terms = random_terms(D_SAE, seed=19)
    expected = term_importance(feats, t, terms)
    with torch.no_grad():
        torch.testing.assert_close(term_importance(feats, t, terms), expected)
    with torch.inference_mode():
        made_inside = Terms(*(x.clone() for x in (terms.query, terms.key, terms.attn, terms.value)))
        got = term_importance(feats.clone(), t.clone(), made_inside, batch_size=2)
    torch.testing.assert_close(got, expected)


def test_with_importance_checks_shape():
    terms = random_terms(D_SAE, seed=20)
    assert with_importance(terms, torch.zeros(len(terms))).importance is not None
    with pytest.raises(ValueError, match="importance has shape"):
        with_importance(terms, torch.zeros(len(terms) + 1))


def test_no_terms_and_no_prefixes():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=21)
    t = random_ends(BATCH, POS, seed=22)
    empty = Terms(*(torch.zeros(0, dtype=torch.long),) * 2, *(torch.zeros(0, dtype=F64),) * 2)
    assert term_importance(feats, t, empty).shape == (0,)
    terms = random_terms(D_SAE, seed=23)
    assert torch.equal(term_importance(feats[:0], t[:0], terms), torch.zeros(len(terms), dtype=F64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    feats = sparse_feats(BATCH, POS, D_SAE, seed=24)
    t = random_ends(BATCH, POS, seed=25)
    terms = random_terms(D_SAE, seed=26)
    on_cpu = term_importance(feats, t, terms)
    cuda = Terms(*(x.cuda() for x in (terms.query, terms.key, terms.attn, terms.value)))
    on_gpu = term_importance(feats.cuda(), t.cuda(), cuda, batch_size=2)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-10, atol=1e-12)
