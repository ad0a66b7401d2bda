"""Binary and rank metrics of predicted against true activations (pure tensor functions)."""

from __future__ import annotations

import torch
from torch import Tensor


def binary_scores(true: Tensor, pred: Tensor) -> dict[str, Tensor]:
    """Precision, recall and F1 of ``pred > 0`` against ``true > 0``.

    ``true`` is ``[n]``; ``pred`` is ``[n]`` or ``[n, k]`` (k predictors scored at once), and
    each score has ``pred``'s trailing shape. Precision is 1 when nothing is predicted positive;
    recall is 1 when nothing is truly positive.
    """
    t = (true > 0).float()
    p = (pred > 0).float()
    if p.dim() == 2:
        t = t.unsqueeze(1)
    tp = (t * p).sum(0)
    n_pred = p.sum(0)
    n_true = t.sum(0).expand_as(tp)
    one = torch.ones_like(tp)
    precision = torch.where(n_pred > 0, tp / n_pred.clamp(min=1), one)
    recall = torch.where(n_true > 0, tp / n_true.clamp(min=1), one)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0 * one)
    return {"precision": precision, "recall": recall, "f1": f1}


def ranks(x: Tensor) -> Tensor:
    """Average ranks (1-based) of a 1-d tensor, ties sharing the mean of their ranks."""
    n = x.shape[0]
    order = torch.sort(x, stable=True).indices
    sorted_x = x[order]
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    # group equal values and give each group its mean position
    new_group = torch.ones(n, dtype=torch.bool, device=x.device)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1
    n_groups = int(group[-1]) + 1 if n else 0
    sums = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(0, group, pos)
    counts = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(
        0, group, torch.ones_like(pos)
    )
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    out[order] = (sums / counts)[group]
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation; 0 when either side is constant."""
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0
