"""Zoo registry: named checkpoints that run offline (``planted``, ``planted-local``,
``planted-rotary``, ``rulecheck-tiny``, ``rulecheck-tiny-llama``).

A zoo entry is a directory with a fixed layout, the same formats as any checkpoint::

    model/               config.json, model.safetensors, tokenizer.json
    sae_in/L{l}/         sae_lens directory (cfg.json, sae_weights.safetensors)
    sae_out/L{l}H{h}/    sae_lens directory, per-head (hook_head_index in metadata)
    eval_tokens.npy      int [N, T], BOS in column 0
    ground_truth.json    (planted entries only) the rules the weights implement

Specs: ``NAME`` is the model, ``NAME:REL`` a path inside the entry, ``NAME:eval`` the corpus.
This module only names entries and says where their files are; the code that builds them is
in ``rulecheck.build``.
"""

from __future__ import annotations

from pathlib import Path

from rulecheck.paths import cache_dir
from rulecheck.zoo.names import ENTRIES

ALIASES = {"eval": "eval_tokens.npy", "corpus": "eval_tokens.npy", "model": "model"}
PACKAGE_DIR = Path(__file__).parent


def entry_dir(name: str) -> Path:
    """The directory of a zoo entry, building it first if it is built by code."""
    if name == "planted":
        from rulecheck.build.planted import ensure_built

        return ensure_built(cache_dir() / "zoo" / "planted")
    if name == "planted-local":
        from rulecheck.build import planted_local

        return planted_local.ensure_built(cache_dir() / "zoo" / "planted-local")
    if name == "planted-rotary":
        from rulecheck.build import planted_rotary

        return planted_rotary.ensure_built(cache_dir() / "zoo" / "planted-rotary")
    if name == "rulecheck-tiny":
        return PACKAGE_DIR / "tiny"
    if name == "rulecheck-tiny-llama":
        return PACKAGE_DIR / "tiny_llama"
    raise KeyError(name)


def is_zoo_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] in ENTRIES


def resolve(spec: str) -> Path | None:
    """Path of a zoo spec (``planted``, ``planted:sae_out/L0H1``, ``planted:eval``), else None."""
    name, _, rel = spec.partition(":")
    if name not in ENTRIES:
        return None
    rel = ALIASES.get(rel or "model", rel or "model")
    return entry_dir(name) / rel
