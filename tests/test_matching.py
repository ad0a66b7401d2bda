"""Feature matching between an old and a new SAE, against slow obvious references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import random_sae

from rulecheck.core.matching import (
    Candidates,
    activation_correlation,
    combined_score,
    decoder_cosine,
    match_features,
)

D_IN, D_SAE = 128, 96


def full_topk(old: torch.Tensor, new: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the whole cosine matrix, then top-k."""
    sims = torch.nn.functional.cosine_similarity(old[:, None, :], new[None, :, :], dim=2)
    return torch.topk(sims, k, dim=1)


@pytest.mark.parametrize("block", [1, 7, 16, 33, 4096])
def test_blocked_cosine_equals_full_matrix(block: int) -> None:
    g = torch.Generator().manual_seed(block)
    old, new = torch.randn(33, 12, generator=g), torch.randn(41, 12, generator=g)
    cand = decoder_cosine(old, new, k=5, block=block)
    values, index = full_topk(old, new, 5)
    assert cand.index.shape == (33, 5) and cand.n_new == 41
    assert torch.allclose(cand.cosine, values, atol=1e-5)
    assert torch.equal(cand.index, index)


def test_cosine_k_larger_than_new_and_width_mismatch() -> None:
    g = torch.Generator().manual_seed(0)
    cand = decoder_cosine(torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g), k=8)
    assert cand.index.shape == (4, 3)
    assert sorted(cand.index[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="widths"):
        decoder_cosine(torch.randn(4, 6), torch.randn(3, 5))


def test_streamed_correlation_equals_corrcoef() -> None:
    g = torch.Generator().manual_seed(3)
    n_old, n_new, k = 10, 14, 4
    x = torch.relu(torch.randn(300, n_old, generator=g) + 5.0)  # offset: tests cancellation
    y = torch.relu(torch.randn(300, n_new, generator=g) - 0.3)
    y[:, :3] += 0.8 * x[:, :3]  # some real correlation
    x[:, 5] = 2.0  # a constant old column
    y[:, 7] = 0.0  # a dead new column
    index = torch.stack([torch.randperm(n_new, generator=g)[:k] for _ in range(n_old)])
    index[0, 0], index[1, 1] = 7, 7
    cand = Candidates(index=index, cosine=torch.zeros(n_old, k), n_new=n_new)
    batches = [(x[s : s + 37], y[s : s + 37]) for s in range(0, 300, 37)]  # 37 does not divide
    corr = activation_correlation(iter(batches), cand, block=3)
    with np.errstate(invalid="ignore"):  # numpy's NaN for the constant columns
        full = np.corrcoef(x.double().numpy().T, y.double().numpy().T)  # [n_old + n_new] ^ 2
    for i in range(n_old):
        for c, j in enumerate(index[i].tolist()):
            constant = i == 5 or j == 7
            assert bool(corr.defined[i, c]) is not constant
            if constant:
                assert corr.r[i, c] == 0.0
            else:
                assert corr.r[i, c] == pytest.approx(full[i, n_old + j], abs=1e-5)
    assert not torch.isnan(corr.r).any()


def test_correlation_rejects_wrong_widths_and_empty_input() -> None:
    cand = Candidates(index=torch.zeros(3, 1, dtype=torch.long), cosine=torch.zeros(3, 1), n_new=2)
    with pytest.raises(ValueError, match="widths"):
        activation_correlation([(torch.zeros(4, 3), torch.zeros(4, 5))], cand)
    with pytest.raises(ValueError, match="no activations"):
        activation_correlation([], cand)
    corr = activation_correlation([(torch.randn(4, 3), torch.randn(4, 2))], cand)
    other = Candidates(index=torch.zeros(2, 1, dtype=torch.long), cosine=torch.ones(2, 1), n_new=2)
    with pytest.raises(ValueError, match="correlation shape"):
        match_features(other, corr)


def permuted_noisy(sae, perm: torch.Tensor, noise: float, seed: int):
    """A copy of ``sae`` whose new feature ``j`` is old feature ``perm[j]``, every weight noisy."""
    new = random_sae(D_IN, sae.cfg.d_sae, "blocks.0.attn.hook_z", seed=seed + 100)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            src = getattr(sae, name)
            src = src[:, perm] if name == "W_enc" else src[perm] if name != "b_dec" else src
            dst = getattr(new, name)
            dst.copy_(src + noise * src.std() * torch.randn(src.shape, generator=g))
    return new


def encoded_batches(old, new, n_batches: int = 4, tokens: int = 256, seed: int = 9):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n_batches):
            x = torch.randn(tokens, D_IN, generator=g)
            yield old.encode(x), new.encode(x)


@pytest.mark.parametrize("with_corr", [False, True])
def test_permuted_noisy_copy_is_matched_to_the_inverse_permutation(with_corr: bool) -> None:
    old = random_sae(D_IN, D_SAE, "blocks.0.attn.hook_z", seed=1)
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))
    new = permuted_noisy(old, perm, noise=0.1, seed=3)
    inverse = torch.argsort(perm)  # old feature i is new feature inverse[i]
    with torch.no_grad():  # a dead feature: no correlation, matched by cosine alone
        old.b_enc[0], new.b_enc[inverse[0]] = -100.0, -100.0
    cand = decoder_cosine(old.W_dec, new.W_dec, k=8, block=40)
    corr = activation_correlation(encoded_batches(old, new), cand) if with_corr else None
    if corr is not None:
        assert not corr.defined[0].any()
        assert corr.defined[1:].any(dim=1).all(), "every other old feature fires"
    m = match_features(cand, corr)
    assert m.mapping() == {i: int(inverse[i]) for i in range(D_SAE)}
    assert m.lost == [] and m.new == [] and m.split == {} and m.merged == {}
    assert all(p.status == "matched" and p.confidence > 0.9 for p in m.pairs)
    assert all((p.correlation is not None) is (with_corr and p.old != 0) for p in m.pairs)
    if with_corr:
        assert all(p.correlation > 0.9 for p in m.pairs if p.old != 0)


