"""Gradient-based ranking of skip-gram terms (pure tensor functions, no I/O).

A mask ``m [n_terms]`` weighs the candidate ``(query, key)`` terms of one output feature in a
surrogate of the attention head, evaluated on the prefix ending at ``t``:

- ``s_i = sum_j m_j f_{q_j}(x_t) f_{k_j}(x_i) attn_j`` for ``i <= t`` (later positions are out
  of the softmax),
- ``a = softmax_i(s)``,
- ``pred = sum_i a_i sum_{k in K} f_k(x_i) value(k)``, ``K`` the distinct candidate keys.

A term's importance is ``d pred / d m_j`` at ``m = 1``, averaged over prefixes. Where a head's
score depends on distance (rotary positions, ``Terms.attn_at``), ``attn_j`` in ``s_i`` is the
term's score at the distance ``t - i`` where its query and key meet, and positions beyond a
local window are out of the softmax.

Terms are folded into their keys before touching positions, so memory is
``[batch, pos, n_keys] + [batch, n_terms]``, never ``[batch, pos, n_terms]``. Where scores
depend on distance the derivative is written out (``_importance_at_distances``) rather than
taken by autograd: the same numbers, several times faster.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rulecheck.core.scores import Terms


def key_slots(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct keys ``[n_keys]``, each term's slot among them ``[n_terms]``, and each key's
    value-score ``[n_keys]`` (taken from its terms, which all carry the same one).

    ``key`` and ``value`` are the terms' ``[n_terms]`` key ids and value-scores."""
    keys, slot = torch.unique(key, return_inverse=True)
    return keys, slot, value.new_zeros(keys.shape[0]).scatter(0, slot, value)


def surrogate_inputs(feats: Tensor, t: Tensor, terms: Terms) -> tuple[Tensor, Tensor]:
    """What the surrogate reads of ``feats [batch, pos, d_sae_in]``: each term's query
    activation at ``t [batch]``, ``fq [batch, n_terms]``, and the distinct keys' activations at
    every position, ``fk [batch, pos, n_keys]`` (keys in ``key_slots`` order)."""
    device = feats.device
    query = terms.query.to(device)
    keys = torch.unique(terms.key.to(device))
    batch = torch.arange(feats.shape[0], device=device)
    fq = feats[batch.unsqueeze(1), t.to(device).unsqueeze(1), query.unsqueeze(0)]
    return fq, feats[:, :, keys]


def surrogate_from(fq: Tensor, fk: Tensor, t: Tensor, terms: Terms, mask: Tensor) -> Tensor:
    """``[batch]`` surrogate activation from ``surrogate_inputs``'s ``fq [batch, n_terms]`` and
    ``fk [batch, pos, n_keys]``; differentiable in ``mask [n_terms]``."""
    device = fq.device
    dtype = torch.promote_types(fq.dtype, mask.dtype)
    _, slot, key_value = key_slots(terms.key.to(device), terms.value.to(device, dtype))
    fk = fk.to(dtype)
    t = t.to(device)
    after_t = torch.arange(fk.shape[1], device=device) > t.unsqueeze(1)  # [B, P]
    if terms.attn_at is None:
        w = mask.to(dtype) * terms.attn.to(device, dtype) * fq.to(dtype)  # [B, n_terms]
        per_key = w.new_zeros(fq.shape[0], fk.shape[2]).index_add(1, slot, w)  # [B, n_keys]
        s = torch.einsum("bik,bk->bi", fk, per_key)  # [B, P]
    else:
        s, beyond = _scores_at_distances(fq, fk, t, terms, mask.to(dtype), slot)
        after_t = after_t | beyond
    a = torch.softmax(s.masked_fill(after_t, float("-inf")), dim=1)
    return (a * (fk @ key_value)).sum(dim=1)


