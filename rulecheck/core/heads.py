"""A head's weights, its SAEs' views of it, and the activations they read.

The hook names are TransformerLens's: input SAEs read ``blocks.{l}.hook_resid_pre``, output SAEs
``blocks.{l}.attn.hook_z`` (per head via ``hook_head_index``, or layer-level, sliced per head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck.core.attention import attend, project
from rulecheck.core.modelview import HeadWeights, Model, view
from rulecheck.core.scores import QKForm, reading_directions


def resid_pre_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def ln_scale_hook(layer: int) -> str:
    return f"blocks.{layer}.ln1.hook_scale"


def qk_form(model: Model, layer: int) -> QKForm:
    """The layer's ``QKForm``, read from its attention module: rotary tables, q/k norm
    weights, the soft cap and a local window, as its forward pass applies them."""
    return view(model).qk_form(layer)


def head_weights(model: Model, layer: int, head: int) -> HeadWeights:
    """One head's weights as its forward pass reads them: a grouped-query head's keys and
    values are its group's (TransformerLens's ``W_K`` repeats them per query head; a
    TransformerBridge's are expanded by the grouping its attention applies)."""
    return view(model).head_weights(layer, head)


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


def head_input(sae_out: SAE, z: Tensor, head: int | None) -> Tensor:
    """What the output SAE reads of ``hook_z [batch, pos, n_heads, d_head]``: ``head``'s slice
    for a per-head SAE, else all heads (flattened unless the SAE reshapes ``hook_z`` itself;
    ``head`` None is an SAE of every head's z)."""
    if is_per_head(sae_out):
        if head is None:
            raise ValueError("a per-head output SAE reads one head: give its index")
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
    model: Model, tokens: Tensor, layer: int, names: tuple[str, ...]
) -> dict[str, Tensor]:
    """Run ``tokens [batch, pos]`` until every requested hook of ``layer`` and below has fired
    (for ``hook_z``, the head outputs: not the attention's output projection, nor the MLP) and
    return their activations by the names asked for (a TransformerBridge's hook may fire under
    another name it is an alias of: ``blocks.{l}.hook_resid_pre`` is ``blocks.{l}.hook_in``)."""
    store: dict[str, Tensor] = {}

    def saver(name: str) -> Callable[[Tensor, object], None]:
        def save(act: Tensor, hook: object) -> None:
            store[name] = act
            if len(store) == len(names):
                raise _Captured

        return save

    with contextlib.suppress(_Captured):
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(name, saver(name)) for name in names],
            stop_at_layer=layer + 1,
        )
    return store


@torch.no_grad()
def run_to_heads(
    model: Model, tokens: Tensor, layer: int, heads: Sequence[int]
) -> dict[str, Tensor]:
    """``run_to_layer`` for ``layer_hooks(model, layer)`` when only ``heads`` of the layer are
    read: where ``query_rows_supported``, the layers below run in full and the layer computes
    only those heads, the model's own operations on their weights (``ModelView.heads_z``; the
    other heads' z are zero); otherwise the layer's whole attention runs."""
    names = layer_hooks(model, layer)
    n_heads = model.cfg.n_heads
    if len(set(heads)) == n_heads or not query_rows_supported(model, layer):
        return run_to_layer(model, tokens, layer, names)
    block = model.blocks[layer]
    resid = model(tokens, stop_at_layer=layer)  # [batch, pos, d_model]
    store = {resid_pre_hook(layer): resid}

    def save(act: Tensor, hook: object) -> None:
        store[ln_scale_hook(layer)] = act

    scale = [(ln_scale_hook(layer), save)] if ln_scale_hook(layer) in names else []
    with model.hooks(fwd_hooks=scale):
        x = block.ln1(resid)
    h = torch.tensor(sorted(set(heads)), dtype=torch.long, device=x.device)
    z = view(model).heads_z(layer, x, h)  # [batch, pos, n, d_head]
    full = z.new_zeros(*z.shape[:2], n_heads, z.shape[-1])
    full[:, :, h] = z
    store[z_hook(layer)] = full
    return store


def query_rows_supported(model: Model, layer: int) -> bool:
    """Whether ``z_at`` and ``run_to_heads`` reproduce ``blocks.{layer}.attn.hook_z``:
    attention reading ``ln1(resid_pre)`` (LayerNorm or RMSNorm), multi-head or grouped-query,
    learned, rotary or no positions, q/k norm (a HookedTransformer's), a soft cap, global or
    local causal attention, no hooks attached to the layer. Anything else (ALiBi, split inputs,
    sinks, ...) takes the model's own forward pass (``ModelView.rows_supported``)."""
    return view(model).rows_supported(layer)


@torch.no_grad()
def z_at(model: Model, tokens: Tensor, t: Tensor, layer: int, heads: Sequence[int]) -> Tensor:
    """``blocks.{layer}.attn.hook_z`` of ``heads`` at position ``t [batch]`` of each row of
    ``tokens [batch, pos]``: ``[batch, len(heads), d_head]``. Only the query row ``t`` of the
    chosen heads is computed (the keys and values of ``[0, t]``), not the layer's other heads
    or positions; the layers below run in full. Valid where ``query_rows_supported``."""
    block = model.blocks[layer]
    mv = view(model)
    attn = mv.attention(layer)
    x = block.ln1(model(tokens, stop_at_layer=layer))  # [batch, pos, d_model]
    h = torch.tensor(list(heads), dtype=torch.long, device=x.device)
    batch, pos, _ = x.shape
    t = t.to(x.device).long()
    rows = torch.arange(batch, device=x.device)
    form = mv.qk_form(layer)
    if not form.plain:
        return attend(attn, form, h, x[rows, t].unsqueeze(1), x, t.unsqueeze(1))[:, 0]
    q = project(x[rows, t], attn.W_Q, attn.b_Q, h)  # [b, n, d]
    k = project(x, attn.W_K, attn.b_K, h)  # [batch, pos, n, d_head]
    v = project(x, attn.W_V, attn.b_V, h)
    scores = torch.einsum("bnd,bpnd->bnp", q, k) / attn.attn_scale  # [batch, n, pos]
    after_t = torch.arange(pos, device=x.device) > t.unsqueeze(1)  # [batch, pos]
    pattern = torch.softmax(scores.masked_fill(after_t.unsqueeze(1), float("-inf")), dim=-1)
    return torch.einsum("bnp,bpnd->bnd", pattern.to(v.dtype), v)


def ln_inverse_scale(model: Model, store: dict[str, Tensor], layer: int) -> Tensor:
    """``[batch, pos]``: the factor LayerNorm multiplies the centred residual by (1 with no
    normalisation)."""
    resid = store[resid_pre_hook(layer)]
    scale = store.get(ln_scale_hook(layer))
    if scale is None:
        return torch.ones(resid.shape[:2], device=resid.device, dtype=resid.dtype)
    return 1.0 / scale[..., 0]


def layer_hooks(model: Model, layer: int) -> tuple[str, ...]:
    names = [resid_pre_hook(layer), z_hook(layer)]
    if ln_scale_hook(layer) in model.hook_dict:
        names.append(ln_scale_hook(layer))
    return tuple(names)


@dataclass(frozen=True)
class Probe:
    """One output feature of one head: the true activation that counterfactual checks read."""

    model: Model
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
