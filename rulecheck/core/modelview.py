"""What rulecheck reads of a model, for both of TransformerLens's model classes.

``HookedTransformer`` (deprecated in TransformerLens 3.9) and ``TransformerBridge`` (a Hugging
Face model run with TransformerLens's hook names, ``enable_compatibility_mode()`` for its
weight processing) share most of what rulecheck uses: ``cfg``'s sizes, the tokenizer,
``model(tokens, stop_at_layer=l)``, ``run_with_hooks``, ``hooks``, ``hook_dict`` and each
block's ``ln1``. What differs is read through :func:`view`, here and nowhere else:

- each query head's ``W_Q``/``W_K``/``W_V`` and biases (a bridge keeps one ``W_K``/``W_V`` per
  key/value head and no bias tensors where the model has no biases: its heads are expanded by
  the grouping its attention applies, its missing biases read as zeros);
- the ``QKForm`` of a layer (a bridge's scale, soft cap and window are its Hugging Face
  attention module's; its rotary tables are the ones its rotary embedding gives the layer);
- whether rulecheck can compute chosen heads' z itself (``rows_supported``) and how
  (``heads_z``), the layer's output weights, the position embedding, a loss run from a layer,
  and the config a fingerprint hashes (``attention`` computes the chosen heads' attention
  from the weights).

A bridge whose attention rulecheck cannot read faithfully (q/k norm, attention sinks, gated
or scaled queries, another attention module) is refused by name wherever its weights are read;
its z is then the bridge's own forward pass.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor

from rulecheck.core.attention import attend, attend_causal
from rulecheck.core.scores import QKForm, Rotary
from rulecheck.errors import InvalidSpec

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Model = Any  # a HookedTransformer or a TransformerBridge


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


@dataclass(frozen=True)
class AttnWeights:
    """One layer's attention weights per query head: ``W_Q``/``W_K``/``W_V`` ``[n_heads,
    d_model, d_head]`` (a grouped-query head's keys and values its group's), biases ``[n_heads,
    d_head]``, and the scale scores are divided by."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    b_Q: Tensor
    b_K: Tensor
    b_V: Tensor
    attn_scale: float


class ModelView:
    """What rulecheck reads of ``model`` that its class decides (see the module docstring)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def attention(self, layer: int) -> Any:
        """The layer's weights per query head (``AttnWeights``' fields)."""
        raise NotImplementedError

    def qk_form(self, layer: int) -> QKForm:
        raise NotImplementedError

    def norm(self, layer: int) -> tuple[str | None, Tensor | None]:
        """The normalisation the layer's attention reads its input through, and its weight
        ``[d_model]`` where it is not folded into the attention weights."""
        raise NotImplementedError

    def rows_supported(self, layer: int) -> bool:
        """Whether ``heads_z`` (and ``heads.z_at``) reproduce the layer's ``hook_z``."""
        raise NotImplementedError

    def heads_z(self, layer: int, x: Tensor, h: Tensor) -> Tensor:
        """``[batch, pos, len(h), d_head]``: the z of heads ``h`` from the layer's normalised
        input ``x [batch, pos, d_model]``. Valid where ``rows_supported``."""
        positions = torch.arange(x.shape[1], device=x.device)
        form = self.qk_form(layer)
        if form.soft_cap > 0 or form.window is not None:
            return attend(self.attention(layer), form, h, x, x, positions.expand(x.shape[0], -1))
        return attend_causal(self.attention(layer), form, h, x)

    def output_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        """``W_O [n_heads, d_head, d_model]`` and ``b_O [d_model]`` (zeros where none)."""
        attn = self.model.blocks[layer].attn
        W_O = attn.W_O.detach()
        b_O = attn.b_O
        return W_O, (W_O.new_zeros(W_O.shape[-1]) if b_O is None else b_O.detach())

    def position_embedding(self) -> Tensor | None:
        """``W_pos [n_ctx, d_model]`` of a model that adds learned positions to its tokens."""
        raise NotImplementedError

    def loss_with_hooks(
        self,
        tokens: Tensor,
        resid: Tensor,
        layer: int,
        fwd_hooks: Sequence[tuple[str, Callable]],
    ) -> Tensor:
        """``[batch, pos - 1]`` next-token loss of ``tokens`` with ``fwd_hooks`` on hooks of
        ``layer`` and above, ``resid`` being ``tokens``' ``hook_resid_pre`` of ``layer``."""
        raise NotImplementedError

    def config_extras(self) -> dict[str, Any]:
        """What a model fingerprint hashes besides its weights and its config's fields."""
        return {}

    def head_weights(self, layer: int, head: int) -> HeadWeights:
        attn = self.attention(layer)
        normalization_type, ln_w = self.norm(layer)
        return HeadWeights(
            W_Q=attn.W_Q[head].detach(),
            W_K=attn.W_K[head].detach(),
            W_V=attn.W_V[head].detach(),
            b_Q=attn.b_Q[head].detach(),
            b_K=attn.b_K[head].detach(),
            b_V=attn.b_V[head].detach(),
            form=self.qk_form(layer),
            normalization_type=normalization_type,
            ln_w=ln_w,
        )


