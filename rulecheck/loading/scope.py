"""Gemma Scope and Llama Scope SAEs in the folders their Hugging Face repositories hold, loaded
offline through sae_lens's ``SAE.load_from_disk`` with the config and weights read here:
Gemma Scope's ``params.npz`` (JumpReLU; the hook read from the folder names, as sae_lens reads
it from the repository name) and Llama Scope's ``hyperparams.json`` with
``checkpoints/final.safetensors`` (its dataset-wise normalisation folded as sae_lens folds it).
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import (
    SAE_CONFIG,
    FieldRules,
    check_fields,
    check_state_dict,
    json_text,
    one_line,
    read_json_object,
    read_safetensors,
    shown,
)

if TYPE_CHECKING:
    from sae_lens import SAE

GEMMA_SCOPE_WEIGHTS = "params.npz"
# repository names as sae_lens's gemma_2 loader reads them: model size, pt or it, site
GEMMA_SCOPE_REPO = re.compile(
    r"(?:models--google--)?gemma-scope-(\d+b)-(pt|it)-(res|att|mlp)(?:-.*)?"
)
GEMMA_SCOPE_SITES = {
    "res": "blocks.{layer}.hook_resid_post",
    "att": "blocks.{layer}.attn.hook_z",
    "mlp": "blocks.{layer}.hook_mlp_out",
}
LLAMA_SCOPE_CONFIG = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
LLAMA_SCOPE_RULES = FieldRules(
    hints={
        "d_model": int,
        "d_sae": int,
        "hook_point_in": str,
        "jump_relu_threshold": float,
        "dataset_average_activation_norm": dict,
    },
    required=(
        "d_model",
        "d_sae",
        "hook_point_in",
        "jump_relu_threshold",
        "dataset_average_activation_norm",
    ),
    minimums={"d_model": 1, "d_sae": 1},
    choices={"act_fn": ("jumprelu",)},
)


def _load_converted(
    directory: Path, device: torch.device, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> SAE:
    """An SAE built by sae_lens's ``load_from_disk`` from a config and state dict read here."""
    from sae_lens import SAE

    def converter(
        path: str | Path, device: str, cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {**cfg, **(cfg_overrides or {})}, state

    return SAE.load_from_disk(str(directory), device=str(device), converter=converter)


def _gemma_scope_weights(path: Path) -> Path | None:
    if path.is_file() and path.name == GEMMA_SCOPE_WEIGHTS:
        return path
    if (
        path.is_dir()
        and (path / GEMMA_SCOPE_WEIGHTS).is_file()
        and not (path / SAE_CONFIG).is_file()
    ):
        return path / GEMMA_SCOPE_WEIGHTS
    return None


def is_gemma_scope(spec: str, path: Path) -> bool:
    return _gemma_scope_weights(path) is not None


def _gemma_scope_site(weights: Path) -> tuple[str, str, bool]:
    """``(hook name, model name, embedding SAE)`` of a Gemma Scope ``params.npz``, read as sae_lens
    reads them, from the repository and folder names in its path."""
    parts = weights.parent.absolute().parts
    for at in range(len(parts) - 1, -1, -1):
        repo = GEMMA_SCOPE_REPO.fullmatch(parts[at])
        if repo:
            break
    else:
        raise InvalidSpec(
            "cannot tell which hook the SAE reads: params.npz names none, and no folder above it"
            " is named after its Gemma Scope repository",
            file=weights,
            fix="keep the repository's layout, e.g."
            " gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_80/params.npz",
        )
    size, tuned, site = repo.groups()
    model_name = f"gemma-2-{size}" + ("-it" if tuned == "it" else "")
    below = parts[at + 1 :]
    if site == "res" and any(part.startswith("embedding") for part in below):
        return "hook_embed", model_name, True
    layers = [int(m.group(1)) for part in below if (m := re.fullmatch(r"layer_(\d+)", part))]
    if not layers:
        raise InvalidSpec(
            f"cannot tell which layer the SAE reads: no layer_N folder below {parts[at]}",
            file=weights,
            fix="keep the repository's layout, e.g. layer_11/width_16k/average_l0_80/params.npz",
        )
    return GEMMA_SCOPE_SITES[site].format(layer=layers[-1]), model_name, False


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InvalidSpec(
            f"not a readable .npz file ({one_line(exc)})",
            file=path,
            fix="download params.npz again from the Gemma Scope repository",
        ) from None


def read_gemma_scope(spec: str, path: Path, device: torch.device) -> SAE:
    weights = _gemma_scope_weights(path) or path / GEMMA_SCOPE_WEIGHTS
    hook_name, model_name, embedding = _gemma_scope_site(weights)
    arrays = {
        "W_" + key[2:] if key.startswith("w_") else key: value
        for key, value in _read_npz(weights).items()
    }
    scaling = arrays.pop("scaling_factor", None)
    if scaling is not None and not np.all(scaling == 1):
        raise InvalidSpec(
            "a scaling_factor other than 1, which sae_lens's Gemma Scope loader refuses too",
            file=weights,
            field="scaling_factor",
            fix="fold the scaling factor into W_enc and drop it",
        )
    w_enc = arrays.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        found = "missing" if w_enc is None else f"shape {list(w_enc.shape)}"
        raise InvalidSpec(
            f"expected a [d_in, d_sae] matrix, found {found}",
            file=weights,
            field="W_enc",
            fix="download params.npz again from the Gemma Scope repository",
        )
    d_in, d_sae = (int(n) for n in w_enc.shape)
    expected = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for key in sorted(set(arrays) | set(expected)):
        value = arrays.get(key)
        problem = None
        if key not in expected:
            problem = "unexpected array"
        elif value is None:
            problem = "missing"
        elif tuple(value.shape) != expected[key]:
            problem = f"shape {list(value.shape)}, expected {list(expected[key])} from W_enc"
        elif not np.issubdtype(value.dtype, np.floating):
            problem = f"dtype {value.dtype}, expected floating point"
        if problem:
            raise InvalidSpec(
                problem,
                file=weights,
                field=shown(key),
                fix=f"params.npz holds exactly {', '.join(expected)}",
            )
    state = {key: torch.from_numpy(arrays[key]).to(torch.float32) for key in expected}
    if embedding:  # as sae_lens: these were trained on embeddings scaled by sqrt(d_model)
        state["W_enc"] = state["W_enc"] / math.sqrt(d_in)
        state["W_dec"] = state["W_dec"] * math.sqrt(d_in)
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": str(device),
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
    }
    return _load_converted(weights.parent, device, cfg, state)


