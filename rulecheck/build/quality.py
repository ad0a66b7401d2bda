"""SAE quality measures: L0, dead features, explained variance, cross-entropy recovered.

Output SAEs are judged by splicing their reconstruction into their head's ``hook_z`` and
comparing the loss with the clean model and with that head zero-ablated (the attention-output
SAE paper's measure). Positions after BOS only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck.core.heads import head_input, resid_pre_hook, run_to_heads, run_to_layer, z_hook
from rulecheck.core.modelview import Model, view


def _splice_then_zero(sae: SAE, head: int | None, b: int) -> Callable[[Tensor, object], Tensor]:
    """A ``hook_z`` hook: ``head``'s output (every head's, concatenated, for ``None``)
    replaced by the SAE's reconstruction in the first ``b`` rows, by zeros in the others."""
    heads = slice(None) if head is None else head

    def hook(z: Tensor, hook: object) -> Tensor:  # z [2b, pos, n_heads, d_head]
        z = z.clone()
        x = z[:b, :, heads]
        z[:b, :, heads] = sae.decode(sae.encode(head_input(sae, z[:b], head))).view_as(x)
        z[b:, :, heads] = 0
        return z

    return hook


# Sequences a forward pass. The losses write logits [batch, pos, d_vocab] and their log-softmax:
# 16 MiB each at 16 sequences of rulecheck-tiny, 128 MiB at 128, where the same measure took
# 1.65 times as long on a 2-core x86_64 machine (memory traffic, not arithmetic).
BATCH = 16


@torch.no_grad()
def clean_loss(model: Model, tokens: Tensor, batch_size: int = BATCH) -> float:
    """The model's mean next-token loss on ``tokens [n, pos]``."""
    total = sum(
        float(model(tokens[s : s + batch_size], return_type="loss", loss_per_token=True).sum())
        for s in range(0, len(tokens), batch_size)
    )
    return total / (len(tokens) * (tokens.shape[1] - 1))


class _Reconstruction:
    """Running sums of one SAE's L0, firing features and reconstruction error over batches of
    its inputs ``x [n, d_in]``."""

    def __init__(self, sae: SAE) -> None:
        self.sae = sae
        self.l0_sum, self.n_tok, self.err_sq, self.x_sq = 0.0, 0, 0.0, 0.0
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        self.x_sum: Tensor | None = None

    def add(self, x: Tensor) -> None:
        f = self.sae.encode(x)
        recon = self.sae.decode(f)
        self.l0_sum += float((f > 0).sum())
        self.n_tok += x.shape[0]
        self.fired |= (f > 0).any(0).cpu()
        self.err_sq += float((x - recon).square().sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        self.x_sq += float(x.square().sum())

    def result(self) -> dict[str, float]:
        assert self.x_sum is not None, "no tokens measured"
        total_var = self.x_sq - float(self.x_sum.square().sum()) / self.n_tok
        return {
            "l0": self.l0_sum / self.n_tok,
            "dead_fraction": 1.0 - float(self.fired.float().mean()),
            "explained_variance": 1.0 - self.err_sq / total_var,
        }


def _sae_input(sae: SAE, act: Tensor, head: int | None, output: bool) -> Tensor:
    """What ``sae`` reads at the positions after BOS, ``[n, ...]``: the residual, one head's z,
    or every head's (as the SAE reads ``hook_z``: flattened, or per head if it reshapes)."""
    x = head_input(sae, act, head) if output else act  # [batch, pos, ...]
    return x[:, 1:].flatten(0, 1)


@torch.no_grad()
def output_saes_quality(
    model: Model,
    saes: Mapping[str, tuple[SAE, int | None]],
    tokens: Tensor,
    layer: int,
    batch_size: int = BATCH,
) -> dict[str, dict[str, float]]:
    """``sae_quality(..., losses=False)`` of several output SAEs of ``layer`` (name -> (SAE,
    head, or None for every head's z)) from one pass over ``tokens`` for all of them."""
    stats = {name: _Reconstruction(sae) for name, (sae, _) in saes.items()}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        z = run_to_layer(model, batch, layer, (z_hook(layer),))[z_hook(layer)]
        for name, (sae, head) in saes.items():
            stats[name].add(_sae_input(sae, z, head, output=True))
    return {name: s.result() for name, s in stats.items()}


@torch.no_grad()
def sae_quality(
    model: Model,
    sae: SAE,
    tokens: Tensor,
    layer: int,
    head: int | None = None,
    batch_size: int = BATCH,
    loss_clean: float | None = None,
    losses: bool = True,
    all_heads: bool = False,
) -> dict[str, float]:
    """L0, dead fraction and explained variance of an SAE on ``tokens [n, pos]``; for an
    output SAE (of one ``head``, or of every head's z concatenated with ``all_heads``) also the
    clean, spliced and zero-ablated losses and the fraction of cross-entropy recovered (unless
    ``losses`` is False: they take two passes through the unembedding, most of the cost).
    ``loss_clean`` (``clean_loss`` of the same tokens) saves a forward pass per SAE when several
    are measured."""
    output = head is not None or all_heads
    losses_wanted = output and losses
    hook = z_hook(layer) if output else resid_pre_hook(layer)
    heads = list(range(model.cfg.n_heads)) if all_heads or head is None else [head]
    stats = _Reconstruction(sae)
    totals = {"spliced": 0.0, "zero": 0.0}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        if not output:
            store = run_to_layer(model, batch, layer, (hook,))
        else:  # the layer's residual and these heads' z only
            store = run_to_heads(model, batch, layer, heads)
        stats.add(_sae_input(sae, store[hook], head, output))
        if losses_wanted:
            # spliced and zero-ablated in one run from the layer on: rows [:b] then [b:]
            b = len(batch)
            resid = store[resid_pre_hook(layer)]
            per_tok = view(model).loss_with_hooks(
                torch.cat([batch, batch]),
                torch.cat([resid, resid]),
                layer,
                [(hook, _splice_then_zero(sae, head, b))],
            )
            totals["spliced"] += float(per_tok[:b].sum())
            totals["zero"] += float(per_tok[b:].sum())
    out = stats.result()
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
