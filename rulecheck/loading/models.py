"""Models: ``load_model`` and ``save_model``, and the tokenizers that come with them.

Model specs: a rulecheck model directory (``config.json`` with the ``HookedTransformerConfig``
keyword arguments, ``model.safetensors``, optional ``tokenizer.json``), a Hugging Face model
directory, or a TransformerLens model name (``gpt2``), each loaded as a ``HookedTransformer``;
or ``bridge:`` and a Hugging Face model directory, loaded as a ``TransformerBridge``
(``rulecheck.loading.bridge``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np
import torch
from safetensors.torch import save_file

from rulecheck.atomic import atomic_directory
from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import (
    MODEL_CONFIG,
    MODEL_DEPRECATED,
    FieldRules,
    check_fields,
    check_finite,
    check_state_dict,
    dataclass_hints,
    dtype_name,
    expand_path,
    json_text,
    looks_like_path,
    one_line,
    parse_dtype,
    read_json_object,
    read_safetensors,
    shown,
    without_warning,
)
from rulecheck.loading.bridge import is_bridge_spec, load_bridge
from rulecheck.loading.devices import resolve_device
from rulecheck.loading.tokenizer import attach_tokenizer, tokenizer_from_file
from rulecheck.zoo.names import ENTRIES

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.config import TransformerLensConfig
    from transformer_lens.model_bridge import TransformerBridge

MODEL_WEIGHTS = "model.safetensors"
MODEL_TOKENIZER = "tokenizer.json"
# HookedTransformerConfig fields that describe a run, not the weights: never written.
UNSAVED_CONFIG_FIELDS = frozenset(
    {
        "device",
        "n_devices",
        "n_params",
        "seed",
        "init_weights",
        "tokenizer_name",
        "tokenizer_prepends_bos",
        "trust_remote_code",
        "load_in_4bit",
        "quantization_method",
        "from_checkpoint",
        "checkpoint_index",
        "checkpoint_label_type",
        "checkpoint_value",
    }
)


class Processing(TypedDict):
    """The weight processing flags of ``HookedTransformer.from_pretrained``."""

    fold_ln: bool
    center_writing_weights: bool
    center_unembed: bool
    fold_value_biases: bool


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> HookedTransformer | TransformerBridge:
    """A HookedTransformer from a rulecheck or Hugging Face directory, or a TL name; a
    TransformerBridge from ``bridge:`` and a Hugging Face directory.

    The processing flags apply to Hugging Face directories and TL names (as in
    ``HookedTransformer.from_pretrained``, or a bridge's ``enable_compatibility_mode``); a
    rulecheck directory is loaded as saved. A weight holding a NaN or an infinity is an error
    naming it.
    """
    processing: Processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }
    model = _load_model(spec, resolve_device(device), processing)
    check_finite(model, spec, "model")
    return model


def _load_model(
    spec: str, resolved: torch.device, processing: Processing
) -> HookedTransformer | TransformerBridge:
    """``load_model`` before its weights are checked."""
    if is_bridge_spec(spec):
        return load_bridge(spec, resolved, **processing)
    path = expand_path(spec)
    if path.is_dir():
        config_path = path / MODEL_CONFIG
        if not config_path.is_file():
            raise InvalidSpec(
                f"not a model directory: no {MODEL_CONFIG}",
                file=path,
                fix=f"pass a directory with {MODEL_CONFIG} and {MODEL_WEIGHTS}",
            )
        if "model_type" in read_json_object(config_path):
            from rulecheck.loading.hf import load_hf_directory

            return load_hf_directory(path, resolved, **processing)
        return _load_rulecheck_directory(path, resolved)
    if path.exists():
        raise InvalidSpec(
            "not a model directory",
            file=path,
            fix=f"pass a directory with {MODEL_CONFIG} and {MODEL_WEIGHTS}",
        )
    return _load_named_model(spec, resolved, **processing)


# Checked before TransformerLens sees config.json: each field's type comes from
# HookedTransformerConfig's type hints; these tables add what the types cannot say.
MODEL_REQUIRED = ("n_layers", "d_model", "d_head", "n_ctx", "d_vocab")
MODEL_MINIMUMS = {
    "n_layers": 1,
    "d_model": 1,
    "d_head": 1,
    "n_heads": 1,
    "n_ctx": 1,
    "d_mlp": 1,
    "d_vocab": 1,
    "d_vocab_out": 1,
    "n_key_value_heads": 1,
    "rotary_dim": 1,
    "num_experts": 1,
    "experts_per_token": 1,
    "window_size": 1,
    "train_seq_length": 1,
    "relative_attention_max_distance": 1,
    "relative_attention_num_buckets": 1,
    "NTK_original_ctx_len": 1,
    "yarn_original_max_position_embeddings": 1,
    "n_devices": 1,
    "seed": 0,
}
MODEL_DERIVED = {"n_heads": "d_model / d_head", "d_vocab_out": "d_vocab"}
MODEL_CHOICES: dict[str, tuple[Any, ...]] = {
    "normalization_type": (None, "LN", "LNPre", "RMS", "RMSPre"),
    "positional_embedding_type": ("standard", "shortformer", "rotary", "alibi"),
    "attention_dir": ("causal", "bidirectional"),
}
MODEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Fields counting modules that TransformerLens builds one by one, and the weight keys that
# number those modules: compared before building, so a huge count fails at once.
MODEL_COUNTS = {
    "n_layers": ("blocks", re.compile(r"blocks\.([0-9]+)\.")),
    "num_experts": ("experts", re.compile(r"blocks\.0\.mlp\.experts\.([0-9]+)\.")),
}
WEIGHTS_FIX = f"save the weights and {MODEL_CONFIG} together with save_model"


@functools.cache
def _model_rules() -> FieldRules:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.utilities import SUPPORTED_ACTIVATIONS

    return FieldRules(
        hints=dataclass_hints(HookedTransformerConfig),
        required=MODEL_REQUIRED,
        minimums=MODEL_MINIMUMS,
        # an attention-only model has no activation function
        choices=MODEL_CHOICES | {"act_fn": (*SUPPORTED_ACTIVATIONS, None)},
        derive=MODEL_DERIVED,
    )


def _model_kwargs(path: Path) -> dict[str, Any]:
    """The HookedTransformerConfig keyword arguments of ``config.json``, every field checked."""
    raw = read_json_object(path)
    rules = _model_rules()
    unknown = sorted(set(raw) - set(rules.hints))
    if unknown:
        raise InvalidSpec(
            f"not a HookedTransformerConfig field: {', '.join(map(shown, unknown))}",
            file=path,
            field=shown(unknown[0]),
            fix="remove it; config.json holds HookedTransformerConfig keyword arguments",
        )
    check_fields(raw, rules, file=path)
    kwargs = dict(raw)
    if "dtype" in kwargs:
        kwargs["dtype"] = parse_dtype(kwargs["dtype"], file=path)
        if kwargs["dtype"] not in MODEL_DTYPES:
            raise InvalidSpec(
                f"{json_text(raw['dtype'])} is not a dtype a model's weights can have",
                file=path,
                field="dtype",
                fix=f"use one of {', '.join(dtype_name(d) for d in MODEL_DTYPES)}",
            )
    return kwargs


def _model_config(kwargs: Mapping[str, Any], device: str, *, file: Path) -> HookedTransformerConfig:
    from transformer_lens import HookedTransformerConfig

    try:
        return HookedTransformerConfig(
            **{**kwargs, "device": device, "n_devices": 1, "init_weights": False}
        )
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise InvalidSpec(
            f"invalid model config ({one_line(exc)})",
            file=file,
            fix="write config.json with save_model or fix the named value",
        ) from None


def _skeleton(kwargs: Mapping[str, Any], *, file: Path) -> HookedTransformer:
    """The model ``kwargs`` describe on the meta device: its keys, shapes and buffers, in no
    memory, built before the real one so that a config the weights do not fit allocates
    nothing."""
    from transformer_lens import HookedTransformer

    cfg = _model_config({**kwargs, "tokenizer_name": None}, "meta", file=file)
    try:
        with torch.device("meta"), without_warning(MODEL_DEPRECATED):
            return HookedTransformer(cfg)
    except (
        AssertionError,
        ValueError,
        TypeError,
        RuntimeError,
        KeyError,
        IndexError,  # attn_types shorter than n_layers
        OverflowError,  # rotary_base too large for a float
        NameError,  # use_normalization_before_and_after with LayerNorm: a block's unset local
    ) as exc:
        raise InvalidSpec(
            f"TransformerLens cannot build this model ({one_line(exc)})",
            file=file,
            fix="check the sizes and options it names, or write config.json with save_model",
        ) from None


def _check_counts(cfg: HookedTransformerConfig, state: Mapping[str, Any], *, file: Path) -> None:
    """The config's counts of modules against the weights, before a model that size is built."""
    for name, (modules, pattern) in MODEL_COUNTS.items():
        count = getattr(cfg, name)
        found = len({match.group(1) for key in state if (match := pattern.match(key))})
        if count is not None and count != found:
            raise InvalidSpec(
                f"{count}, but the {modules} in {MODEL_WEIGHTS} number {found}",
                file=file,
                field=name,
                fix=f"set {name} to {found}, or {WEIGHTS_FIX}" if found else WEIGHTS_FIX,
            )


def _load_rulecheck_directory(directory: Path, device: torch.device) -> HookedTransformer:
    """Config checked, then the weights' keys and shapes against a meta-device model, then the
    real model. Buffers TransformerLens computes from the config (causal mask, ``IGNORE``,
    rotary tables) are the model's own: a weights file may leave them out."""
    from transformer_lens import HookedTransformer

    config_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
    kwargs = _model_kwargs(config_path)
    cfg = _model_config(kwargs, str(device), file=config_path)
    state = read_safetensors(weights_path)
    _check_counts(cfg, state, file=config_path)
    skeleton = _skeleton(kwargs, file=config_path)
    derived = {name for name, _ in skeleton.named_buffers()}
    check_state_dict(
        state, skeleton.state_dict(), file=weights_path, fix=WEIGHTS_FIX, derived=derived
    )
    tokenizer_path = directory / MODEL_TOKENIZER
    tokenizer = tokenizer_from_file(tokenizer_path) if tokenizer_path.is_file() else None
    if tokenizer is not None:
        cfg.tokenizer_name = None
    try:
        with without_warning(MODEL_DEPRECATED):
            model = HookedTransformer(cfg)
    except (OSError, ValueError) as exc:
        raise InvalidSpec(
            f"cannot build the model ({one_line(exc)})",
            file=config_path,
            fix=f"remove tokenizer_name and add {MODEL_TOKENIZER} to the directory",
        ) from None
    own = model.state_dict()
    weights = {name: t for name, t in state.items() if name not in derived}
    try:
        model.load_state_dict(weights | {name: own[name] for name in derived}, strict=True)
    except RuntimeError as exc:
        raise InvalidSpec(
            f"cannot load the weights ({one_line(exc)})",
            file=weights_path,
            field="state_dict",
            fix=WEIGHTS_FIX,
        ) from None
    model.eval()
    if tokenizer is not None:
        attach_tokenizer(model, tokenizer, file=tokenizer_path)
    return model


def _load_named_model(
    spec: str, device: torch.device, **processing: Unpack[Processing]
) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    if not _is_model_name(spec):
        raise InvalidSpec(
            "no such file or directory, and not a TransformerLens model name",
            file=spec,
            fix=f"pass a model directory, a zoo name ({', '.join(ENTRIES)}) or a name like gpt2",
        )
    try:
        with without_warning(MODEL_DEPRECATED):
            return HookedTransformer.from_pretrained(spec, device=str(device), **processing)
    except OSError as exc:
        raise InvalidSpec(
            f"cannot download the model from the Hugging Face hub ({one_line(exc, 120)})",
            file=spec,
            fix="pass a local model directory (rulecheck or Hugging Face format) or a zoo name",
        ) from None


def _is_model_name(spec: str) -> bool:
    """Whether TransformerLens knows ``spec`` as a model name or alias (a local lookup)."""
    import transformer_lens.loading_from_pretrained as tl_loading

    if looks_like_path(spec):
        return False
    try:
        tl_loading.get_official_model_name(spec)
    except ValueError:
        return False
    return True


def save_model(model: HookedTransformer, directory: Path) -> Path:
    """Write ``model`` as a rulecheck model directory (atomically); return the directory."""
    directory = expand_path(directory)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and not hasattr(tokenizer, "backend_tokenizer"):
        raise InvalidSpec(
            f"cannot save a slow tokenizer ({type(tokenizer).__name__})",
            file=directory,
            field="tokenizer",
            fix="attach a fast tokenizer (use_fast=True) before saving",
        )
    with atomic_directory(directory) as staging:
        (staging / MODEL_CONFIG).write_text(
            json.dumps(config_json(model.cfg), indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        save_file(state, str(staging / MODEL_WEIGHTS))
        if tokenizer is not None:
            tokenizer.backend_tokenizer.save(str(staging / MODEL_TOKENIZER))
    return directory


def config_json(cfg: TransformerLensConfig) -> dict[str, Any]:
    """The config keyword arguments that rebuild ``cfg`` (a ``HookedTransformerConfig``, or a
    ``TransformerBridgeConfig``'s fields), as JSON values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.init and f.name not in UNSAVED_CONFIG_FIELDS:
            out[f.name] = _json_value(getattr(cfg, f.name), field=f.name)
    return out


def _json_value(value: Any, *, field: str) -> Any:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v, field=field) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, field=field) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidSpec(
        f"cannot write {type(value).__name__} to JSON",
        field=field,
        fix="set the config field to a JSON value",
    )


# ---------------------------------------------------------------------------------------------
# tokenizers
