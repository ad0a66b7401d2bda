"""A head's weights, its SAEs' views of it, and the activations they read.

The hook names are TransformerLens's: input SAEs read ``blocks.{l}.hook_resid_pre``, output SAEs
``blocks.{l}.attn.hook_z`` (per head via ``hook_head_index``, or layer-level, sliced per head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from rulecheck.core.scores import QKForm, Rotary, reading_directions


def resid_pre_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def ln_scale_hook(layer: int) -> str:
    return f"blocks.{layer}.ln1.hook_scale"


@dataclass(frozen=True)
class HeadWeights:
    """One head's QKV weights, each ``[d_model, d_head]``, and its LayerNorm."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor  # [d_head]
    b_K: Tensor
    b_V: Tensor
    form: QKForm  # what the head does to queries and keys besides their dot product
    normalization_type: str | None
    ln_w: Tensor | None  # [d_model], when LayerNorm's weight is not folded

    @property
    def attn_scale(self) -> float:
        return self.form.attn_scale


def qk_form(model: HookedTransformer, layer: int) -> QKForm:
    """The layer's ``QKForm``, read from its attention module: rotary tables, q/k norm
    weights, the soft cap and a local window, as its forward pass applies them."""
    attn = model.blocks[layer].attn
    cfg = model.cfg
    rotary = None
    if cfg.positional_embedding_type == "rotary":
        rotary = Rotary(
            cos=attn.rotary_cos.detach(),
            sin=attn.rotary_sin.detach(),
            adjacent_pairs=bool(getattr(cfg, "rotary_adjacent_pairs", False)),
        )
    q_norm = k_norm = None
    if getattr(cfg, "use_qk_norm", False):
        q_norm, k_norm = attn.q_norm.w.detach(), attn.k_norm.w.detach()
    cap = getattr(cfg, "attn_scores_soft_cap", -1.0)
    local = getattr(attn, "attn_type", "global") == "local"
    return QKForm(
        attn_scale=float(attn.attn_scale),
        rotary=rotary,
        q_norm=q_norm,
        k_norm=k_norm,
        norm_eps=float(cfg.eps),
        soft_cap=float(cap) if cap is not None and cap > 0 else 0.0,
        window=int(cfg.window_size) if local else None,
    )


def head_weights(model: HookedTransformer, layer: int, head: int) -> HeadWeights:
    """One head's weights as its forward pass reads them: a grouped-query head's keys and
    values are its group's (TransformerLens's ``W_K`` repeats them per query head)."""
    ln = model.blocks[layer].ln1
    ln_w = getattr(ln, "w", None)
    return HeadWeights(
        W_Q=model.W_Q[layer, head].detach(),
        W_K=model.W_K[layer, head].detach(),
        W_V=model.W_V[layer, head].detach(),
        b_Q=model.b_Q[layer, head].detach(),
        b_K=model.b_K[layer, head].detach(),
        b_V=model.b_V[layer, head].detach(),
        form=qk_form(model, layer),
        normalization_type=model.cfg.normalization_type,
        ln_w=None if ln_w is None else ln_w.detach(),
    )


def input_directions(sae_in: SAE, weights: HeadWeights, ln_scale: float) -> Tensor:
    """``[d_sae_in, d_model]`` decoder rows as this layer's attention reads them."""
    return reading_directions(
        sae_in.W_dec.detach().to(weights.W_Q.dtype),
        weights.normalization_type,
        ln_scale,
        weights.ln_w,
    )


def is_per_head(sae: SAE) -> bool:
    return sae.cfg.metadata.get("hook_head_index") is not None


def heads_read(saes: dict[int, SAE], n_heads: int) -> list[int]:
    """The heads whose ``hook_z`` the output SAEs of heads ``saes`` read: their own, or all
    of the layer's where one of them is layer-level."""
    if all(is_per_head(sae) for sae in saes.values()):
        return sorted(saes)
    return list(range(n_heads))


def head_encoder(sae_out: SAE, head: int, d_head: int) -> Tensor:
    """``[d_head, d_sae_out]`` encoder columns ``u_g`` restricted to ``head``."""
    W_enc = sae_out.W_enc.detach()
    if is_per_head(sae_out):
        return W_enc
    return W_enc[head * d_head : (head + 1) * d_head]


COLUMNWISE = ("standard", "jumprelu")  # each feature's activation reads only its own pre-activation


