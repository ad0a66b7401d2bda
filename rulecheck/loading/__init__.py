"""Specs in, objects out: models, SAEs and corpora, each failure a one-line RulecheckError.

Specs are paths and names only; a zoo spec (``planted``, ``rulecheck-tiny:eval``) is turned into
its path by ``rulecheck.specs.locate`` before it gets here.

- ``models``: ``load_model``, ``save_model`` and their tokenizers
- ``saes``: ``load_sae`` over a table of SAE formats, ``check_sae``
- ``corpora``: ``load_corpus``
- ``fingerprints``: ``fingerprint_*``, digests of what was loaded
- ``devices``: ``resolve_device``
"""

from __future__ import annotations

from rulecheck.loading.corpora import load_corpus
from rulecheck.loading.devices import resolve_device
from rulecheck.loading.fingerprints import (
    fingerprint_corpus,
    fingerprint_model,
    fingerprint_sae,
    fingerprint_tensors,
)
from rulecheck.loading.models import load_model, save_model
from rulecheck.loading.saes import attn_out_hook, check_sae, head_view, load_sae

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
