"""Matching the features of an old and a new SAE of the same hook.

A retrained SAE permutes, splits and merges features. The method:

1. **Candidates by decoder cosine.** For each old feature keep the ``k`` new features whose
   decoder rows are closest in cosine, computed over blocks of old rows with ``torch.topk``,
   so memory stays ``O(block * n_new + n_old * k)`` instead of ``O(n_old * n_new)``.
2. **Activation correlation (optional).** Pearson correlation of old and new activations over a
   corpus sample, streamed: sums, sums of squares and cross products are accumulated in float64
   for the candidate pairs only (``O(n_old * k)``, flat in corpus size).
3. **Assignment.** A one-to-one matching maximising the summed score (cosine, or the mean of
   cosine and correlation where the correlation is defined) over candidate pairs scoring above
   ``threshold``, solved exactly by ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``
   on the sparse candidate graph, padded with one dummy partner per feature so that leaving a
   feature unmatched is allowed (a full matching of the padded graph is a matching of the
   original one; its cost is a constant minus the summed score).
4. **Splits and merges.** An old feature whose candidates scoring above ``split_threshold``
   include two or more new features is *split* (the extra new ones are reported); a new feature
   that two or more old features score above ``split_threshold`` with is *merged*. Old features
   left unmatched and not part of a merge are *lost*; new ones unmatched and not part of a
   split are *new*.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from rulecheck.core.pairs import Matching, Pair


@dataclass(frozen=True)
class Candidates:
    """The ``k`` new features closest to each old feature by decoder cosine.

    ``index`` ``[n_old, k]`` (long, new feature ids) and ``cosine`` ``[n_old, k]`` (float), each
    row in decreasing cosine; ``n_new`` is the size of the new SAE.
    """

    index: torch.Tensor
    cosine: torch.Tensor
    n_new: int

    @property
    def n_old(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class Correlation:
    """Pearson correlation for the candidate pairs: ``r`` ``[n_old, k]``; ``defined``
    ``[n_old, k]`` is False where either activation is constant over the sample (``r`` is 0
    there)."""

    r: torch.Tensor
    defined: torch.Tensor


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    w = w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_cosine(
    W_dec_old: torch.Tensor, W_dec_new: torch.Tensor, k: int = 8, block: int = 4096
) -> Candidates:
    """Top-``k`` new features per old feature by decoder-row cosine, ``block`` old rows at a
    time. ``W_dec_old`` ``[n_old, d]``, ``W_dec_new`` ``[n_new, d]``."""
    if W_dec_old.shape[1] != W_dec_new.shape[1]:
        raise ValueError(f"decoder widths differ: {W_dec_old.shape[1]} and {W_dec_new.shape[1]}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    n_old, n_new = W_dec_old.shape[0], W_dec_new.shape[0]
    k = min(k, n_new)
    new_unit = _unit_rows(W_dec_new.detach())  # [n_new, d]
    index = torch.empty(n_old, k, dtype=torch.long, device=W_dec_new.device)
    cosine = torch.empty(n_old, k, device=W_dec_new.device)
    with torch.no_grad():
        for start in range(0, n_old, block):
            old_unit = _unit_rows(W_dec_old[start : start + block].detach())  # [b, d]
            sims = old_unit @ new_unit.T  # [b, n_new]
            values, idx = torch.topk(sims, k, dim=1)
            cosine[start : start + block] = values
            index[start : start + block] = idx
    return Candidates(index=index, cosine=cosine, n_new=n_new)


def activation_correlation(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], candidates: Candidates, block: int = 4096
) -> Correlation:
    """Pearson correlation of old and new activations for the candidate pairs, streamed.

    ``batches`` yields ``(acts_old [tokens, n_old], acts_new [tokens, n_new])``; only
    ``O(n_old * k)`` sums are kept, in float64. Pairs where either side is constant over the
    sample get ``r = 0`` and ``defined = False``.
    """
    index = candidates.index  # [n_old, k]
    n_old, n_new = candidates.n_old, candidates.n_new
    dev = index.device
    f64 = torch.float64
    n = 0
    sx = torch.zeros(n_old, dtype=f64, device=dev)
    sxx = torch.zeros(n_old, dtype=f64, device=dev)
    sy = torch.zeros(n_new, dtype=f64, device=dev)
    syy = torch.zeros(n_new, dtype=f64, device=dev)
    sxy = torch.zeros(index.shape, dtype=f64, device=dev)  # [n_old, k]
    # shift by the first batch's means so that sums of squares do not cancel catastrophically
    shift_x: torch.Tensor | None = None
    shift_y: torch.Tensor | None = None
    with torch.no_grad():
        for acts_old, acts_new in batches:
            if acts_old.shape[1] != n_old or acts_new.shape[1] != n_new:
                raise ValueError(
                    f"activation widths {acts_old.shape[1]}, {acts_new.shape[1]} do not match "
                    f"the candidates ({n_old}, {n_new})"
                )
            x = acts_old.to(dev, f64)  # [t, n_old]
            y = acts_new.to(dev, f64)  # [t, n_new]
            if shift_x is None or shift_y is None:
                shift_x, shift_y = x.mean(0), y.mean(0)
            x, y = x - shift_x, y - shift_y
            n += x.shape[0]
            sx += x.sum(0)
            sxx += (x * x).sum(0)
            sy += y.sum(0)
            syy += (y * y).sum(0)
            # old features per step: at most ``block``, and the gathered [b, k, t] at most
            # 2^24 values (128 MiB) however long the batch
            step = max(1, min(block, (1 << 24) // max(1, x.shape[0] * index.shape[1])))
            x_t, y_t = x.T.contiguous(), y.T.contiguous()  # [n_old, t], [n_new, t]
            for start in range(0, n_old, step):
                y_c = y_t[index[start : start + step]]  # [b, k, t]: whole rows, one gather
                x_b = x_t[start : start + step, :, None]  # [b, t, 1]
                sxy[start : start + step] += torch.bmm(y_c, x_b)[..., 0]  # [b, k]
    if n == 0:
        raise ValueError("no activations to correlate")
    var_x = (sxx - sx * sx / n).clamp_min(0)  # [n_old], times n
    var_y = (syy - sy * sy / n).clamp_min(0)  # [n_new], times n
    cov = sxy - sx[:, None] * sy[index] / n  # [n_old, k], times n
    denom = (var_x[:, None] * var_y[index]).sqrt()
    scale = (sxx[:, None] * syy[index]).sqrt()
    defined = denom > 1e-12 * scale.clamp_min(1e-300)
    defined &= (var_x[:, None] > 0) & (var_y[index] > 0)
    r = torch.where(defined, cov / torch.where(defined, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    return Correlation(r=r.float(), defined=defined)


def combined_score(candidates: Candidates, corr: Correlation | None = None) -> torch.Tensor:
    """``[n_old, k]``: the mean of cosine and correlation where the correlation is defined,
    else the cosine."""
    cos = candidates.cosine.float()
    if corr is None:
        return cos
    return torch.where(corr.defined, (cos + corr.r.to(cos.device)) / 2, cos)


def _assign(
    rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, n_old: int, n_new: int
) -> dict[int, int]:
    """Maximum-score matching over the edges ``(rows[e], cols[e])`` (scores in ``[-1, 1]``);
    unmatched features are allowed. Returns old -> new."""
    if len(rows) == 0:
        return {}
    # padded graph: rows are old features then one dummy per new feature, columns new features
    # then one dummy per old feature. A pair (i, j) costs 3 - s plus its mirror edge between
    # the dummies (dummy of j to dummy of i, 1); an unmatched feature costs its own dummy edge
    # (2). A full matching with m pairs costs 2 (n_old + n_new) - sum(s): minimal cost is
    # maximal score. Costs stay positive, so no edge is an explicit zero.
    old_dummy_cols = n_new + np.arange(n_old)
    new_dummy_rows = n_old + np.arange(n_new)
    r = np.concatenate([rows, np.arange(n_old), new_dummy_rows, n_old + cols])
    c = np.concatenate([cols, old_dummy_cols, np.arange(n_new), n_new + rows])
    w = np.concatenate(
        [
            3.0 - scores,  # a real pair
            np.full(n_old, 2.0),  # old feature unmatched
            np.full(n_new, 2.0),  # new feature unmatched
            np.full(len(rows), 1.0),  # mirror of a real pair between the dummies
        ]
    )
    size = n_old + n_new
    graph = scipy.sparse.coo_array((w, (r, c)), shape=(size, size)).tocsr()
    # candidate rows hold distinct new ids, so no two edges share a cell (COO would sum them)
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    return {
        int(i): int(j) for i, j in zip(row_ind, col_ind, strict=True) if i < n_old and j < n_new
    }


def match_features(
    candidates: Candidates,
    corr: Correlation | None = None,
    threshold: float = 0.5,
    split_threshold: float = 0.7,
) -> Matching:
    """One-to-one matching of old to new features maximising the summed combined score.

    Only candidate pairs scoring above ``threshold`` can be matched; a pair's confidence is its
    combined score (see ``combined_score``); a pair scoring 0 or less never raises the sum, so
    it is left unmatched even when ``threshold`` is negative. Splits and merges are read from the candidates
    scoring above ``split_threshold``.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold}")
    n_old, n_new = candidates.n_old, candidates.n_new
    if corr is not None and corr.r.shape != candidates.index.shape:
        raise ValueError(
            f"correlation shape {tuple(corr.r.shape)} is not the candidates' "
            f"{tuple(candidates.index.shape)}"
        )
    score = combined_score(candidates, corr).cpu()  # [n_old, k]
    index = candidates.index.cpu()  # [n_old, k]
    keep = score > threshold
    rows = torch.arange(n_old)[:, None].expand_as(index)[keep].numpy()
    cols = index[keep].numpy()
    mapping = _assign(rows, cols, score[keep].double().numpy(), n_old, n_new)

    # splits and merges from the strong candidates
    strong = score > split_threshold
    partners_of_old: dict[int, list[int]] = {}
    partners_of_new: dict[int, list[int]] = {}
    for i, j in zip(
        torch.arange(n_old)[:, None].expand_as(index)[strong].tolist(),
        index[strong].tolist(),
        strict=True,
    ):
        partners_of_old.setdefault(i, []).append(j)
        partners_of_new.setdefault(j, []).append(i)
    inverse = {j: i for i, j in mapping.items()}
    split: dict[int, list[int]] = {}
    for i, js in partners_of_old.items():
        extra = sorted(j for j in js if j != mapping.get(i) and j not in inverse)
        if i in mapping and extra:
            split[i] = extra
    merged: dict[int, list[int]] = {}
    for j, is_ in partners_of_new.items():
        extra = sorted(i for i in is_ if i != inverse.get(j) and i not in mapping)
        if j in inverse and extra:
            merged[j] = extra

    pos = {(i, int(j)): c for i, row in enumerate(index.tolist()) for c, j in enumerate(row)}
    pairs = []
    for i in sorted(mapping):
        j = mapping[i]
        c = pos[(i, j)]
        status = "split" if i in split else "merged" if j in merged else "matched"
        correlation = None
        if corr is not None and bool(corr.defined[i, c]):
            correlation = float(corr.r[i, c])
        pairs.append(
            Pair(
                old=i,
                new=j,
                cosine=float(candidates.cosine[i, c]),
                correlation=correlation,
                confidence=float(score[i, c]),
                status=status,
            )
        )
    in_merge = {i for v in merged.values() for i in v}
    in_split = {j for v in split.values() for j in v}
    lost = [i for i in range(n_old) if i not in mapping and i not in in_merge]
    new = [j for j in range(n_new) if j not in inverse and j not in in_split]
    top = score.argmax(dim=1) if score.shape[1] else None  # [n_old]
    best = {}
    if top is not None:
        for i in (i for i in range(n_old) if i not in mapping):  # lost, or merged away
            c = int(top[i])
            best[i] = (int(index[i, c]), float(score[i, c]))
    return Matching(pairs=pairs, lost=lost, new=new, split=split, merged=merged, best=best)
