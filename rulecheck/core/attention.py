"""A layer's attention computed from its weights, for chosen heads: ``project`` (inputs
through the heads' Q, K or V weights), ``attend`` (z of queries at given positions) and
``attend_causal`` (z at every position, the softmax fused).

The weights are ``modelview.AttnWeights`` or a TransformerLens attention module; the steps
besides the dot product (q/k norm, rotary positions, scale, soft cap, window) are the layer's
``QKForm``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rulecheck.core.scores import QKForm


def project(inp: Tensor, W: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """``[..., len(h), d_head]``: ``inp [..., d_model]`` through heads ``h`` of ``W [n_heads,
    d_model, d_head]`` and ``b [n_heads, d_head]``, one matmul for all of them."""
    n, d_model, d_head = len(h), W.shape[1], W.shape[2]
    w = W[h].permute(1, 0, 2).reshape(d_model, n * d_head)
    return (inp @ w + b[h].reshape(n * d_head)).unflatten(-1, (n, d_head))


def _qkv(
    attn: Any, form: QKForm, h: Tensor, x_q: Tensor, x_kv: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The queries of ``x_q`` at positions ``t [batch, n_q]`` and the keys and values of
    ``x_kv`` (each ``[batch, n, len(h), d_head]``), q/k norm and rotary positions applied."""
    q = form.normed(project(x_q, attn.W_Q, attn.b_Q, h), form.q_norm)  # [batch, n_q, n, d]
    k = form.normed(project(x_kv, attn.W_K, attn.b_K, h), form.k_norm)  # [batch, pos, n, d]
    v = project(x_kv, attn.W_V, attn.b_V, h)
    if form.rotary is not None:
        key_pos = torch.arange(x_kv.shape[1], device=x_kv.device)
        q = form.rotary.rotate(q, t.unsqueeze(-1))
        k = form.rotary.rotate(k, key_pos.view(1, -1, 1))
    return q, k, v


def attend(attn: Any, form: QKForm, h: Tensor, x_q: Tensor, x_kv: Tensor, t: Tensor) -> Tensor:
    """``[batch, n_q, len(h), d_head]``: the z of heads ``h`` of a layer whose weights are
    ``attn`` (``AttnWeights``, or a TransformerLens attention module: its ``W_K`` is already
    per query head) and whose ``QKForm`` is ``form``, for queries read from ``x_q [batch, n_q,
    d_model]`` at positions ``t [batch, n_q]`` over the keys and values of ``x_kv [batch, pos,
    d_model]`` (the layer's normalised input), with each step its attention takes: q/k norm,
    rotary positions, the scale, the soft cap, causal and local masks."""
    q, k, v = _qkv(attn, form, h, x_q, x_kv, t)
    key_pos = torch.arange(x_kv.shape[1], device=x_kv.device)
    scores = form.capped(torch.einsum("bqnd,bpnd->bnqp", q, k) / form.attn_scale)
    distance = (t.unsqueeze(-1) - key_pos).unsqueeze(1)  # [batch, 1, n_q, pos]
    hidden = distance < 0
    if form.window is not None:
        hidden = hidden | (distance >= form.window)
    pattern = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    return torch.einsum("bnqp,bpnd->bqnd", pattern.to(v.dtype), v)


def attend_causal(attn: Any, form: QKForm, h: Tensor, x: Tensor) -> Tensor:
    """``attend`` for every position of ``x [batch, pos, d_model]`` where the form has no soft
    cap and no window: the same steps, the causal softmax fused by
    ``scaled_dot_product_attention``."""
    positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    q, k, v = _qkv(attn, form, h, x, x, positions)
    q, k, v = (y.transpose(1, 2).to(v.dtype) for y in (q, k, v))  # [batch, n, pos, d]
    z = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=1 / form.attn_scale
    )
    return z.transpose(1, 2)
