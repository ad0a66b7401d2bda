"""Attention weights read in SAE feature space (pure tensor functions, no I/O).

For layer ``l`` and head ``h`` (TransformerLens conventions, ``W_Q[h]`` is ``[d_model, d_head]``):

- ``value-score(j) = (d_j W_V[h]) . u_g``
- ``attn-score(q, k) = (d_q W_Q[h]) . (d_k W_K[h]) / attn_scale``

where ``d_j`` are the input SAE's decoder rows as the head reads them (after LayerNorm or
RMSNorm) and ``u_g`` is the output SAE's encoder column for feature ``g`` restricted to head
``h``. Biases ``b_Q, b_K, b_V`` stay out of the pair scores.

A head's ``QKForm`` holds what it does to the two projections besides their dot product, in
TransformerLens's order: RMSNorm of each query and key (q/k norm), rotary positions, the
scale, a soft cap ``cap * tanh(score / cap)``, a local window. Under rotary positions the
score of a pair is a function of the distance ``delta = t - i`` between the query's position
``t`` and the key's ``i``: ``attn-score(q, k, delta) = (R_delta q') . (R_0 k') / attn_scale``,
``q' = norm(d_q W_Q)``, which is what the model computes for those directions at any ``t``
(rotations compose). Where a score must stand for every distance (ranking candidates, the
weight ranking, the distractor criterion) it is the largest over the distances ``0 ..
max_distance`` that the feature's exemplars show (``distance_grid``: every one up to 32, then
a geometric grid); the gradient surrogate and the counterfactuals read the score at the
distance where the pair meets. Without rotary positions every distance gives the same score,
the one above.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class Rotary:
    """Rotary positions as TransformerLens applies them: the first ``dim`` dimensions of each
    query and key rotated by their position's angles (``rotary_cos``/``rotary_sin`` tables)."""

    cos: Tensor  # [n_ctx, dim]
    sin: Tensor  # [n_ctx, dim]
    adjacent_pairs: bool  # GPT-J's pairs (2i, 2i + 1); else GPT-NeoX's (i, i + dim / 2)

    def rotate(self, x: Tensor, position: int | Tensor) -> Tensor:
        """``x [..., d_head]`` as rotated at ``position`` (an int, or long positions shaped
        like ``x.shape[:-1]`` or broadcast to it)."""
        dim = self.cos.shape[-1]
        x_rot, x_pass = x[..., :dim], x[..., dim:]
        flip = torch.empty_like(x_rot)
        if self.adjacent_pairs:
            flip[..., ::2], flip[..., 1::2] = -x_rot[..., 1::2], x_rot[..., ::2]
        else:
            n = dim // 2
            flip[..., :n], flip[..., n:] = -x_rot[..., n:], x_rot[..., :n]
        cos, sin = self.cos[position].to(x.dtype), self.sin[position].to(x.dtype)
        return torch.cat([x_rot * cos + flip * sin, x_pass], dim=-1)


@dataclass(frozen=True)
class QKForm:
    """How a head scores a query against a key beyond ``q . k / attn_scale``."""

    attn_scale: float
    rotary: Rotary | None = None
    q_norm: Tensor | None = None  # [d_head]: RMSNorm weight of each query (q/k norm)
    k_norm: Tensor | None = None
    norm_eps: float = 1e-5
    soft_cap: float = 0.0  # > 0: scores become soft_cap * tanh(score / soft_cap)
    window: int | None = None  # local attention: keys at distance < window only

    @property
    def positional(self) -> bool:
        """Whether a pair's score depends on its distance."""
        return self.rotary is not None or self.window is not None

    @property
    def plain(self) -> bool:
        """The paper's score: nothing but the dot product and the scale."""
        return not self.positional and self.q_norm is None and self.soft_cap <= 0

    def project(self, d: Tensor, W: Tensor, norm: Tensor | None) -> Tensor:
        """``[n, d_head]``: directions ``d [n, d_model]`` through ``W [d_model, d_head]`` and
        the q/k norm ``norm``, as the head's queries or keys."""
        return self.normed(d @ W, norm)

    def normed(self, x: Tensor, norm: Tensor | None) -> Tensor:
        """Queries or keys ``x [..., d_head]`` through the q/k RMSNorm of weight ``norm``
        (none: as they are)."""
        if norm is None:
            return x
        scale = (x.pow(2).mean(-1, keepdim=True) + self.norm_eps).sqrt()
        return x / scale * norm.to(x.dtype)

    def capped(self, s: Tensor) -> Tensor:
        """Scaled scores ``s`` through the soft cap, where the head has one."""
        if self.soft_cap > 0:
            return self.soft_cap * torch.tanh(s / self.soft_cap)
        return s

    def scores(self, q: Tensor, k: Tensor, distance: int = 0) -> Tensor:
        """``[n_q, n_k]`` scores of projected queries ``q [n_q, d_head]`` against keys ``k
        [n_k, d_head]`` at ``distance`` (-inf beyond a local window)."""
        if self.rotary is not None:
            q, k = self.rotary.rotate(q, distance), self.rotary.rotate(k, 0)
        return self.finish(q @ k.T / self.attn_scale, distance)

    def finish(self, s: Tensor, distance: int) -> Tensor:
        """Scaled scores ``s`` at ``distance`` through the soft cap and the local window."""
        s = self.capped(s)
        if self.window is not None and distance >= self.window:
            s = torch.full_like(s, -math.inf)
        return s


