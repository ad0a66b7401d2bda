"""Attention weights read in SAE feature space (pure tensor functions, no I/O).

For layer ``l`` and head ``h`` (TransformerLens conventions, ``W_Q[h]`` is ``[d_model, d_head]``):

- ``value-score(j) = (d_j W_V[h]) . u_g``
- ``attn-score(q, k) = (d_q W_Q[h]) . (d_k W_K[h]) / attn_scale``

where ``d_j`` are the input SAE's decoder rows as the head reads them (after LayerNorm) and
``u_g`` is the output SAE's encoder column for feature ``g`` restricted to head ``h``.
Biases ``b_Q, b_K, b_V`` stay out of the pair scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CENTRED_NORMS = ("LN", "LNPre")
SCALED_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


def reading_directions(
    W_dec: Tensor, normalization_type: str | None, ln_scale: float, ln_w: Tensor | None = None
) -> Tensor:
    """Input-SAE decoder rows ``[d_sae_in, d_model]`` as the attention layer reads them.

    LayerNorm leaves centring and a per-token scale; the scale is replaced by its mean over the
    corpus (``ln_scale``), and an unfolded LayerNorm weight ``ln_w`` is applied.
    """
    d = W_dec
    if normalization_type in CENTRED_NORMS:
        d = d - d.mean(dim=-1, keepdim=True)
    if normalization_type in SCALED_NORMS:
        d = d * ln_scale
    if ln_w is not None:
        d = d * ln_w
    return d


def value_scores(d: Tensor, W_V: Tensor, u: Tensor) -> Tensor:
    """``[d_sae_in, n_out]``: how much each input feature, attended to, writes onto each output
    feature. ``d`` is ``[d_sae_in, d_model]``, ``W_V`` ``[d_model, d_head]``, ``u``
    ``[d_head, n_out]``."""
    return (d @ W_V) @ u


def attn_scores(d_q: Tensor, d_k: Tensor, W_Q: Tensor, W_K: Tensor, attn_scale: float) -> Tensor:
    """``[n_q, n_k]`` attention logits between query directions ``d_q`` and key directions
    ``d_k`` (both ``[n, d_model]``)."""
    return (d_q @ W_Q) @ (d_k @ W_K).T / attn_scale


def top_indices(x: Tensor, k: int, dim: int = 0) -> Tensor:
    """Indices of the ``k`` largest entries along ``dim``; ties go to the lower index, so the
    result is the same on every device and batch layout."""
    order = torch.sort(x, dim=dim, descending=True, stable=True).indices
    return order.narrow(dim, 0, min(k, x.shape[dim]))


@dataclass(frozen=True)
class Terms:
    """Skip-gram terms ``[key] ... [query] -> g`` of one output feature, one entry per term."""

    query: Tensor  # [n_terms] long, input-SAE feature ids
    key: Tensor  # [n_terms] long
    attn: Tensor  # [n_terms] attn-score(query, key)
    value: Tensor  # [n_terms] value-score(key)
    importance: Tensor | None = None  # [n_terms], gradient-based ranking only
    # [n_terms] long, query position minus key position at most / at least (-1: no bound);
    # None: no term is bounded
    max_distance: Tensor | None = None
    min_distance: Tensor | None = None

    def __len__(self) -> int:
        return int(self.query.shape[0])

    @property
    def bounded(self) -> bool:
        """Whether some term holds only at some distances (``rules.window_key_act``)."""
        return any(
            d is not None and bool((d >= 0).any()) for d in (self.max_distance, self.min_distance)
        )

    def _map(self, f) -> Terms:
        return Terms(
            *(f(x) for x in (self.query, self.key, self.attn, self.value)),
            *(None if x is None else f(x) for x in (self.importance, self.max_distance)),
            None if self.min_distance is None else f(self.min_distance),
        )

    def take(self, index: Tensor) -> Terms:
        return self._map(lambda x: x[index])

    def to(self, device: torch.device | str) -> Terms:
        return self._map(lambda x: x.to(device))

    @property
    def weight(self) -> Tensor:
        """Weight-based importance ``attn-score * value-score``."""
        return self.attn * self.value


def candidate_terms(
    d: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    attn_scale: float,
    value_score: Tensor,
    n_keys: int = 100,
    queries_per_key: int = 100,
) -> Terms:
    """The paper's candidates for one output feature: the ``n_keys`` keys with the highest
    value-score, and for each the ``queries_per_key`` queries with the highest attn-score.

    ``value_score`` is ``[d_sae_in]`` for this feature. Terms are ordered key by key.
    """
    keys = top_indices(value_score, n_keys)  # [K]
    attn = attn_scores(d, d[keys], W_Q, W_K, attn_scale)  # [d_sae_in, K]
    queries = top_indices(attn, queries_per_key, dim=0)  # [Q, K]
    n_q = queries.shape[0]
    key_ids = keys.unsqueeze(0).expand(n_q, -1)  # [Q, K]
    pair_attn = attn.gather(0, queries)  # [Q, K]
    # key-major order: all queries of the best key first
    return Terms(
        query=queries.T.reshape(-1),
        key=key_ids.T.reshape(-1),
        attn=pair_attn.T.reshape(-1),
        value=value_score[key_ids].T.reshape(-1),
    )


def rank_by_weight(terms: Terms) -> Terms:
    """Terms sorted by ``attn-score * value-score``, highest first (stable)."""
    return terms.take(torch.sort(terms.weight, descending=True, stable=True).indices)


def rank_by_importance(terms: Terms) -> Terms:
    """Terms sorted by gradient importance, largest first (stable)."""
    if terms.importance is None:
        raise ValueError("terms carry no importance; run the gradient pass first")
    return terms.take(torch.sort(terms.importance, descending=True, stable=True).indices)