def _scores_at_distances(
    fq: Tensor, fk: Tensor, t: Tensor, terms: Terms, mask: Tensor, slot: Tensor
) -> tuple[Tensor, Tensor]:
    """``s [B, P]`` of the surrogate when each term's score is read at the distance ``t - i``
    (``terms.attn_at [n_terms, D]``), and ``[B, P]`` bool: the positions no term's key can be
    seen from (beyond a local window)."""
    assert terms.attn_at is not None
    table = terms.attn_at.to(fk.device, fk.dtype)  # [n_terms, D]
    seen = torch.isfinite(table)
    table = torch.where(seen, table, 0.0)
    n_dist = table.shape[1]
    w = mask * fq.to(fk.dtype)  # [B, n_terms]
    per_key = w.new_zeros(fq.shape[0], fk.shape[2], n_dist)  # [B, n_keys, D]
    per_key = per_key.index_add(1, slot, w.unsqueeze(2) * table.unsqueeze(0))
    distance = t.unsqueeze(1) - torch.arange(fk.shape[1], device=fk.device)  # [B, P]
    at = distance.clamp(0, n_dist - 1)
    gathered = per_key.gather(2, at.unsqueeze(1).expand(-1, fk.shape[2], -1))  # [B, n_keys, P]
    beyond = ~seen.any(0)[at] if len(terms) else torch.zeros_like(at, dtype=torch.bool)
    return torch.einsum("bik,bki->bi", fk, gathered), beyond


def surrogate_activation(feats: Tensor, t: Tensor, terms: Terms, mask: Tensor) -> Tensor:
    """``[batch]`` surrogate activation of the prefixes ending at ``t``.

    ``feats`` is ``[batch, pos, d_sae_in]`` (non-negative), ``t`` is ``[batch]``, ``mask`` is
    ``[n_terms]``; differentiable in ``mask``.
    """
    return surrogate_from(*surrogate_inputs(feats, t, terms), t, terms, mask)


def term_importance(feats: Tensor, t: Tensor, terms: Terms, batch_size: int = 64) -> Tensor:
    """``[n_terms]``: ``d surrogate / d mask`` at ``mask = 1``, averaged over all prefixes.

    ``feats`` is ``[n, pos, d_sae_in]`` and ``t`` ``[n]``; prefixes go through in chunks of
    ``batch_size``. Zero when there are no prefixes. Works under ``no_grad`` and
    ``inference_mode``.
    """
    return importance_from(*surrogate_inputs(feats, t, terms), t, terms, batch_size)


def importance_from(
    fq: Tensor, fk: Tensor, t: Tensor, terms: Terms, batch_size: int = 64
) -> Tensor:
    """``term_importance`` from ``surrogate_inputs``'s ``fq [n, n_terms]`` and ``fk [n, pos,
    n_keys]`` (gathered once, e.g. while a pass shared by many features runs)."""
    dtype = torch.promote_types(fq.dtype, terms.attn.dtype)
    n = fq.shape[0]
    if terms.attn_at is not None:
        return _importance_at_distances(fq, fk, t, terms, batch_size, dtype) / max(n, 1)
    with torch.inference_mode(False), torch.enable_grad():
        total = torch.zeros(len(terms), dtype=dtype, device=fq.device)
        # attn is saved for backward, which a tensor made under inference_mode cannot be
        chunk_terms = replace(terms, attn=terms.attn.clone())
        for start in range(0, n, batch_size):
            mask = torch.ones(len(terms), dtype=dtype, device=fq.device, requires_grad=True)
            stop = start + batch_size
            pred = surrogate_from(
                fq[start:stop].clone(), fk[start:stop].clone(), t[start:stop], chunk_terms, mask
            )
            total += torch.autograd.grad(pred.sum(), mask)[0]
    return total / max(n, 1)