def test_split_lost_and_new() -> None:
    old = random_sae(D_IN, D_SAE, "blocks.0.attn.hook_z", seed=4)
    # new: old features 0..D_SAE-2 (old D_SAE-1 deleted), old feature 5 twice more (scaled),
    # one random feature
    g = torch.Generator().manual_seed(5)
    W_new = torch.cat(
        [
            old.W_dec[: D_SAE - 1].detach(),
            0.5 * old.W_dec[5:6].detach(),
            2.0 * old.W_dec[5:6].detach(),
            torch.randn(1, D_IN, generator=g),
        ]
    )
    cand = decoder_cosine(old.W_dec, W_new, k=8)
    m = match_features(cand)
    assert m.lost == [D_SAE - 1]
    assert m.new == [D_SAE + 1]
    assert 5 in m.split and len(m.split[5]) == 2
    assert sorted([m.mapping()[5], *m.split[5]]) == [5, D_SAE - 1, D_SAE]
    assert [p.old for p in m.pairs if p.status == "split"] == [5]
    assert m.merged == {}
    mapping = m.mapping()
    assert all(mapping[i] == i for i in range(D_SAE - 1) if i != 5)


def test_merge_is_the_reverse_of_a_split() -> None:
    g = torch.Generator().manual_seed(6)
    W_old = torch.randn(6, D_IN, generator=g)
    W_old[4] = 3.0 * W_old[2]  # two old features, one new
    W_new = W_old[[0, 1, 2, 3, 5]]
    m = match_features(decoder_cosine(W_old, W_new, k=5))
    assert m.merged.keys() == {2}
    partner = {j: i for i, j in m.mapping().items()}[2]
    assert sorted([partner, *m.merged[2]]) == [2, 4]
    assert [p.new for p in m.pairs if p.status == "merged"] == [2]
    assert m.lost == [] and m.new == []


def test_unrelated_sae_matches_nothing() -> None:
    old = random_sae(D_IN, D_SAE, "blocks.0.attn.hook_z", seed=7)
    other = random_sae(D_IN, D_SAE, "blocks.0.attn.hook_z", seed=8)
    cand = decoder_cosine(old.W_dec, other.W_dec, k=8)
    assert cand.cosine.max() < 0.5
    m = match_features(cand)
    assert m.pairs == [] and m.lost == list(range(D_SAE)) and m.new == list(range(D_SAE))
    corr = activation_correlation(encoded_batches(old, other), cand)
    m = match_features(cand, corr)
    assert m.pairs == [] and len(m.lost) == D_SAE


def brute_force(score: np.ndarray, threshold: float) -> tuple[float, dict[int, int]]:
    """Every partial matching (a permutation and a subset of its pairs) using only pairs
    scoring above ``threshold``; the best summed score."""
    n = score.shape[0]
    best, best_map = 0.0, {}
    for perm in itertools.permutations(range(n)):
        for kept in itertools.product([False, True], repeat=n):
            pairs = {i: perm[i] for i in range(n) if kept[i]}
            if any(score[i, j] <= threshold for i, j in pairs.items()):
                continue
            total = sum(score[i, j] for i, j in pairs.items())
            if total > best:
                best, best_map = total, pairs
    return best, best_map


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3])
def test_assignment_equals_brute_force(seed: int, threshold: float) -> None:
    g = torch.Generator().manual_seed(seed)
    old, new = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    cand = decoder_cosine(old, new, k=5)
    score = np.zeros((5, 5))
    score[np.arange(5)[:, None], cand.index.numpy()] = combined_score(cand).double().numpy()
    best, best_map = brute_force(score, threshold)
    m = match_features(cand, threshold=threshold, split_threshold=1.0)
    assert sum(p.confidence for p in m.pairs) == pytest.approx(best, abs=1e-5)
    assert m.mapping() == best_map  # continuous random scores: the optimum is unique


def test_every_unpaired_old_feature_has_its_best_candidate() -> None:
    """``best`` holds, for each old feature without a partner, the candidate of highest
    combined score (by hand over the candidate table)."""
    g = torch.Generator().manual_seed(5)
    old = torch.randn(40, 16, generator=g)
    new = torch.cat(
        [old[:25] + 0.01 * torch.randn(25, 16, generator=g), torch.randn(15, 16, generator=g)]
    )
    cands = decoder_cosine(old, new, k=4)
    m = match_features(cands, None, threshold=0.5)
    paired = {p.old for p in m.pairs}
    assert set(m.best) == set(range(40)) - paired
    for i, (j, score) in m.best.items():
        c = int(torch.argmax(cands.cosine[i]))
        assert (j, score) == (int(cands.index[i, c]), float(cands.cosine[i, c]))
