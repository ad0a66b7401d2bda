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

from rulecheck.core.scores import reading_directions


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
    attn_scale: float
    normalization_type: str | None
    ln_w: Tensor | None  # [d_model], when LayerNorm's weight is not folded


def head_weights(model: HookedTransformer, layer: int, head: int) -> HeadWeights:
    attn = model.blocks[layer].attn
    ln = model.blocks[layer].ln1
    ln_w = getattr(ln, "w", None)
    return HeadWeights(
        W_Q=model.W_Q[layer, head].detach(),
        W_K=model.W_K[layer, head].detach(),
        W_V=model.W_V[layer, head].detach(),
        b_Q=model.b_Q[layer, head].detach(),
        b_K=model.b_K[layer, head].detach(),
        b_V=model.b_V[layer, head].detach(),
        attn_scale=float(attn.attn_scale),
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
        name = z_hook(self.layer)
        z = run_to_layer(self.model, tokens.to(self.model.cfg.device), self.layer, (name,))[name]
        x = head_input(self.sae_out, z, self.head)
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
        for rows, end in by_end(t, self.batch_size):
            acts = self._run(tokens[rows.to(tokens.device), :end])
            out[rows] = acts.gather(1, t[rows].unsqueeze(1)).squeeze(1)
        return out
