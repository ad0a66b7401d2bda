"""Fingerprints: ``sha256:`` digests of tensors, models, SAEs and corpora, for cache keys and
for recording what a result was measured on (a rulebook's ``fingerprints:``, compared when the
rulebook is checked).

A fingerprint is the same on any machine for the same content: tensors are hashed as their
dtype, shape and little-endian bytes after a copy to the CPU (no arithmetic, so no device,
vector width or BLAS can change a bit), and the configs hashed leave out what describes where
or with what a file was made rather than what it computes: the device, a model's
``model_name`` (a Hugging Face directory's name), and an SAE's metadata except the hook it
reads (``sae_lens_version`` there is the installed sae_lens's when the file records none).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from rulecheck.loading._common import dtype_name
from rulecheck.loading.models import config_json

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

MODEL_CONFIG_UNHASHED = frozenset({"model_name"})
SAE_CONFIG_UNHASHED = frozenset({"device"})
SAE_METADATA_HASHED = ("hook_name", "hook_head_index")


def _tensor_bytes(tensor: torch.Tensor, byteorder: str = sys.byteorder) -> bytes:
    """The tensor's elements as little-endian bytes (``byteorder``: this machine's)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if not flat.numel():
        return b""
    raw = flat.view(torch.uint8)
    if byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(-1).reshape(-1)
    return raw.numpy().tobytes()


def fingerprint_tensors(
    named: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None
) -> str:
    """``sha256:<hex>`` of names, dtypes, shapes and bytes (any device) plus canonical ``extra``."""
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name]
        header = [name, dtype_name(tensor.dtype), list(tensor.shape)]
        data = _tensor_bytes(tensor)
        digest.update(json.dumps([*header, len(data)]).encode() + b"\0")
        digest.update(data)
    canonical = json.dumps(
        extra or {}, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True
    )
    digest.update(b"extra\0" + canonical.encode())
    return f"sha256:{digest.hexdigest()}"


def fingerprint_model(model: HookedTransformer | TransformerBridge) -> str:
    """Fingerprint of the model's weights and config (its name left out; a TransformerBridge's
    config with its Hugging Face architecture)."""
    from rulecheck.core.modelview import view

    config = {k: v for k, v in config_json(model.cfg).items() if k not in MODEL_CONFIG_UNHASHED}
    config |= view(model).config_extras()
    return fingerprint_tensors(model.state_dict(), {"config": config})


def fingerprint_sae(sae: SAE) -> str:
    """Fingerprint of the SAE's weights and config (device and provenance left out)."""
    config = {k: v for k, v in sae.cfg.to_dict().items() if k not in SAE_CONFIG_UNHASHED}
    metadata = config.get("metadata")
    if isinstance(metadata, Mapping):
        config["metadata"] = {k: metadata[k] for k in SAE_METADATA_HASHED if k in metadata}
    return fingerprint_tensors(sae.state_dict(), {"config": config})


def fingerprint_corpus(tokens: torch.Tensor) -> str:
    """Fingerprint of a token tensor."""
    return fingerprint_tensors({"tokens": tokens})