def encode_columns(sae: SAE, x: Tensor, columns: Sequence[int]) -> Tensor:
    """``sae.encode(x)[..., columns]``, ``[..., len(columns)]``, computing only those columns
    where the architecture allows it (a TopK SAE needs all of them)."""
    arch = sae.cfg.architecture()
    if arch not in COLUMNWISE:
        return sae.encode(x)[..., list(columns)]
    cols = torch.tensor(list(columns), dtype=torch.long, device=sae.W_enc.device)
    pre = sae.process_sae_in(x) @ sae.W_enc[:, cols] + sae.b_enc[cols]
    acts = sae.activation_fn(pre)
    if arch == "jumprelu":
        acts = acts * (pre > sae.threshold[cols]).to(acts.dtype)
    return acts


def head_input(sae_out: SAE, z: Tensor, head: int) -> Tensor:
    """What the output SAE reads of ``hook_z [batch, pos, n_heads, d_head]``: ``head``'s slice
    for a per-head SAE, else all heads (flattened unless the SAE reshapes ``hook_z`` itself)."""
    if is_per_head(sae_out):
        return z[:, :, head, :]
    if sae_out.cfg.reshape_activations == "hook_z":
        return z
    return z.flatten(-2)


def encode_head(sae_out: SAE, z: Tensor, head: int) -> Tensor:
    """Output-SAE activations ``[batch, pos, d_sae_out]`` from ``hook_z`` ``[batch, pos,
    n_heads, d_head]`` (sae_lens's own ``encode``, so its input processing is kept)."""
    return sae_out.encode(head_input(sae_out, z, head))


def by_end(t: Tensor, batch_size: int) -> Iterator[tuple[Tensor, int]]:
    """Batches of prompts that are read at positions ``t [n]``: the row indices of each batch,
    in order of ``t`` (stable), and the length its prompts are cut to, its last ``t`` + 1.
    Attention is causal, so nothing after ``t`` can change what is read at ``t``."""
    t = t.cpu().long()
    order = torch.argsort(t, stable=True)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, int(t[rows].max()) + 1


class _Captured(Exception):
    """Raised by ``run_to_layer``'s last hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def run_to_layer(
    model: HookedTransformer, tokens: Tensor, layer: int, names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Run ``tokens [batch, pos]`` until every requested hook of ``layer`` and below has fired
    (for ``hook_z``, the head outputs: not the attention's output projection, nor the MLP) and
    return their activations by name."""
    store: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        store[hook.name] = act
        if len(store) == len(names):
            raise _Captured

    with contextlib.suppress(_Captured):
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(name, save) for name in names],
            stop_at_layer=layer + 1,
        )
    return store


