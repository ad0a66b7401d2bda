"""Missed positives: prefixes where a feature is on and its skip-grams predict it off, and the
skip-grams that would have matched them (pure tensor functions).

A failed recall names a few of them, each with what would have caught it: the feature's own
terms that match the prefix once their distance bounds are dropped (``unbounded_matches``), or,
where none does, the head's candidate skip-grams present in the prefix (``candidate_matches``):
an input feature ``q`` on at the query and ``k`` on at or before it, of positive attn-score
and value-score, ranked by what the term would predict there, ``q * k**2 * attn * value``
(``rules.term_contributions``, the key at its strongest in the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rulecheck.core.scores import QKForm, Terms, attn_scores


@dataclass(frozen=True)
class Candidate:
    """A skip-gram present in one prefix: input features ``key`` (at its strongest at
    ``key_pos``) and ``query`` (on at the prefix's end), and what it would predict there."""

    key: int
    query: int
    key_pos: int
    score: float


def strongest_missed(act: Tensor, pred: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` positives (``act > 0``) predicted off (``pred <= 0``) with the
    highest activation, strongest first (ties in index order)."""
    idx = torch.nonzero((act > 0) & (pred <= 0)).flatten()
    order = torch.sort(-act[idx].float(), stable=True).indices
    return idx[order][:n]


def unbounded_matches(q_act: Tensor, k_max: Tensor, terms: Terms) -> Tensor:
    """``[m, n_terms]`` bool: where each term's query is on at the prefix's end and its key on
    anywhere in the prefix (``prefix_stats``'s ``q_act, k_max [m, columns]``), distances
    aside."""
    return (q_act[:, terms.query] > 0) & (k_max[:, terms.key] > 0)


def candidate_matches(
    feats: Tensor,
    d: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    form: QKForm | float,
    value_score: Tensor,
    n: int,
) -> list[Candidate]:
    """The ``n`` skip-grams of a head that would predict the feature on most at the end of one
    prefix, strongest first: ``feats [t + 1, d_sae_in]`` its input-feature activations, ``d``
    the input directions as the head reads them, ``value_score [d_sae_in]`` the feature's."""
    t = feats.shape[0] - 1
    q_act = feats[t].clamp(min=0)
    k_max, k_pos = feats.clamp(min=0).max(dim=0)
    queries = torch.nonzero(q_act > 0).flatten()
    keys = torch.nonzero((k_max > 0) & (value_score > 0)).flatten()
    if not len(queries) or not len(keys):
        return []
    attn = attn_scores(d[queries], d[keys], W_Q, W_K, form, max_distance=t)  # [n_q, n_k]
    fk = k_max[keys]
    score = q_act[queries, None] * fk * attn * fk * value_score[keys]
    score = torch.where(attn > 0, score, 0.0).flatten()
    order = torch.sort(-score, stable=True).indices[:n]
    out = []
    for i in order.tolist():
        if score[i] <= 0:
            break
        q, k = divmod(i, len(keys))
        key = int(keys[k])
        out.append(Candidate(key, int(queries[q]), int(k_pos[key]), float(score[i])))
    return out