def _importance_at_distances(
    fq: Tensor, fk: Tensor, t: Tensor, terms: Terms, batch_size: int, dtype: torch.dtype
) -> Tensor:
    """``[n_terms]``: ``d surrogate / d mask`` at ``mask = 1`` summed over the prefixes, for
    terms whose score is read at their distance (``terms.attn_at``), written out instead of
    taken by autograd.

    With ``g_i = a_i (v_i - pred)`` (the softmax's derivative times the values), the
    derivative for term ``j`` is ``fq_j sum_i g_i fk_{i, key_j} attn_j(t - i)``: ``g fk`` is
    binned by distance once per key, ``H [B, n_keys, D]``, and each term reads its key's bins
    against its own scores. When the terms come key by key with as many queries each (as
    ``candidate_terms`` makes them), both the scores and the derivative are one batched
    matrix product per key, with nothing of size ``[B, n_terms, D]`` in memory."""
    assert terms.attn_at is not None
    device = fk.device
    table = terms.attn_at.to(device, dtype)  # [n_terms, D]
    seen = torch.isfinite(table)
    table = torch.where(seen, table, 0.0)
    n_terms, n_dist = table.shape
    keys, slot, key_value = key_slots(terms.key.to(device), terms.value.to(device, dtype))
    n_keys = keys.shape[0]
    # key by key with as many terms each, keys in any order: block i holds key block_slot[i]
    grouped, per, block_slot = _key_blocks(slot, n_keys)
    if not grouped:  # [batch, n_terms, D] per chunk: about 32 MiB at most
        batch_size = max(1, min(batch_size, 2**23 // max(1, table.numel())))
    total = torch.zeros(n_terms, dtype=dtype, device=device)
    for start in range(0, fq.shape[0], batch_size):
        q = fq[start : start + batch_size].to(dtype)  # [B, n_terms]
        k = fk[start : start + batch_size].to(dtype)  # [B, P, n_keys]
        b, n_pos = q.shape[0], k.shape[1]
        # per_key [B, n_keys, D]: sum over a key's terms of fq_j attn_j(d)
        if grouped:
            per_key = torch.empty(b, n_keys, n_dist, dtype=dtype, device=device)
            per_key[:, block_slot] = torch.bmm(
                q.view(b, n_keys, per).transpose(0, 1), table.view(n_keys, per, n_dist)
            ).transpose(0, 1)
        else:
            per_key = q.new_zeros(b, n_keys, n_dist).index_add(
                1, slot, q.unsqueeze(2) * table.unsqueeze(0)
            )
        tt = t[start : start + batch_size].to(device)
        distance = tt.unsqueeze(1) - torch.arange(n_pos, device=device)  # [B, P]
        at = distance.clamp(0, n_dist - 1).unsqueeze(1).expand(-1, n_keys, -1)  # [B, n_keys, P]
        s = torch.einsum("bik,bki->bi", k, per_key.gather(2, at))  # [B, P]
        out = (distance < 0) | ~seen.any(0)[at[:, 0]] if n_terms else distance < 0
        a = torch.softmax(s.masked_fill(out, float("-inf")), dim=1)
        v = k @ key_value  # [B, P]
        g = a * (v - (a * v).sum(1, keepdim=True))  # [B, P]
        binned = q.new_zeros(b, n_keys, n_dist).scatter_add(
            2, at, (g.unsqueeze(2) * k).transpose(1, 2)
        )  # [B, n_keys, D]
        if grouped:
            reach = torch.bmm(
                q.view(b, n_keys, per).permute(1, 2, 0), binned[:, block_slot].transpose(0, 1)
            )  # [n_keys, per, D]
            total += (reach.reshape(n_terms, n_dist) * table).sum(1)
        else:
            total += torch.einsum("bj,bjd,jd->j", q, binned[:, slot], table)
    return total


def _key_blocks(slot: Tensor, n_keys: int) -> tuple[bool, int, Tensor]:
    """Whether the terms come key by key with as many terms each (as ``candidate_terms`` makes
    them, best key first), the terms per key, and each block's key slot ``[n_keys]``."""
    n_terms = slot.shape[0]
    if n_keys == 0 or n_terms % n_keys:
        return False, 0, slot[:0]
    blocks = slot.view(n_keys, n_terms // n_keys)
    first = blocks[:, 0]
    distinct = torch.unique(first).shape[0] == n_keys
    return bool((blocks == first[:, None]).all()) and distinct, blocks.shape[1], first


def with_importance(terms: Terms, importance: Tensor) -> Terms:
    """``terms`` carrying ``importance [n_terms]``, ready for ``rank_by_importance``."""
    if importance.shape != (len(terms),):
        raise ValueError(f"importance has shape {tuple(importance.shape)}, want ({len(terms)},)")
    return replace(terms, importance=importance)