@torch.no_grad()
def run_to_heads(
    model: HookedTransformer, tokens: Tensor, layer: int, heads: Sequence[int]
) -> dict[str, Tensor]:
    """``run_to_layer`` for ``layer_hooks(model, layer)`` when only ``heads`` of the layer are
    read: where ``query_rows_supported``, the layers below run in full and the layer computes
    only those heads, TransformerLens's own operations on their weights (the other heads' z
    are zero); otherwise the layer's whole attention runs."""
    names = layer_hooks(model, layer)
    n_heads = model.cfg.n_heads
    if len(set(heads)) == n_heads or not query_rows_supported(model, layer):
        return run_to_layer(model, tokens, layer, names)
    from transformer_lens.utilities.attention import simple_attn_linear

    block = model.blocks[layer]
    attn = block.attn
    resid = model(tokens, stop_at_layer=layer)  # [batch, pos, d_model]
    store = {resid_pre_hook(layer): resid}

    def save(act: Tensor, hook) -> None:
        store[hook.name] = act

    scale = [(ln_scale_hook(layer), save)] if ln_scale_hook(layer) in names else []
    with model.hooks(fwd_hooks=scale):
        x = block.ln1(resid)
    h = torch.tensor(sorted(set(heads)), dtype=torch.long, device=x.device)
    form = qk_form(model, layer)
    if form.plain:  # GPT-2's attention, in TransformerLens's own operations
        q, k, v = (
            simple_attn_linear(x, W[h], b[h])  # [batch, pos, n, d_head]
            for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
        )
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / attn.attn_scale
        pattern = torch.softmax(attn.apply_causal_mask(scores), dim=-1)  # [batch, n, pos, pos]
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        z = (pattern.to(v.dtype) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    else:
        positions = torch.arange(x.shape[1], device=x.device)
        z = _attend(attn, form, h, x, x, positions.expand(x.shape[0], -1))  # [b, pos, n, d]
    full = z.new_zeros(*z.shape[:2], n_heads, z.shape[-1])
    full[:, :, h] = z
    store[z_hook(layer)] = full
    return store


_UNSUPPORTED_FLAGS = (
    "use_split_qkv_input",
    "use_attn_in",
    "load_in_4bit",
    "use_logn_attn",
    "use_attention_sinks",
    "use_dynamic_ntk_rope",
)


def query_rows_supported(model: HookedTransformer, layer: int) -> bool:
    """Whether ``z_at`` and ``run_to_heads`` reproduce ``blocks.{layer}.attn.hook_z``:
    attention reading ``ln1(resid_pre)`` (LayerNorm or RMSNorm), multi-head or grouped-query,
    learned, rotary or no positions, q/k norm, a soft cap, global or local causal attention,
    no hooks attached to the layer. Anything else (ALiBi, split inputs, sinks, ...) takes
    TransformerLens's own forward pass."""
    from transformer_lens.components import Attention, GroupedQueryAttention

    cfg = model.cfg
    block = model.blocks[layer]
    attn = block.attn
    hooked = any(
        hp._forward_hooks
        for name, hp in model.hook_dict.items()
        if name.startswith(f"blocks.{layer}.")
    )
    return (
        type(attn) in (Attention, GroupedQueryAttention)
        and cfg.positional_embedding_type in ("standard", "rotary")
        and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
        and not any(getattr(cfg, name, False) for name in _UNSUPPORTED_FLAGS)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in _post_norm_architectures()
        and not hooked
    )


def _post_norm_architectures() -> tuple[str, ...]:
    try:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
    except ImportError:
        return ()
    return tuple(POST_NORM_ARCHITECTURES)


@torch.no_grad()
def z_at(
    model: HookedTransformer, tokens: Tensor, t: Tensor, layer: int, heads: Sequence[int]
) -> Tensor:
    """``blocks.{layer}.attn.hook_z`` of ``heads`` at position ``t [batch]`` of each row of
    ``tokens [batch, pos]``: ``[batch, len(heads), d_head]``. Only the query row ``t`` of the
    chosen heads is computed (the keys and values of ``[0, t]``), not the layer's other heads
    or positions; the layers below run in full. Valid where ``query_rows_supported``."""
    block = model.blocks[layer]
    attn = block.attn
    x = block.ln1(model(tokens, stop_at_layer=layer))  # [batch, pos, d_model]
    h = torch.tensor(list(heads), dtype=torch.long, device=x.device)
    batch, pos, _ = x.shape
    t = t.to(x.device).long()
    rows = torch.arange(batch, device=x.device)
    form = qk_form(model, layer)
    if not form.plain:
        return _attend(attn, form, h, x[rows, t].unsqueeze(1), x, t.unsqueeze(1))[:, 0]
    q = _project(x[rows, t], attn.W_Q, attn.b_Q, h)  # [b, n, d]
    k = _project(x, attn.W_K, attn.b_K, h)  # [batch, pos, n, d_head]
    v = _project(x, attn.W_V, attn.b_V, h)
    scores = torch.einsum("bnd,bpnd->bnp", q, k) / attn.attn_scale  # [batch, n, pos]
    after_t = torch.arange(pos, device=x.device) > t.unsqueeze(1)  # [batch, pos]
    pattern = torch.softmax(scores.masked_fill(after_t.unsqueeze(1), float("-inf")), dim=-1)
    return torch.einsum("bnp,bpnd->bnd", pattern.to(v.dtype), v)


def _project(inp: Tensor, W: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """``[..., len(h), d_head]``: ``inp [..., d_model]`` through heads ``h`` of ``W [n_heads,
    d_model, d_head]`` and ``b [n_heads, d_head]``, one matmul for all of them."""
    n, d_model, d_head = len(h), W.shape[1], W.shape[2]
    w = W[h].permute(1, 0, 2).reshape(d_model, n * d_head)
    return (inp @ w + b[h].reshape(n * d_head)).unflatten(-1, (n, d_head))


def _attend(
    attn: torch.nn.Module, form: QKForm, h: Tensor, x_q: Tensor, x_kv: Tensor, t: Tensor
) -> Tensor:
    """``[batch, n_q, len(h), d_head]``: the z of heads ``h`` of the attention module
    ``attn`` (whose ``QKForm`` is ``form``) for queries read from ``x_q [batch, n_q,
    d_model]`` at positions ``t [batch, n_q]`` over the keys and values of ``x_kv [batch,
    pos, d_model]`` (the layer's normalised input), with TransformerLens's own weights (a
    grouped-query head's key/value group's) and each step its attention takes: q/k norm,
    rotary positions, the scale, the soft cap, causal and local masks."""
    q = form.normed(_project(x_q, attn.W_Q, attn.b_Q, h), form.q_norm)  # [batch, n_q, n, d]
    k = form.normed(_project(x_kv, attn.W_K, attn.b_K, h), form.k_norm)  # [batch, pos, n, d]
    v = _project(x_kv, attn.W_V, attn.b_V, h)
    key_pos = torch.arange(x_kv.shape[1], device=x_kv.device)
    if form.rotary is not None:
        q = form.rotary.rotate(q, t.unsqueeze(-1))
        k = form.rotary.rotate(k, key_pos.view(1, -1, 1))
    scores = form.capped(torch.einsum("bqnd,bpnd->bnqp", q, k) / form.attn_scale)
    distance = (t.unsqueeze(-1) - key_pos).unsqueeze(1)  # [batch, 1, n_q, pos]
    hidden = distance < 0
    if form.window is not None:
        hidden = hidden | (distance >= form.window)
    pattern = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    return torch.einsum("bnqp,bpnd->bqnd", pattern.to(v.dtype), v)


def ln_inverse_scale(model: HookedTransformer, store: dict[str, Tensor], layer: int) -> Tensor:
    """``[batch, pos]``: the factor LayerNorm multiplies the centred residual by (1 with no
    normalisation)."""
    resid = store[resid_pre_hook(layer)]
    scale = store.get(ln_scale_hook(layer))
    if scale is None:
        return torch.ones(resid.shape[:2], device=resid.device, dtype=resid.dtype)
    return 1.0 / scale[..., 0]


def layer_hooks(model: HookedTransformer, layer: int) -> tuple[str, ...]:
    names = [resid_pre_hook(layer), z_hook(layer)]
    if ln_scale_hook(layer) in model.hook_dict:
        names.append(ln_scale_hook(layer))
    return tuple(names)


@dataclass(frozen=True)
class Probe:
    """One output feature of one head: the true activation that counterfactual checks read."""

    model: HookedTransformer
    sae_out: SAE
    layer: int
    head: int
    feature: int
    batch_size: int = 256

    def _run(self, tokens: Tensor) -> Tensor:
        """``[batch, pos]`` activation of the feature for one batch ``tokens [batch, pos]``
        (only its encoder column is computed where the architecture allows)."""
        heads = heads_read({self.head: self.sae_out}, self.model.cfg.n_heads)
        store = run_to_heads(self.model, tokens.to(self.model.cfg.device), self.layer, heads)
        x = head_input(self.sae_out, store[z_hook(self.layer)], self.head)
        return encode_columns(self.sae_out, x, [self.feature])[..., 0].float().cpu()

    @torch.no_grad()
    def activations(self, tokens: Tensor) -> Tensor:
        """``[batch, pos]`` activation of the feature at every position of ``tokens``."""
        parts = [
            self._run(tokens[start : start + self.batch_size])
            for start in range(0, tokens.shape[0], self.batch_size)
        ]
        if not parts:
            return torch.zeros(tokens.shape, dtype=torch.float32)
        return torch.cat(parts)

    @torch.no_grad()
    def at(self, tokens: Tensor, t: Tensor) -> Tensor:
        """``[batch]`` activation of the feature at position ``t [batch]`` of ``tokens``, the
        prompts run in batches cut after their last ``t`` (``by_end``)."""
        t = t.cpu().long()
        out = torch.zeros(len(t), dtype=torch.float32)
        rows_only = query_rows_supported(self.model, self.layer)
        for rows, end in by_end(t, self.batch_size):
            batch = tokens[rows.to(tokens.device), :end].to(self.model.cfg.device)
            if rows_only:
                out[rows] = self._run_at(batch, t[rows])
            else:
                out[rows] = self._run(batch).gather(1, t[rows].unsqueeze(1)).squeeze(1)
        return out

    def _run_at(self, tokens: Tensor, t: Tensor) -> Tensor:
        """``[batch]`` activation of the feature at ``t [batch]``, from the head's query row at
        ``t`` alone (``z_at``): all heads of the layer for a layer-level output SAE."""
        per_head = is_per_head(self.sae_out)
        heads = [self.head] if per_head else range(self.model.cfg.n_heads)
        z = z_at(self.model, tokens, t, self.layer, heads)  # [batch, n, d_head]
        x = z[:, 0] if per_head else head_input(self.sae_out, z.unsqueeze(1), self.head)[:, 0]
        return encode_columns(self.sae_out, x, [self.feature])[..., 0].float().cpu()