# ---------------------------------------------------------------------------------------------
# HookedTransformer


_UNSUPPORTED_FLAGS = (
    "use_split_qkv_input",
    "use_attn_in",
    "load_in_4bit",
    "use_logn_attn",
    "use_attention_sinks",
    "use_dynamic_ntk_rope",
)


def _post_norm_architectures() -> tuple[str, ...]:
    try:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
    except ImportError:
        return ()
    return tuple(POST_NORM_ARCHITECTURES)


def _layer_hooked(model: Model, layer: int) -> bool:
    """Whether a forward hook is attached to one of the layer's hook points."""
    return any(
        hp._forward_hooks
        for name, hp in model.hook_dict.items()
        if name.startswith(f"blocks.{layer}.")
    )


class HookedView(ModelView):
    """A ``HookedTransformer``: everything read from its own modules and config."""

    model: HookedTransformer

    def attention(self, layer: int) -> Any:
        return self.model.blocks[layer].attn  # its W_K/W_V repeat a group's per query head

    def qk_form(self, layer: int) -> QKForm:
        """Rotary tables, q/k norm weights, the soft cap and a local window, read from the
        attention module as its forward pass applies them."""
        attn = self.model.blocks[layer].attn
        cfg = self.model.cfg
        rotary = None
        if cfg.positional_embedding_type == "rotary":
            rotary = Rotary(
                cos=attn.rotary_cos.detach(),
                sin=attn.rotary_sin.detach(),
                adjacent_pairs=bool(getattr(cfg, "rotary_adjacent_pairs", False)),
            )
        q_norm = k_norm = None
        if getattr(cfg, "use_qk_norm", False):
            assert attn.q_norm is not None and attn.k_norm is not None  # made with use_qk_norm
            q_norm, k_norm = attn.q_norm.w.detach(), attn.k_norm.w.detach()
        cap = getattr(cfg, "attn_scores_soft_cap", -1.0)
        window = None
        if getattr(attn, "attn_type", "global") == "local":
            assert cfg.window_size is not None  # the config refuses local attention without
            window = int(cfg.window_size)
        return QKForm(
            attn_scale=float(attn.attn_scale),
            rotary=rotary,
            q_norm=q_norm,
            k_norm=k_norm,
            norm_eps=float(cfg.eps),
            soft_cap=float(cap) if cap is not None and cap > 0 else 0.0,
            window=window,
        )

    def head_weights(self, layer: int, head: int) -> HeadWeights:
        model = self.model
        ln = model.blocks[layer].ln1
        ln_w = getattr(ln, "w", None)
        return HeadWeights(
            W_Q=model.W_Q[layer, head].detach(),
            W_K=model.W_K[layer, head].detach(),
            W_V=model.W_V[layer, head].detach(),
            b_Q=model.b_Q[layer, head].detach(),
            b_K=model.b_K[layer, head].detach(),
            b_V=model.b_V[layer, head].detach(),
            form=self.qk_form(layer),
            normalization_type=model.cfg.normalization_type,
            ln_w=None if ln_w is None else ln_w.detach(),
        )

    def norm(self, layer: int) -> tuple[str | None, Tensor | None]:
        ln_w = getattr(self.model.blocks[layer].ln1, "w", None)
        return self.model.cfg.normalization_type, None if ln_w is None else ln_w.detach()

    def rows_supported(self, layer: int) -> bool:
        """Attention reading ``ln1(resid_pre)`` (LayerNorm or RMSNorm), multi-head or
        grouped-query, learned, rotary or no positions, q/k norm, a soft cap, global or local
        causal attention, no hooks attached to the layer. Anything else (ALiBi, split inputs,
        sinks, ...) takes TransformerLens's own forward pass."""
        from transformer_lens.components import Attention, GroupedQueryAttention

        cfg = self.model.cfg
        attn = self.model.blocks[layer].attn
        return (
            type(attn) in (Attention, GroupedQueryAttention)
            and cfg.positional_embedding_type in ("standard", "rotary")
            and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
            and not any(getattr(cfg, name, False) for name in _UNSUPPORTED_FLAGS)
            and getattr(cfg, "clip_qkv", None) is None
            and cfg.original_architecture not in _post_norm_architectures()
            and not _layer_hooked(self.model, layer)
        )

    def heads_z(self, layer: int, x: Tensor, h: Tensor) -> Tensor:
        form = self.qk_form(layer)
        if not form.plain:
            return super().heads_z(layer, x, h)
        # GPT-2's attention, in TransformerLens's own operations
        from transformer_lens.utilities.attention import simple_attn_linear

        attn = self.model.blocks[layer].attn
        q, k, v = (
            simple_attn_linear(x, W[h], b[h])  # [batch, pos, n, d_head]
            for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
        )
        scores = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) / attn.attn_scale
        pattern = torch.softmax(attn.apply_causal_mask(scores), dim=-1)  # [batch, n, pos, pos]
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        return (pattern.to(v.dtype) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)

    def output_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        attn = self.model.blocks[layer].attn
        return attn.W_O.detach(), attn.b_O.detach()

    def position_embedding(self) -> Tensor | None:
        if self.model.cfg.positional_embedding_type != "standard":
            return None
        return self.model.W_pos.detach()

    def loss_with_hooks(
        self,
        tokens: Tensor,
        resid: Tensor,
        layer: int,
        fwd_hooks: Sequence[tuple[str, Callable]],
    ) -> Tensor:
        return self.model.run_with_hooks(
            resid,
            start_at_layer=layer,
            tokens=tokens,
            return_type="loss",
            loss_per_token=True,
            fwd_hooks=list(fwd_hooks),
        )