def as_form(form: QKForm | float) -> QKForm:
    """``form``, or the paper's form with scale ``form``."""
    return form if isinstance(form, QKForm) else QKForm(attn_scale=float(form))


def distance_grid(max_distance: int) -> list[int]:
    """The distances a summary reads, up to ``max_distance``: each of 0 .. 31, then steps
    growing by a quarter (a rotary score's slow components change little between them)."""
    grid, d = [], 0
    while d <= max_distance:
        grid.append(d)
        d = d + 1 if d < 32 else d + max(1, d // 4)
    return grid


def attn_scores(
    d_q: Tensor,
    d_k: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    form: QKForm | float,
    max_distance: int = 0,
) -> Tensor:
    """``[n_q, n_k]`` attention logits between query directions ``d_q`` and key directions
    ``d_k`` (both ``[n, d_model]``): the largest over the distances ``distance_grid(
    max_distance)`` where the score depends on distance (see the module docstring)."""
    form = as_form(form)
    if form.plain:
        return (d_q @ W_Q) @ (d_k @ W_K).T / form.attn_scale
    q, k = form.project(d_q, W_Q, form.q_norm), form.project(d_k, W_K, form.k_norm)
    return summary_scores(q, k, form, max_distance)


def summary_scores(q: Tensor, k: Tensor, form: QKForm, max_distance: int) -> Tensor:
    """``attn_scores`` of projected queries ``q [n_q, d_head]`` and keys ``k [n_k, d_head]``
    (``QKForm.project``)."""
    if not form.positional:
        return form.scores(q, k)
    grid = distance_grid(max_distance)
    if form.window is not None:
        grid = [d for d in grid if d < form.window] or [0]
    best = form.scores(q, k, grid[0])
    for distance in grid[1:]:
        best = torch.maximum(best, form.scores(q, k, distance))
    return best


def pair_scores_by_distance(q: Tensor, k: Tensor, form: QKForm, n_distances: int) -> Tensor:
    """``[n, n_distances]``: the score of each pair of projected query ``q[j]`` and key
    ``k[j]`` (both ``[n, d_head]``, ``QKForm.project``) at every distance ``0 .. n_distances
    - 1``."""
    if form.rotary is not None:
        k = form.rotary.rotate(k, 0)
    out = []
    for distance in range(n_distances):
        qd = q if form.rotary is None else form.rotary.rotate(q, distance)
        out.append(form.finish((qd * k).sum(-1) / form.attn_scale, distance))
    return torch.stack(out, dim=1)


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
    # [n_terms, n_distances]: the score at each distance, where it depends on distance
    attn_at: Tensor | None = None

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
            *(
                None if x is None else f(x)
                for x in (self.importance, self.max_distance, self.min_distance, self.attn_at)
            ),
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
    form: QKForm | float,
    value_score: Tensor,
    n_keys: int = 100,
    queries_per_key: int = 100,
    n_distances: int = 1,
) -> Terms:
    """The paper's candidates for one output feature: the ``n_keys`` keys with the highest
    value-score, and for each the ``queries_per_key`` queries with the highest attn-score
    (for a positional head, the largest over distances below ``n_distances``, each term then
    carrying its score at every one of them, ``attn_at``).

    ``value_score`` is ``[d_sae_in]`` for this feature. Terms are ordered key by key.
    """
    form = as_form(form)
    keys = top_indices(value_score, n_keys)  # [K]
    if form.plain:
        attn = attn_scores(d, d[keys], W_Q, W_K, form)  # [d_sae_in, K]
    else:  # every query and key projected once, for the summary and each term's distances
        q_all, k_keys = form.project(d, W_Q, form.q_norm), form.project(d[keys], W_K, form.k_norm)
        attn = summary_scores(q_all, k_keys, form, n_distances - 1)
    queries = top_indices(attn, queries_per_key, dim=0)  # [Q, K]
    n_q = queries.shape[0]
    key_ids = keys.unsqueeze(0).expand(n_q, -1)  # [Q, K]
    pair_attn = attn.gather(0, queries)  # [Q, K]
    # key-major order: all queries of the best key first
    query, key = queries.T.reshape(-1), key_ids.T.reshape(-1)
    attn_at = None
    if form.positional:
        slot = torch.arange(len(keys), device=keys.device).repeat_interleave(n_q)  # term -> key
        attn_at = pair_scores_by_distance(q_all[query], k_keys[slot], form, n_distances)
    return Terms(
        query=query,
        key=key,
        attn=pair_attn.T.reshape(-1),
        value=value_score[key_ids].T.reshape(-1),
        attn_at=attn_at,
    )


def rank_by_weight(terms: Terms) -> Terms:
    """Terms sorted by ``attn-score * value-score``, highest first (stable)."""
    return terms.take(torch.sort(terms.weight, descending=True, stable=True).indices)


def rank_by_importance(terms: Terms) -> Terms:
    """Terms sorted by gradient importance, largest first (stable)."""
    if terms.importance is None:
        raise ValueError("terms carry no importance; run the gradient pass first")
    return terms.take(torch.sort(terms.importance, descending=True, stable=True).indices)
