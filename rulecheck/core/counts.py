"""Counting rules (paper 4.3, Fig. 7): a feature that depends on how often a key occurs.

Protocol, for one output feature and a candidate key token:

- Base contexts: the feature's positives of one split (default test) — prefixes where the
  query side of the rule is present at ``t`` — with every occurrence of the key in ``[1, t)``
  replaced by a neutral filler token. Negatives are left out: their ``t`` rarely holds a query,
  so their activation stays 0 for every count and says nothing about counting.
- Count ``c``: the occurrences of the key in ``[1, t]``, the query position included: the
  ``n`` copies inserted before ``t``, plus one where the key is the query token itself (a
  feature that fires at a token seen before counts that token too). A context is measured at
  ``c = n + own`` for ``n = 0 ..`` with ``c <= max_count``, copies spaced evenly over the prefix
  (``spread_positions``), by the true activation at the new ``t`` (model + output SAE); a
  context whose query is the key has no count 0. Occurrences of ``protect_tokens`` (e.g. the
  keys of the feature's other terms) are never dropped to make room.
- Measures: mean activation and share of active contexts per count (NaN at a count no context
  has); Spearman of activation against ``c`` over all measured (context, c) pairs.
- Threshold count ``c*``: the smallest count at which the majority state (more than half of
  the contexts active, or not) differs from the state at the lowest measured count; None if it
  never changes.
- A counting rule is reported only when ``|Spearman| > min_spearman``, ``c* >= 2`` (one
  occurrence is not enough: otherwise it is a presence rule) and the change agrees with the
  sign of Spearman (off -> on for 'increasing', on -> off for 'decreasing').

Token identity makes this a layer-0 test; at higher layers the key is detected by the input
SAE's activations rather than by its token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rulecheck.core.counterfactuals import repeat_token_batch, spread_positions
from rulecheck.core.distractors import split_positives
from rulecheck.core.exemplars import FeatureExamples
from rulecheck.core.heads import Probe
from rulecheck.core.metrics import spearman


@dataclass(frozen=True)
class CountingCurve:
    """Activation against the count ``c`` of the key in ``[1, t]`` (index ``c`` of each list;
    NaN where no context has that count)."""

    key: int
    mean_by_count: list[float]
    active_by_count: list[float]  # share of contexts with activation > 0
    spearman: float
    threshold_count: int | None
    n_contexts: int
    # [n_contexts, max_count + 1] activation of each base context by count (NaN: unmeasured)
    by_context: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def first_count(self) -> int:
        """The lowest count measured (1 when every context's query is the key)."""
        measured = [c for c, s in enumerate(self.active_by_count) if not math.isnan(s)]
        return measured[0] if measured else 0


@dataclass(frozen=True)
class CountingResult:
    """A detected counting rule: the feature turns on (``increasing``) or off
    (``decreasing``) once the key occurs ``threshold_count`` times in ``[1, t]``."""

    key: int
    direction: Literal["increasing", "decreasing"]
    threshold_count: int
    spearman: float
    mean_by_count: list[float]
    active_by_count: list[float]
    n_contexts: int


def default_filler(tokens: Tensor, exclude: tuple[int, ...] = ()) -> int:
    """The most frequent token after BOS in ``tokens [N, T]`` that is not in ``exclude`` and not
    a BOS token (ties to the lower id)."""
    body = tokens[:, 1:].flatten().long()
    counts = torch.bincount(body, minlength=int(tokens.max()) + 1)
    for tok in {*exclude, *tokens[:, 0].unique().tolist()}:
        if 0 <= tok < len(counts):
            counts[tok] = -1
    return int(torch.sort(counts, descending=True, stable=True).indices[0])


def base_contexts(
    tokens: Tensor, examples: FeatureExamples, key_token: int, filler_token: int, split: str
) -> tuple[Tensor, Tensor]:
    """Rows ``[n, T]`` and positions ``[n]``: the split's positives with the key in ``[1, t)``
    replaced by ``filler_token``."""
    seqs, t = split_positives(tokens, examples, split)
    seqs = seqs.clone()
    pos = torch.arange(seqs.shape[1], device=seqs.device)
    before_t = (pos > 0) & (pos < t.unsqueeze(1))
    seqs[(seqs == key_token) & before_t] = filler_token
    return seqs, t


def threshold_count(active_share: Tensor, majority: float = 0.5) -> int | None:
    """Smallest count whose majority state (share active > ``majority``) differs from that at
    the lowest measured count; ``active_share`` is ``[max_count + 1]``, NaN where unmeasured."""
    measured = ~active_share.isnan()
    if not measured.any():
        return None
    state = active_share > majority
    first = int(torch.nonzero(measured)[0])
    changed = torch.nonzero(measured & (state != state[first])).flatten()
    return int(changed[0]) if len(changed) else None


def own_counts(tokens: Tensor, t: Tensor, key_token: int) -> Tensor:
    """``[B]`` long: 1 where the query token at ``t`` is the key (it counts itself), else 0.
    ``tokens`` is ``[B, T]``."""
    return (tokens.gather(1, t.long().unsqueeze(1)).squeeze(1) == key_token).long()


def counting_curve(
    probe: Probe,
    tokens: Tensor,
    examples: FeatureExamples,
    key_token: int,
    max_count: int = 6,
    filler_token: int | None = None,
    split: str = "test",
    protect_tokens: Sequence[int] = (),
) -> CountingCurve:
    """Measure the feature against the count of ``key_token`` in ``[1, t]`` (see module doc).
    ``tokens`` is the corpus ``[N, T]`` the examples index; the filler defaults to
    ``default_filler``."""
    if filler_token is None:
        filler_token = default_filler(tokens, exclude=(key_token,))
    seqs, t = base_contexts(tokens, examples, key_token, filler_token, split)
    if len(seqs) == 0:
        zeros = [0.0] * (max_count + 1)
        return CountingCurve(key_token, zeros, zeros, 0.0, None, 0)
    guard = torch.tensor(list(protect_tokens), dtype=seqs.dtype, device=seqs.device)
    protect = torch.isin(seqs, guard)
    own = own_counts(seqs, t, key_token).cpu()
    rows = torch.arange(len(seqs))
    act = torch.full((len(seqs), max_count + 1), math.nan)  # [n_contexts, count]
    # every count's prompts in one call: the probe runs them in order of length
    prompts, ends, cells = [], [], []
    for n in range(max_count + 1 - int(own.min())):
        at = spread_positions(t, n)
        edit = repeat_token_batch(seqs, t, key_token, n, positions=at, protect=protect)
        count, fits = n + own, n + own <= max_count
        prompts.append(edit.tokens[fits.to(edit.tokens.device)])
        ends.append(edit.t[fits.to(edit.t.device)].cpu())
        cells.append((rows[fits], count[fits]))
    acts = probe.at(torch.cat(prompts), torch.cat(ends)).float()
    act[torch.cat([r for r, _ in cells]), torch.cat([c for _, c in cells])] = acts
    measured = ~act.isnan()
    counts = torch.arange(max_count + 1).expand_as(act)
    n_at = measured.sum(0)
    mean = torch.where(measured, act, 0.0).sum(0) / n_at
    active = ((act > 0) & measured).sum(0) / n_at  # NaN where n_at is 0
    return CountingCurve(
        key=key_token,
        mean_by_count=mean.tolist(),
        active_by_count=active.tolist(),
        spearman=spearman(counts[measured].double(), act[measured].double()),
        threshold_count=threshold_count(active),
        n_contexts=len(seqs),
        by_context=act,
    )


def context_spearman(act: Tensor) -> Tensor:
    """``[n]`` the Spearman correlation of each base context's activation with the count,
    over its measured counts (``act`` ``[n, counts]``, NaN where unmeasured; 0 for a constant
    curve)."""
    counts = torch.arange(act.shape[1], dtype=torch.float64)
    out = [
        spearman(counts[~row.isnan()], row[~row.isnan()].double())
        if (~row.isnan()).sum() > 1
        else 0.0
        for row in act
    ]
    return torch.tensor(out, dtype=torch.float64)


def as_counting_rule(curve: CountingCurve, min_spearman: float = 0.5) -> CountingResult | None:
    """The curve as a counting rule, or None when it does not pass the criteria."""
    c_star = curve.threshold_count
    if c_star is None or c_star < 2 or abs(curve.spearman) <= min_spearman:
        return None
    turns_on = curve.active_by_count[c_star] > curve.active_by_count[curve.first_count]
    direction: Literal["increasing", "decreasing"] = (
        "increasing" if curve.spearman > 0 else "decreasing"
    )
    if turns_on != (direction == "increasing"):
        return None
    return CountingResult(
        key=curve.key,
        direction=direction,
        threshold_count=c_star,
        spearman=curve.spearman,
        mean_by_count=curve.mean_by_count,
        active_by_count=curve.active_by_count,
        n_contexts=curve.n_contexts,
    )
