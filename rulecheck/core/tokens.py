"""Input features read as tokens: the tokens that activate each input-SAE feature most."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck.core.modelview import Model, view


@torch.no_grad()
def token_inputs(model: Model, layer: int, start: int, stop: int) -> Tensor:
    """``[stop - start, d_model]``: what the input SAE of ``layer`` reads for each token id.

    At layer 0, the token's embedding plus the mean position embedding; deeper, the residual
    stream at the token in the two-token context ``[BOS, token]``.
    """
    ids = torch.arange(start, stop, device=model.W_E.device)
    if layer == 0:
        emb = model.W_E.detach()[ids]
        W_pos = view(model).position_embedding()
        if W_pos is not None:
            emb = emb + W_pos.mean(0)
        return emb
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else 0
    pairs = torch.stack([torch.full_like(ids, bos), ids], dim=1)
    return model(pairs, stop_at_layer=layer)[:, 1]


@torch.no_grad()
def token_features(
    model: Model, sae_in: SAE, layer: int = 0, top: int = 3, batch_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Input features read as tokens: ``[d_sae_in, top]`` ids of the tokens that activate each
    feature most (see ``token_inputs``), and the activations (0 where fewer tokens do)."""
    d_sae, d_vocab = sae_in.cfg.d_sae, model.cfg.d_vocab
    device = model.W_E.device
    best_val = torch.zeros(d_sae, 0, device=device)
    best_id = torch.zeros(d_sae, 0, dtype=torch.int64, device=device)
    for start in range(0, d_vocab, batch_size):
        stop = min(start + batch_size, d_vocab)
        acts = sae_in.encode(token_inputs(model, layer, start, stop)).T  # [d_sae, chunk]
        ids = torch.arange(start, stop, device=device).expand_as(acts)
        vals = torch.cat([best_val, acts.float()], dim=1)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :top]
        best_val = vals.gather(1, order)
        best_id = torch.cat([best_id, ids], dim=1).gather(1, order)
    return best_id, best_val


def token_strings(model: Model, ids: Sequence[int]) -> list[str]:
    """Decoded strings of token ids (ids as text when the model has no tokenizer)."""
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]


def top_token(model: Model, sae_in: SAE, layer: int = 0) -> Tensor:
    """``[d_sae_in]``: the token that activates each input feature most (-1 where none does)."""
    ids, vals = token_features(model, sae_in, layer, top=1)
    return torch.where(vals[:, 0] > 0, ids[:, 0], torch.full_like(ids[:, 0], -1))


def layer_token_table(
    model: Model, sae_in: SAE, layer: int, top: int
) -> dict[int, list[str]] | None:
    """Top tokens of each input feature of ``layer`` (None when ``top`` is 0 or the model has
    no tokenizer to name them with)."""
    if top <= 0 or model.tokenizer is None:
        return None
    ids, vals = token_features(model, sae_in, layer, top=top)
    table = {}
    for j in range(ids.shape[0]):
        live = ids[j][vals[j] > 0].tolist()
        if live:
            table[j] = token_strings(model, live)
    return table
