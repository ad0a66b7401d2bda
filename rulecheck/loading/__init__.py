"""Specs in, objects out: models, SAEs and corpora, each failure a one-line RulecheckError.

Specs are paths and names; ``load_model``, ``load_sae`` and ``load_corpus`` here also take zoo
specs (``rulecheck-tiny``, ``rulecheck-tiny:sae_in/L0``, ``planted:eval``), read from the
entry's files (an entry built by code is built on first use); the modules below take paths.

- ``models``: ``load_model``, ``save_model`` and their tokenizers
- ``saes``: ``load_sae`` over a table of SAE formats
- ``sae_checks``: ``check_sae``, an SAE against its model, and ``head_view``
- ``corpora``: ``load_corpus``
- ``fingerprints``: ``fingerprint_*``, digests of what was loaded
- ``devices``: ``resolve_device``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rulecheck import zoo
from rulecheck.loading import corpora, models, saes
from rulecheck.loading.devices import resolve_device
from rulecheck.loading.fingerprints import (
    fingerprint_corpus,
    fingerprint_model,
    fingerprint_sae,
    fingerprint_tensors,
)
from rulecheck.loading.models import save_model
from rulecheck.loading.sae_checks import attn_out_hook, check_sae, head_view

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "attn_out_hook",
    "check_sae",
    "fingerprint_corpus",
    "fingerprint_model",
    "fingerprint_sae",
    "fingerprint_tensors",
    "head_view",
    "load_corpus",
    "load_model",
    "load_sae",
    "resolve_device",
    "save_model",
]


def _path(spec: str) -> str:
    """A zoo spec's path inside its entry; any other spec as given."""
    path = zoo.resolve(spec) if isinstance(spec, str) else None
    return spec if path is None else str(path)


def load_model(
    spec: str, device: str | torch.device = "cpu", **processing: bool
) -> HookedTransformer | TransformerBridge:
    """``models.load_model`` of a zoo name, directory, ``bridge:DIR`` or TransformerLens name
    (processing flags as ``HookedTransformer.from_pretrained`` takes them)."""
    return models.load_model(_path(spec), device, **processing)


def load_sae(
    spec: str,
    *,
    layer: int | None = None,
    head: int | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """``saes.load_sae`` of a zoo spec, sae_lens directory, registry id or paper-format files
    (``{layer}``/``{head}`` templates filled in from ``layer`` and ``head``)."""
    return saes.load_sae(_path(spec), layer=layer, head=head, device=device)


def load_corpus(spec: str, **reading: Any) -> torch.Tensor:
    """``corpora.load_corpus`` of a zoo corpus (``rulecheck-tiny:eval``), a file or a dataset."""
    return corpora.load_corpus(_path(spec), **reading)