# ---------------------------------------------------------------------------------------------
# TransformerBridge


def _bridge_classes() -> dict[str, type]:
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return {"position": PositionEmbeddingsAttentionBridge, "joint": JointQKVAttentionBridge}


class BridgeView(ModelView):
    """A ``TransformerBridge`` in compatibility mode: each layer read as its attention bridge's
    forward pass computes it. Two attention bridges are read: the one that reimplements a
    Hugging Face attention with rotary positions passed in (Llama, Qwen2, Mistral, Gemma-2:
    ``PositionEmbeddingsAttentionBridge``) and the one that splits a fused QKV projection
    (GPT-2: ``JointQKVAttentionBridge``), each only as far as rulecheck computes what it
    computes; anything else is refused by ``qk_form`` (and its z is the bridge's own)."""

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self._rotary: dict[Any, Rotary] = {}

    # -- what the layer's attention module is

    def _kind(self, layer: int) -> str:
        """``position`` or ``joint``; ``InvalidSpec`` naming what rulecheck cannot read."""
        attn = self.model.blocks[layer].attn
        kinds = {cls: kind for kind, cls in _bridge_classes().items()}
        kind = kinds.get(type(attn))
        if kind is None:
            self._refuse(layer, f"its attention is a {type(attn).__name__}")
        why = self._unread(layer, kind)
        if why:
            self._refuse(layer, why)
        return kind

    def _unread(self, layer: int, kind: str) -> str | None:
        """What of the layer's attention rulecheck's ``QKForm`` does not hold, if anything."""
        attn = self.model.blocks[layer].attn
        hf = attn.original_component
        cfg = self.model.cfg
        if kind == "joint":
            return None
        hf_cfg = getattr(hf, "config", None)
        rope = getattr(hf_cfg, "rope_parameters", None)
        checks = (
            ("q/k norm", "q_norm" in attn.submodules or "k_norm" in attn.submodules),
            ("gated queries", bool(getattr(cfg, "gated_q_proj", False))),
            ("an output gate", attn._modules.get("gate") is not None),
            ("a key multiplier", getattr(hf, "key_multiplier", None) is not None),
            ("clipped q/k/v", getattr(hf_cfg, "clip_qkv", None) is not None),
            ("attention sinks", getattr(hf, "sinks", None) is not None),
            (
                "a position-dependent query scale",
                isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None,
            ),
        )
        found = [what for what, present in checks if present]
        return f"its attention has {found[0]}" if found else None

    def _refuse(self, layer: int, why: str) -> NoReturn:
        arch = getattr(self.model.cfg, "architecture", None) or type(self.model).__name__
        raise InvalidSpec(
            f"rulecheck cannot read layer {layer}'s heads of this {arch} TransformerBridge: {why}",
            field="model",
            fix="load it as a HookedTransformer (a Hugging Face directory without 'bridge:')",
        )

    # -- weights

    def _n_rep(self, layer: int, kind: str, n_kv: int) -> int:
        """How many query heads share a key/value head, as the layer's attention repeats
        them (``repeat_kv``/``repeat_interleave``: query head ``h`` reads group ``h //
        n_rep``)."""
        n_heads = self.model.cfg.n_heads
        if kind == "position":
            n_rep = int(
                getattr(self.model.blocks[layer].attn.original_component, "num_key_value_groups", 1)
            )
        else:
            n_rep = n_heads // n_kv
        if n_kv * n_rep != n_heads:
            self._refuse(layer, f"{n_kv} key/value heads do not make {n_heads} query heads")
        return n_rep

    def attention(self, layer: int) -> AttnWeights:
        kind = self._kind(layer)
        attn = self.model.blocks[layer].attn
        W_Q, W_K, W_V = (attn.W_Q.detach(), attn.W_K.detach(), attn.W_V.detach())
        n_rep = self._n_rep(layer, kind, W_K.shape[0])

        def per_query_head(t: Tensor) -> Tensor:
            return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=0)

        def bias(b: Tensor | None, n: int) -> Tensor:
            if b is None:
                return W_Q.new_zeros(n, W_Q.shape[-1])
            return b.detach()

        return AttnWeights(
            W_Q=W_Q,
            W_K=per_query_head(W_K),
            W_V=per_query_head(W_V),
            b_Q=bias(attn.b_Q, W_Q.shape[0]),
            b_K=per_query_head(bias(attn.b_K, W_K.shape[0])),
            b_V=per_query_head(bias(attn.b_V, W_V.shape[0])),
            attn_scale=self._attn_scale(layer, kind),
        )

    def _attn_scale(self, layer: int, kind: str) -> float:
        attn = self.model.blocks[layer].attn
        d_head = int(self.model.cfg.d_head)
        if kind == "position":
            scaling = float(getattr(attn.original_component, "scaling", d_head**-0.5))
        else:  # JointQKVAttentionBridge._reconstruct_attention
            scaling = d_head**-0.5
            if getattr(attn.config, "scale_attn_by_inverse_layer_idx", False):
                scaling /= float(attn._layer_idx + 1)
        return 1.0 / scaling

    def norm(self, layer: int) -> tuple[str | None, Tensor | None]:
        """The bridge's normalisation type (``LN`` or ``RMS``: its ``ln1`` centres and scales
        in either case, folded or not) and the weight of ``ln1`` unless it is folded (ones)."""
        ln = self.model.blocks[layer].ln1
        weight = getattr(ln, "weight", None)
        if weight is None:
            return self.model.cfg.normalization_type, None
        weight = weight.detach()
        if getattr(self.model.cfg, "rmsnorm_uses_offset", False):
            weight = 1.0 + weight
        if torch.equal(weight, torch.ones_like(weight)):
            weight = None
        return self.model.cfg.normalization_type, weight

    # -- the form

    def qk_form(self, layer: int) -> QKForm:
        kind = self._kind(layer)
        hf = self.model.blocks[layer].attn.original_component
        cap = getattr(hf, "attn_logit_softcapping", None) if kind == "position" else None
        window = getattr(hf, "sliding_window", None) if kind == "position" else None
        return QKForm(
            attn_scale=self._attn_scale(layer, kind),
            rotary=self._rotary_of(layer) if kind == "position" else None,
            norm_eps=float(getattr(self.model.cfg, "eps", 1e-5)),
            soft_cap=float(cap) if cap is not None and cap > 0 else 0.0,
            window=int(window) if window is not None else None,
        )

    def _rotary_module(self) -> Any:
        rotary = getattr(self.model, "rotary_emb", None)
        return getattr(rotary, "original_component", None)

    def _rotary_of(self, layer: int) -> Rotary | None:
        """The rotary tables the layer's attention is given: the bridge's rotary embedding at
        positions ``0 .. n_ctx - 1`` (for the layer's type where it has several), in the
        layout its attention applies them (partial rotary: the first ``dim`` dimensions)."""
        module = self._rotary_module()
        if module is None:
            if getattr(self.model.cfg, "positional_embedding_type", None) == "rotary":
                self._refuse(layer, "its rotary embedding is not the model's rotary_emb")
            return None
        kwargs = {}
        if "layer_type" in inspect.signature(module.forward).parameters:
            types = getattr(
                getattr(self.model.blocks[layer].attn.original_component, "config", None),
                "layer_types",
                None,
            )
            kwargs["layer_type"] = types[layer] if types else None
        key = (kwargs.get("layer_type"), self.model.blocks[layer].attn.W_Q.device)
        if key not in self._rotary:
            self._rotary[key] = self._tables(module, layer, kwargs)
        return self._rotary[key]

    def _tables(self, module: Any, layer: int, kwargs: dict[str, Any]) -> Rotary:
        from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

        cfg = self.model.cfg
        W_Q = self.model.blocks[layer].attn.W_Q
        positions = torch.arange(int(cfg.n_ctx), device=W_Q.device).unsqueeze(0)
        with torch.no_grad():
            cos, sin = module(W_Q.new_zeros(1, 1, W_Q.shape[-1]), positions, **kwargs)
        cos, sin = cos[0].detach(), sin[0].detach()  # [n_ctx, dim]
        d_head = int(cfg.d_head)
        adjacent = bool(getattr(cfg, "rotary_adjacent_pairs", False))
        if cos.shape[-1] * 2 == d_head and get_rotary_pct_from_config(cfg) == 1.0:
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        if adjacent:  # the first half of each table, each angle for a pair (2i, 2i + 1)
            half = cos.shape[-1] // 2
            cos = cos[:, :half].repeat_interleave(2, dim=-1)
            sin = sin[:, :half].repeat_interleave(2, dim=-1)
        return Rotary(cos=cos, sin=sin, adjacent_pairs=adjacent)

    # -- running

    def rows_supported(self, layer: int) -> bool:
        """A layer whose form ``qk_form`` reads, causal, pre-norm (``ln1`` then attention),
        its inputs not split per head, no hooks attached to it."""
        try:
            self._kind(layer)
        except InvalidSpec:
            return False
        cfg = self.model.cfg
        attn = self.model.blocks[layer].attn
        return (
            getattr(attn, "is_causal", True)
            and not getattr(attn, "is_cross_attention", False)
            and not getattr(cfg, "use_split_qkv_input", False)
            and not getattr(cfg, "use_attn_in", False)
            and getattr(cfg, "architecture", None) not in _post_norm_architectures()
            and not _layer_hooked(self.model, layer)
        )

    def position_embedding(self) -> Tensor | None:
        if self.model.cfg.positional_embedding_type != "standard":
            return None
        return self.model.pos_embed.W_pos.detach()

    def loss_with_hooks(
        self,
        tokens: Tensor,
        resid: Tensor,
        layer: int,
        fwd_hooks: Sequence[tuple[str, Callable]],
    ) -> Tensor:
        # a bridge cannot start at a layer: the layers below run again (same numbers)
        return self.model.run_with_hooks(
            tokens, return_type="loss", loss_per_token=True, fwd_hooks=list(fwd_hooks)
        )

    def config_extras(self) -> dict[str, Any]:
        return {"architecture": self.model.cfg.architecture}


_VIEWS: weakref.WeakKeyDictionary[Any, ModelView] = weakref.WeakKeyDictionary()


def view(model: Model) -> ModelView:
    """The view of ``model`` (one per model: a bridge's rotary tables are computed once)."""
    found = _VIEWS.get(model)
    if found is None:
        found = _new_view(model)
        _VIEWS[model] = found
    return found


def _new_view(model: Model) -> ModelView:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, HookedTransformer):
        return HookedView(model)
    if isinstance(model, TransformerBridge):
        return BridgeView(model)
    raise TypeError(
        f"rulecheck reads a HookedTransformer or a TransformerBridge, not {type(model).__name__}"
    )


def is_bridge(model: Model) -> bool:
    return isinstance(view(model), BridgeView)
