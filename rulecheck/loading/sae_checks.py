"""An SAE against the model it is used on: ``check_sae`` checks that it reads the hook it
is used at, with the sizes the model gives; ``head_view`` reads an output SAE on
``blocks.{layer}.hook_attn_out`` as one head's SAE on ``hook_z``."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch

from rulecheck.errors import InvalidSpec

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge


def check_sae(
    sae: SAE,
    model: HookedTransformer | TransformerBridge,
    *,
    layer: int,
    head: int | None,
    kind: Literal["in", "out"],
    spec: str,
) -> None:
    """Check that ``sae`` reads the hook it is used at: resid_pre (``in``) or attn.hook_z (``out``).

    ``out`` SAEs are per-head (``hook_head_index`` set, ``d_in == d_head``) or layer-level
    (``d_in == n_heads * d_head``).
    """
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise InvalidSpec(
            f"layer {layer} is out of range: the model has n_layers={cfg.n_layers}"
            f" (expected 0..{cfg.n_layers - 1})",
            file=spec,
            field="layer",
            fix=f"pick a layer in 0..{cfg.n_layers - 1}",
        )
    if kind == "in":
        _check_hook(sae, *input_hooks(model, layer), spec=spec)
        _check_d_in(sae, cfg.d_model, "d_model", spec=spec)
        if sae.cfg.metadata.hook_head_index is not None:
            raise InvalidSpec(
                f"an input SAE reads the whole residual stream, found hook_head_index="
                f"{sae.cfg.metadata.hook_head_index}",
                file=spec,
                field="hook_head_index",
                fix="use an SAE trained on hook_resid_pre",
            )
        return
    if kind != "out":
        raise InvalidSpec(
            f"unknown SAE kind {kind!r}", file=spec, field="kind", fix='use "in" or "out"'
        )
    if sae.cfg.metadata.hook_name == attn_out_hook(layer):  # read per head: ``head_view``
        _check_d_in(sae, cfg.d_model, "d_model, the attention output", spec=spec)
        if head is not None:
            _check_head(head, cfg.n_heads, spec=spec, field="head")
        return
    _check_hook(sae, f"blocks.{layer}.attn.hook_z", attn_out_hook(layer), spec=spec)
    sae_head = sae.cfg.metadata.hook_head_index
    if sae_head is not None:
        if head is not None and head != sae_head:
            raise InvalidSpec(
                f"expected head {head}, the SAE reads hook_head_index={sae_head}",
                file=spec,
                field="head",
                fix=f"load the SAE of head {head}",
            )
        _check_head(sae_head, cfg.n_heads, spec=spec, field="hook_head_index")
        _check_d_in(sae, cfg.d_head, "d_head, one head", spec=spec)
        return
    if head is not None:
        _check_head(head, cfg.n_heads, spec=spec, field="head")
    if sae.cfg.d_in == cfg.d_head and cfg.n_heads > 1:
        raise InvalidSpec(
            f"d_in={sae.cfg.d_in} is one head's d_head, but the SAE has no hook_head_index",
            file=spec,
            field="hook_head_index",
            fix="set metadata.hook_head_index to the head it was trained on",
        )
    _check_d_in(sae, cfg.n_heads * cfg.d_head, "n_heads*d_head, all heads", spec=spec)


def attn_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


LINEAR_ENCODERS = ("standard", "jumprelu", "topk")  # act(x @ W_enc + b_enc), nothing else


def head_view(
    sae: SAE, model: HookedTransformer | TransformerBridge, layer: int, head: int, spec: str
) -> SAE:
    """An output SAE on ``blocks.{layer}.hook_attn_out`` as one head reads it: a per-head SAE
    on ``hook_z`` whose features are the original's on ``z_h W_O[h] + b_O``, the head's write
    and the output bias alone (the other heads' writes, which add to the same features, are
    left out). Exact for that input: ``W_enc' = W_O[h] W_enc``, ``b_enc' = (b_O - b_dec)
    W_enc + b_enc``; the decoder maps back through the pseudo-inverse of ``W_O[h]``."""
    arch = sae.cfg.architecture()
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if arch not in LINEAR_ENCODERS or norm not in ("none", None):
        raise InvalidSpec(
            f"an output SAE on hook_attn_out is read per head through W_O, which needs a linear "
            f"encoder without input normalisation; found architecture {arch!r}, "
            f"normalize_activations {norm!r}",
            file=spec,
            field="architecture",
            fix="fold the normalisation into the weights, or use a hook_z SAE",
        )
    from rulecheck.core.modelview import view

    W_O, b_O = view(model).output_weights(layer)  # b_O: zeros where the model has none
    W_O = W_O[head].to(sae.W_enc.dtype)  # [d_head, d_model]
    b_O = b_O.to(sae.W_enc.dtype)
    per_head = copy.deepcopy(sae)
    b_in = b_O - sae.b_dec.detach() * float(sae.cfg.apply_b_dec_to_input)
    with torch.no_grad():
        per_head.W_enc = torch.nn.Parameter(W_O @ sae.W_enc.detach())
        per_head.b_enc = torch.nn.Parameter(b_in @ sae.W_enc.detach() + sae.b_enc.detach())
        per_head.W_dec = torch.nn.Parameter(sae.W_dec.detach() @ torch.linalg.pinv(W_O))
        per_head.b_dec = torch.nn.Parameter(torch.zeros(W_O.shape[0], dtype=W_O.dtype))
    per_head.cfg.d_in = W_O.shape[0]
    per_head.cfg.metadata.hook_name = f"blocks.{layer}.attn.hook_z"
    per_head.cfg.metadata.hook_head_index = head
    return per_head


def input_hooks(model: HookedTransformer | TransformerBridge, layer: int) -> tuple[str, ...]:
    """The hooks that hold the tensor an input SAE of ``layer`` reads, ``hook_resid_pre``
    first: the previous block's ``hook_resid_post`` (Gemma Scope's residual SAEs), and at
    layer 0 ``hook_embed`` where no position embedding is added to it (rotary, ALiBi)."""
    names = [f"blocks.{layer}.hook_resid_pre"]
    if layer > 0:
        names.append(f"blocks.{layer - 1}.hook_resid_post")
    elif model.cfg.positional_embedding_type in ("rotary", "alibi"):
        names.append("hook_embed")
    return tuple(names)


def _check_hook(sae: SAE, expected: str, *same: str, spec: str) -> None:
    """``sae`` reads ``expected`` or one of the other hooks accepted there (``same``: one
    holding the same tensor, or ``hook_attn_out`` for an output SAE), all named when not."""
    found = sae.cfg.metadata.hook_name
    if found is not None and found not in (expected, *same):
        also = "".join(f" or {name!r}" for name in same)
        raise InvalidSpec(
            f"expected {expected!r}{also}, found {found!r}",
            file=spec,
            field="hook_name",
            fix=f"load the SAE trained on {expected}",
        )


def _check_d_in(sae: SAE, expected: int, meaning: str, *, spec: str) -> None:
    if sae.cfg.d_in != expected:
        raise InvalidSpec(
            f"expected {expected} ({meaning}), found {sae.cfg.d_in}",
            file=spec,
            field="d_in",
            fix="load the SAE trained on this model and hook",
        )


def _check_head(head: int, n_heads: int, *, spec: str, field: str) -> None:
    if not 0 <= head < n_heads:
        raise InvalidSpec(
            f"head {head} is out of range: the model has n_heads={n_heads}"
            f" (expected 0..{n_heads - 1})",
            file=spec,
            field=field,
            fix=f"pick a head in 0..{n_heads - 1}",
        )
