"""Skip-gram disjunctions evaluated on prefixes (pure tensor functions, no I/O).

A term ``[k] ... [q] -> g`` matches the prefix ending at ``t`` when query feature ``q`` is active
at ``t`` and key feature ``k`` at some ``i <= t``, with ``attn-score > 0`` and
``value-score > 0``. A feature's description is the disjunction of its first ``n`` terms; the
predicted activation is the largest matching ``f_q(x_t) f_k attn-score * f_k value-score``,
with ``f_k`` the key's largest activation in the prefix. Active iff the prediction is > 0.
A term with distance bounds reads its key only at ``min_distance <= t - i <= max_distance``
(``window_key_act``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rulecheck.core.scores import Terms


def prefix_stats(feats: Tensor, t: Tensor, where: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Query activations at ``t`` and key activations maxed over the prefix ``[0, t]``.

    ``feats`` is ``[batch, pos, d_sae_in]``, ``t`` is ``[m]``, each prefix reading row
    ``where[m]`` of ``feats`` (default: prefix ``i`` reads row ``i``); returns ``q_act, k_max``,
    both ``[m, d_sae_in]``. The running maximum over positions is kept once per row and read
    by every prefix that ends there.
    """
    if where is None:
        where = torch.arange(feats.shape[0], device=feats.device)
    k_max = feats.new_empty(len(t), feats.shape[2])
    order = torch.argsort(t, stable=True)
    # the prefixes ending at p are order[ends[p] : ends[p + 1]]
    ends = torch.searchsorted(t[order], torch.arange(feats.shape[1] + 1, device=t.device)).tolist()
    running = feats[:, 0]
    for p in range(feats.shape[1]):
        if ends[p] == len(t):
            break
        if p:
            running = torch.maximum(running, feats[:, p])
        rows = order[ends[p] : ends[p + 1]]
        k_max[rows] = running[where[rows]]
    return feats[where, t], k_max


def window_key_act(feats: Tensor, t: Tensor, where: Tensor, terms: Terms) -> Tensor:
    """``[m, n_terms]``: each term's key activation (clamped at 0) maxed over the positions
    ``i`` of the prefix ``[0, t]`` at its distances, ``min_distance <= t - i <=
    max_distance`` (a missing or negative bound: none). ``feats [batch, pos, d]``, each
    prefix reading row ``where [m]``."""
    n = len(terms)
    pos = torch.arange(feats.shape[1], device=feats.device)
    dist = (t[:, None] - pos[None, :])[:, None, :]  # [m, 1, pos]; negative: after the query
    none = torch.full((n,), -1, dtype=torch.long, device=feats.device)
    lo = (none if terms.min_distance is None else terms.min_distance).clamp(min=0)
    hi = none if terms.max_distance is None else terms.max_distance
    hi = torch.where(hi < 0, feats.shape[1], hi)
    inside = (dist >= lo[None, :, None]) & (dist <= hi[None, :, None])  # [m, n_terms, pos]
    keys = feats[where][:, :, terms.key].clamp(min=0).transpose(1, 2)  # [m, n_terms, pos]
    return torch.where(inside, keys, 0.0).amax(dim=2)


def term_contributions(
    q_act: Tensor, k_max: Tensor, terms: Terms, k_act: Tensor | None = None
) -> Tensor:
    """``[batch, n_terms]``: each term's predicted activation, 0 where it does not match (its
    query or key inactive, or its attn- or value-score not positive). ``k_act [batch,
    n_terms]``, where given, is each term's key activation (``window_key_act``) in place of
    the prefix's maximum."""
    fq = q_act.clamp(min=0)[:, terms.query]  # an inactive column reads 0: its products are 0
    fk = k_max.clamp(min=0)[:, terms.key] if k_act is None else k_act
    # ((((fq * fk) * attn) * fk) * value), in place: the same products, three fewer
    # [batch, n_terms] temporaries
    contrib = (fq * fk).mul_(terms.attn).mul_(fk).mul_(terms.value)
    live = (terms.attn > 0) & (terms.value > 0)  # [n_terms]
    return contrib if bool(live.all()) else torch.where(live, contrib, 0.0)


def predictions_by_terms(contrib: Tensor, n_terms: list[int]) -> Tensor:
    """``[batch, len(n_terms)]``: the prediction of the disjunction of the first ``n`` terms,
    for every ``n`` in ``n_terms``, from one running maximum over the ranked terms, taken a
    segment (between two counts) at a time. ``contrib`` is ``term_contributions``'s (>= 0)."""
    ends = [min(max(n, 0), contrib.shape[1]) for n in n_terms]
    at: dict[int, Tensor] = {}
    running, prev = contrib.new_zeros(contrib.shape[0]), 0
    for end in sorted(set(ends)):
        if end > prev:
            running = torch.maximum(running, contrib[:, prev:end].amax(dim=1))
            prev = end
        at[end] = running
    if not ends:
        return contrib.new_zeros(contrib.shape[0], 0)
    return torch.stack([at[e] for e in ends], dim=1)


def predict(feats: Tensor, t: Tensor, terms: Terms) -> Tensor:
    """``[batch]`` predicted activation of the disjunction of all ``terms``."""
    k_act = None
    if terms.bounded:
        k_act = window_key_act(feats, t, torch.arange(feats.shape[0], device=feats.device), terms)
    return predict_from(*prefix_stats(feats, t), terms, k_act)


def predict_from(q_act: Tensor, k_max: Tensor, terms: Terms, k_act: Tensor | None = None) -> Tensor:
    """``predict`` from ``prefix_stats``'s ``q_act, k_max [batch, d_sae_in]`` (and, for
    bounded terms, ``window_key_act``'s ``k_act``)."""
    contrib = term_contributions(q_act, k_max, terms, k_act)
    return contrib.amax(dim=1) if len(terms) else contrib.new_zeros(q_act.shape[0])


def term_counts(n_candidates: int, largest: int = 4096) -> list[int]:
    """The paper's grid 4, 8, ..., 4096, cut at the number of candidates (which is added)."""
    counts = []
    n = 4
    while n <= min(largest, n_candidates):
        counts.append(n)
        n *= 2
    if n_candidates and (not counts or counts[-1] < min(largest, n_candidates)):
        counts.append(min(largest, n_candidates))
    return counts
