"""SAE quality measures: L0, dead features, explained variance, cross-entropy recovered.

Output SAEs are judged by splicing their reconstruction into their head's ``hook_z`` and
comparing the loss with the clean model and with that head zero-ablated (the attention-output
SAE paper's measure). Positions after BOS only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from rulecheck.core.heads import resid_pre_hook, run_to_heads, run_to_layer, z_hook


def _splice_then_zero(sae: SAE, head: int, b: int) -> Callable[[Tensor, object], Tensor]:
    """A ``hook_z`` hook: ``head``'s output replaced by the SAE's reconstruction in the first
    ``b`` rows, by zeros in the others."""

    def hook(z: Tensor, hook: object) -> Tensor:  # z [2b, pos, n_heads, d_head]
        z = z.clone()
        z[:b, :, head] = sae.decode(sae.encode(z[:b, :, head]))
        z[b:, :, head] = 0
        return z

    return hook


# Sequences a forward pass. The losses write logits [batch, pos, d_vocab] and their log-softmax:
# 16 MiB each at 16 sequences of rulecheck-tiny, 128 MiB at 128, where the same measure took
# 1.65 times as long on a 2-core x86_64 machine (memory traffic, not arithmetic).
BATCH = 16


@torch.no_grad()
def clean_loss(model: HookedTransformer, tokens: Tensor, batch_size: int = BATCH) -> float:
    """The model's mean next-token loss on ``tokens [n, pos]``."""
    total = sum(
        float(model(tokens[s : s + batch_size], return_type="loss", loss_per_token=True).sum())
        for s in range(0, len(tokens), batch_size)
    )
    return total / (len(tokens) * (tokens.shape[1] - 1))


@torch.no_grad()
def sae_quality(
    model: HookedTransformer,
    sae: SAE,
    tokens: Tensor,
    layer: int,
    head: int | None = None,
    batch_size: int = BATCH,
    loss_clean: float | None = None,
    losses: bool = True,
) -> dict[str, float]:
    """L0, dead fraction and explained variance of an SAE on ``tokens [n, pos]``; for a
    per-head output SAE (``head`` given) also the clean, spliced and zero-ablated losses and
    the fraction of cross-entropy recovered (unless ``losses`` is False: they take two passes
    through the unembedding, most of the cost). ``loss_clean`` (``clean_loss`` of the same
    tokens) saves a forward pass per SAE when several are measured."""
    losses_wanted = head is not None and losses
    hook = resid_pre_hook(layer) if head is None else z_hook(layer)
    l0_sum, n_tok = 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    err_sq, x_sum, x_sq = 0.0, None, 0.0
    totals = {"spliced": 0.0, "zero": 0.0}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        if head is None:
            store = run_to_layer(model, batch, layer, (hook,))
        else:  # the layer's residual and this head's z only
            store = run_to_heads(model, batch, layer, [head])
        x = store[hook]
        x = (x if head is None else x[:, :, head])[:, 1:].reshape(-1, sae.cfg.d_in)
        f = sae.encode(x)
        recon = sae.decode(f)
        l0_sum += float((f > 0).sum())
        n_tok += x.shape[0]
        fired |= (f > 0).any(0).cpu()
        err_sq += float((x - recon).square().sum())
        x_sum = x.sum(0) if x_sum is None else x_sum + x.sum(0)
        x_sq += float(x.square().sum())
        if losses_wanted:
            # spliced and zero-ablated in one run from the layer on: rows [:b] then [b:]
            b = len(batch)
            resid = store[resid_pre_hook(layer)]
            per_tok = model.run_with_hooks(
                torch.cat([resid, resid]),
                start_at_layer=layer,
                tokens=torch.cat([batch, batch]),
                return_type="loss",
                loss_per_token=True,
                fwd_hooks=[(hook, _splice_then_zero(sae, head, b))],
            )
            totals["spliced"] += float(per_tok[:b].sum())
            totals["zero"] += float(per_tok[b:].sum())
    total_var = x_sq - float(x_sum.square().sum()) / n_tok
    out = {
        "l0": l0_sum / n_tok,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "explained_variance": 1.0 - err_sq / total_var,
    }
    if losses_wanted:
        n_pred = len(tokens) * (tokens.shape[1] - 1)
        spliced, zero = (totals[k] / n_pred for k in ("spliced", "zero"))
        clean = clean_loss(model, tokens, batch_size) if loss_clean is None else loss_clean
        out |= {
            "loss_clean": clean,
            "loss_spliced": spliced,
            "loss_zero_ablated": zero,
            "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else 1.0,
        }
    return out
