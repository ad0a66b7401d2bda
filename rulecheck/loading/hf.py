"""Hugging Face model directories: ``load_hf_directory`` converts one offline with
TransformerLens (config, weights, processing as ``HookedTransformer.from_pretrained``), and
builds the config itself for the families TransformerLens knows only by hub name (Gemma-2).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import (
    MODEL_CONFIG,
    MODEL_DEPRECATED,
    json_text,
    one_line,
    read_json_object,
    without_warning,
)
from rulecheck.loading.tokenizer import attach_tokenizer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Hugging Face config attributes that TransformerLens still reads under an older name.
HF_LEGACY_KEYS = {"gpt2": {"n_ctx": "n_positions"}}
# Hugging Face model types whose HookedTransformerConfig rulecheck builds (TransformerLens
# knows them by hub name only), and the architecture its weight conversion dispatches on.
HF_FAMILIES = {"gemma2": "Gemma2ForCausalLM"}


@contextlib.contextmanager
def _hf_config_view(directory: Path) -> Iterator[Path]:
    """A directory holding only the model's config.json, with the keys TransformerLens reads.

    It also keeps TransformerLens from guessing the architecture from words in the path.
    """
    raw = read_json_object(directory / MODEL_CONFIG)
    for legacy, current in HF_LEGACY_KEYS.get(raw.get("model_type", ""), {}).items():
        if legacy not in raw and current in raw:
            raw[legacy] = raw[current]
    with tempfile.TemporaryDirectory(prefix="rulecheck-hf-config-") as view:
        (Path(view) / MODEL_CONFIG).write_text(json.dumps(raw), encoding="utf-8")
        yield Path(view)


def hf_family_config(hf: Any, *, file: Path) -> dict[str, Any] | None:
    """The ``HookedTransformerConfig`` keyword arguments of a Hugging Face config whose family
    TransformerLens converts only from a hub name (Gemma-2), every field read from ``hf``;
    None for the families ``get_pretrained_model_config`` converts from a directory."""
    from transformer_lens.utilities import SUPPORTED_ACTIVATIONS

    if hf.model_type not in HF_FAMILIES:
        return None
    architecture = HF_FAMILIES[hf.model_type]
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    rope = dict(hf.rope_parameters or {})
    theta = rope.get("rope_theta")
    local = "sliding_attention" in hf.layer_types
    window = hf.sliding_window
    refused = (
        (
            "layer_types",
            set(hf.layer_types) - set(kinds),
            "TransformerLens runs sliding_attention and full_attention layers only",
            "use the layer types the checkpoint was trained with",
        ),
        (
            "rope_parameters",
            rope.get("rope_type", "default") != "default" or not isinstance(theta, int | float),
            f"TransformerLens runs {architecture} with default rotary positions only",
            "remove the rope scaling, or convert the model to a rulecheck directory",
        ),
        (
            "sliding_window",
            local and not (isinstance(window, int) and window > 0),
            "layer_types has sliding_attention layers",
            "set sliding_window to the window length in tokens",
        ),
        (
            "hidden_activation",
            hf.hidden_activation not in SUPPORTED_ACTIVATIONS,
            "TransformerLens has no such activation function",
            f"use one of {', '.join(SUPPORTED_ACTIVATIONS)}",
        ),
        (
            "attention_bias",
            hf.attention_bias,
            f"TransformerLens converts {architecture} without attention biases",
            "convert the model to a rulecheck directory with its biases",
        ),
        (
            "use_bidirectional_attention",
            hf.use_bidirectional_attention,
            f"TransformerLens runs {architecture} causally",
            "load a causal language model",
        ),
    )
    for field, bad, why, fix in refused:
        if bad:
            raise InvalidSpec(
                f"{json_text(getattr(hf, field))}, but {why}", file=file, field=field, fix=fix
            )
    softcaps = (hf.attn_logit_softcapping, hf.final_logit_softcapping)
    attn_cap, logit_cap = (-1.0 if cap is None else float(cap) for cap in softcaps)
    return {
        "d_model": hf.hidden_size,
        "d_head": hf.head_dim,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_activation,
        "initializer_range": hf.initializer_range,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_base": theta,
        "rotary_dim": hf.head_dim,
        "rotary_adjacent_pairs": False,
        "use_attn_scale": True,
        "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        "window_size": window if local else None,
        "use_local_attn": local,
        "attn_types": [kinds[t] for t in hf.layer_types],
        "attn_scores_soft_cap": attn_cap,
        "output_logits_soft_cap": logit_cap,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "original_architecture": architecture,
    }


def pretrained_config(
    cfg_dict: Mapping[str, Any], hf_cfg: Mapping[str, Any], *, fold_ln: bool, device: torch.device
) -> HookedTransformerConfig:
    """``cfg_dict`` completed as ``get_pretrained_model_config`` completes a converted config."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    from transformer_lens.utilities.quantization import quantization_method

    cfg = dict(cfg_dict)
    norm = cfg["normalization_type"]
    if fold_ln and cfg["original_architecture"] not in POST_NORM_ARCHITECTURES:
        cfg["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}.get(norm, norm)
    cfg.setdefault("default_prepend_bos", True)
    quantization = hf_cfg.get("quantization_config") or {}
    return HookedTransformerConfig.from_dict(
        cfg
        | {
            "init_weights": False,
            "device": str(device),
            "dtype": torch.float32,
            "n_devices": 1,
            "from_checkpoint": False,
            "load_in_4bit": bool(quantization.get("load_in_4bit", False)),
            "quantization_method": quantization_method(dict(hf_cfg)),
            "d_vocab": hf_cfg.get("vocab_size", cfg["d_vocab"]),
        }
    )


def _effective_processing(cfg: HookedTransformerConfig, flags: dict[str, bool]) -> dict[str, bool]:
    """The processing ``HookedTransformer.from_pretrained`` would apply to this architecture."""
    from transformer_lens.utilities import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    flags = dict(flags)
    shortformer = cfg.positional_embedding_type == "shortformer"
    if shortformer or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        flags["fold_ln"] = flags["center_writing_weights"] = False
    if shortformer or softcap_enabled(cfg.output_logits_soft_cap):
        flags["center_unembed"] = False
    return flags


def load_hf_directory(
    directory: Path, device: torch.device, **processing: bool
) -> HookedTransformer:
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = next((directory / n for n in HF_WEIGHT_FILES if (directory / n).is_file()), directory)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise InvalidSpec(
            f"cannot load the Hugging Face model ({one_line(exc)})",
            file=weights,
            fix="save it again with model.save_pretrained(directory)",
        ) from None
    try:
        family = hf_family_config(hf_model.config, file=directory / MODEL_CONFIG)
        if family is not None:
            cfg = pretrained_config(
                family, hf_model.config.to_dict(), fold_ln=processing["fold_ln"], device=device
            )
        else:
            with _hf_config_view(directory) as view:
                cfg = tl_loading.get_pretrained_model_config(
                    str(view),
                    hf_cfg=hf_model.config.to_dict(),
                    fold_ln=processing["fold_ln"],
                    device=str(device),
                    dtype=torch.float32,
                )
        cfg.model_name = directory.name
        cfg.tokenizer_name = None
        state = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        AssertionError,
        NotImplementedError,
    ) as exc:
        raise InvalidSpec(
            f"TransformerLens cannot convert this model ({one_line(exc)})",
            file=directory / MODEL_CONFIG,
            field="architectures",
            fix="use an architecture TransformerLens supports, or save a rulecheck directory",
        ) from None
    with without_warning(MODEL_DEPRECATED):
        model = HookedTransformer(cfg, move_to_device=False)
    try:
        model.load_and_process_state_dict(state, **_effective_processing(cfg, processing))
    except (RuntimeError, KeyError) as exc:
        raise InvalidSpec(
            f"converted weights do not fit the converted config ({one_line(exc)})",
            file=weights,
            field="state_dict",
            fix="save the model as a rulecheck directory with save_model",
        ) from None
    model.move_model_modules_to_device()
    model.eval()
    if any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise InvalidSpec(
                f"cannot load the tokenizer ({one_line(exc)})",
                file=directory,
                field="tokenizer",
                fix="save it with tokenizer.save_pretrained(directory)",
            ) from None
        attach_tokenizer(model, tokenizer, file=directory)
    return model