def _llama_scope_directory(path: Path) -> Path | None:
    if path.is_file() and path.name == LLAMA_SCOPE_CONFIG:
        path = path.parent
    if (
        path.is_dir()
        and (path / LLAMA_SCOPE_CONFIG).is_file()
        and not (path / SAE_CONFIG).is_file()
    ):
        return path
    return None


def is_llama_scope(spec: str, path: Path) -> bool:
    return _llama_scope_directory(path) is not None


def read_llama_scope(spec: str, path: Path, device: torch.device) -> SAE:
    directory = _llama_scope_directory(path) or path
    config_path, weights_path = directory / LLAMA_SCOPE_CONFIG, directory / LLAMA_SCOPE_WEIGHTS
    hp = read_json_object(config_path)
    check_fields(hp, LLAMA_SCOPE_RULES, file=config_path)
    norms = hp["dataset_average_activation_norm"]
    norm_in = norms.get("in") if isinstance(norms, dict) else None
    if (
        isinstance(norm_in, bool)
        or not isinstance(norm_in, int | float)
        or not math.isfinite(norm_in)
        or not norm_in > 0
    ):
        raise InvalidSpec(
            f"expected a positive number, found {json_text(norm_in)}",
            file=config_path,
            field="dataset_average_activation_norm.in",
            fix="download hyperparams.json again from the Llama Scope repository",
        )
    d_in, d_sae = hp["d_model"], hp["d_sae"]
    raw = read_safetensors(weights_path)
    expected = {
        "encoder.weight": torch.empty(d_sae, d_in, device="meta"),
        "encoder.bias": torch.empty(d_sae, device="meta"),
        "decoder.weight": torch.empty(d_in, d_sae, device="meta"),
        "decoder.bias": torch.empty(d_in, device="meta"),
    }
    check_state_dict(
        raw,
        expected,
        file=weights_path,
        fix=f"keep {LLAMA_SCOPE_WEIGHTS} with the {LLAMA_SCOPE_CONFIG} it came with",
    )
    # sae_lens folds the dataset-wise normalisation into W_enc, W_dec and b_dec, and scales the
    # threshold with it; norm_scaling_factor in its registry is sqrt(d_model) / norm_in
    scale = math.sqrt(d_in) / norm_in
    raw = {key: value.to(torch.float32) for key, value in raw.items()}
    state = {
        "W_enc": raw["encoder.weight"].T.contiguous(),
        "W_dec": raw["decoder.weight"].T.contiguous(),
        "b_enc": raw["encoder.bias"],
        "b_dec": raw["decoder.bias"],
        "threshold": torch.full((d_sae,), float(hp["jump_relu_threshold"]) * scale),
    }
    cfg = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": str(device),
        "model_name": "meta-llama/Llama-3.1-8B",
        "hook_name": hp["hook_point_in"],
        "hook_head_index": None,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
    }
    sae = _load_converted(directory, device, cfg, state)
    sae.fold_activation_norm_scaling_factor(scale)
    return sae
