"""Fingerprints: ``sha256:`` digests of tensors, models, SAEs and corpora, the same on any
device, for cache keys and for recording what a result was measured on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from rulecheck.loading._common import dtype_name
from rulecheck.loading.models import config_json

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


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


def fingerprint_model(model: HookedTransformer) -> str:
    """Fingerprint of the model's weights and config."""
    return fingerprint_tensors(model.state_dict(), {"config": config_json(model.cfg)})


def fingerprint_sae(sae: SAE) -> str:
    """Fingerprint of the SAE's weights and config (device left out)."""
    config = {k: v for k, v in sae.cfg.to_dict().items() if k != "device"}
    return fingerprint_tensors(sae.state_dict(), {"config": config})


def fingerprint_corpus(tokens: torch.Tensor) -> str:
    """Fingerprint of a token tensor."""
    return fingerprint_tensors({"tokens": tokens})
