"""Matching the features of two SAEs of one hook: decoder cosine, and the correlation of
their activations streamed from the model (``rulecheck match``, the gate's ``auto`` remap);
the method is ``rulecheck.core.matching``'s, the file it is saved as ``rulecheck.mapping``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from rulecheck.config import MatchConfig
from rulecheck.core.matching import activation_correlation, decoder_cosine, match_features
from rulecheck.core.pairs import Matching


def _layer_of(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def _encode(sae: Any, act: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_sae]`` activations of ``sae`` from its hook's activation: one head of
    ``hook_z`` for a per-head SAE, all heads flattened for a layer-level one."""
    head = sae.cfg.metadata.hook_head_index
    if head is not None and act.ndim == 4:
        return sae.encode(act[:, :, head, :])
    if act.ndim == 4 and sae.cfg.reshape_activations != "hook_z":
        return sae.encode(act.flatten(-2))
    return sae.encode(act)


@torch.no_grad()
def stream_activations(
    model: Any, sae_old: Any, sae_new: Any, tokens: torch.Tensor, batch_size: int = 32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(acts_old [t, n_old], acts_new [t, n_new])`` per batch of ``tokens [n_seq, seq]``:
    the model is run up to the SAEs' hook and both SAEs encode what it reads there. Position 0
    (BOS) is left out."""
    hook = sae_old.cfg.metadata.hook_name
    layer = _layer_of(hook)
    device = model.cfg.device
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        _, cache = model.run_with_cache(
            batch,
            names_filter=lambda name: name == hook,
            stop_at_layer=None if layer is None else layer + 1,
        )
        act = cache[hook][:, 1:]
        old = _encode(sae_old, act.to(sae_old.W_dec.dtype))
        new = _encode(sae_new, act.to(sae_new.W_dec.dtype))
        yield old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1])


def match_saes(
    old: Any, new: Any, cfg: MatchConfig, model: Any = None, tokens: torch.Tensor | None = None
) -> tuple[Matching, int | None]:
    """Match the features of SAE ``old`` to those of ``new`` (same hook): decoder cosine, and
    with ``model`` and ``tokens [n_seq, pos]`` the activation correlation over the first
    ``cfg.tokens`` tokens after BOS. Returns the matching and the number of tokens
    correlated (None without a model)."""
    w_new = new.W_dec.detach().to(old.W_dec.device)
    candidates = decoder_cosine(old.W_dec.detach(), w_new, cfg.k)
    corr, n_tokens = None, None
    if model is not None and tokens is not None:
        tokens = tokens[: -(-cfg.tokens // max(1, tokens.shape[1] - 1))]
        corr = activation_correlation(stream_activations(model, old, new, tokens), candidates)
        n_tokens = int(tokens.shape[0] * (tokens.shape[1] - 1))
    return match_features(candidates, corr, cfg.threshold, cfg.split_threshold), n_tokens
