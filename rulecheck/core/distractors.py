"""Absence rules (paper 4.2, A.4): distractor keys that steal attention and suppress a feature.

For a skip-gram term ``[k] ... [q] -> g`` a distractor is a key ``k'`` with
``attn-score(q, k') > attn-score(q, k)`` and ``value-score(k', g) < 0``: where ``k'`` occurs
before the query, attention moves from ``k`` to ``k'`` and ``g`` is suppressed, giving the
absence rule ``[k'] ... [q] -/-> g``. The paper checks only the top term (``k*`` with the
highest value-score, ``q*`` with the highest attn-score with it) and the first such ``k'`` in
attention order; ``top_terms`` extends the search to more terms.

A distractor is a claim about text, so two more conditions hold:

- ``k'`` is text: its token occurs in the corpus body (positions >= 1) and is not BOS
  (``text_keys``). BOS is often the attention sink, with a high attn-score and a value-score
  of zero, but inserting it mid-sequence is no rule about text;
- ``value-score(k')`` is negative beyond numerical noise:
  ``value-score(k') < -VALUE_MARGIN * max_j |value-score(j)|`` over all keys ``j``.

Validation works on tokens, so it is for layer 0, where input feature ``j`` is read as the token
that activates it most (``tokens.top_token``). At higher layers a key, query or distractor is
detected by the input SAE's activations on the residual stream instead of by token identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rulecheck.core.counterfactuals import BatchEdit, insert_before_batch
from rulecheck.core.exemplars import FeatureExamples
from rulecheck.core.heads import Probe
from rulecheck.core.scores import QKForm, Terms, attn_scores

# A value-score is a float32 sum over d_model products: its rounding error is about
# sqrt(d_model) * 6e-8 of the largest score, at most d_model * 6e-8 (5e-5 at d_model 768,
# 2.5e-4 at 4096). 1e-3 of the largest score is above that bound, so a key that passes is
# negative by its weights and not by rounding, and it is far below the smallest value-score a
# real distractor needs (planted's ``unless`` writes -1e-2 of its key's value).
VALUE_MARGIN = 1e-3


@dataclass(frozen=True)
class Distractor:
    """A distractor key ``distractor`` (k') of the term ``[key] ... [query]``; ids are input-SAE
    features. ``attn_score`` is ``attn-score(query, distractor)``, ``value_score``
    ``value-score(distractor)`` (< 0) and ``key_attn_score`` ``attn-score(query, key)``."""

    query: int
    key: int
    distractor: int
    attn_score: float
    value_score: float
    key_attn_score: float


def find_distractors(
    d: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    form: QKForm | float,
    value_score: Tensor,
    terms: Terms,
    top_terms: int = 1,
    eligible: Tensor | None = None,
    max_distance: int = 0,
) -> list[Distractor]:
    """Distractors of the first ``top_terms`` of ``terms`` (in the order given, e.g.
    ``candidate_terms``'s, whose first term is the paper's ``(q*, k*)``), at most one per term.

    For term ``(q, k)``: the first key ``k'`` in descending ``attn-score(q, .)`` order (ties to
    the lower id) with ``attn-score(q, k') > attn-score(q, k)``, ``value-score(k')`` below
    ``-VALUE_MARGIN * max |value-score|`` and, with ``eligible`` (``[d_sae_in]`` bool, e.g.
    ``text_keys``), ``eligible[k']``; a key that fails is skipped for the next one.
    ``d`` is ``[d_sae_in, d_model]``, ``W_Q``/``W_K`` ``[d_model, d_head]``, ``value_score``
    ``[d_sae_in]`` for this output feature. For a positional head (``QKForm``) the scores
    compared are the largest over the distances up to ``max_distance``.
    """
    n = min(top_terms, len(terms))
    if n == 0:
        return []
    queries, keys = terms.query[:n], terms.key[:n]
    attn = attn_scores(d[queries], d, W_Q, W_K, form, max_distance)  # [n, d_sae_in]
    key_attn = attn.gather(1, keys.unsqueeze(1))  # [n, 1]
    negative = value_score < -VALUE_MARGIN * value_score.abs().max()
    if eligible is not None:
        negative = negative & eligible.to(negative.device)
    ok = (attn > key_attn) & negative.unsqueeze(0)
    masked = attn.masked_fill(~ok, -math.inf)
    best = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, 0]
    found = ok.gather(1, best.unsqueeze(1)).squeeze(1)
    return [
        Distractor(
            query=int(queries[i]),
            key=int(keys[i]),
            distractor=int(best[i]),
            attn_score=float(attn[i, best[i]]),
            value_score=float(value_score[best[i]]),
            key_attn_score=float(key_attn[i, 0]),
        )
        for i in range(n)
        if found[i]
    ]


def text_keys(tokens: Tensor, token_of: Tensor) -> Tensor:
    """``[d_sae_in]`` bool: input features whose token (``token_of``, -1 for none) occurs in the
    body of the corpus ``tokens [N, T]`` (positions >= 1) and is not a BOS token (column 0)."""
    body = tokens[:, 1:].flatten().long().cpu()
    size = max(int(tokens.max()), int(token_of.max())) + 1
    seen = torch.bincount(body, minlength=size) > 0
    seen[tokens[:, 0].long().cpu().unique()] = False
    ids = token_of.long().cpu()
    return (ids >= 0) & seen[ids.clamp(min=0)]


def occurs_before(tokens: Tensor, token: int) -> Tensor:
    """``[B, T]`` bool: ``token`` occurs in ``[1, j)`` (BOS excluded), for every position j."""
    hit = tokens == token
    hit[:, 0] = False
    return (hit.long().cumsum(dim=1) - hit.long()) > 0


def matches_term(tokens: Tensor, t: Tensor, key_token: int, query_token: int) -> Tensor:
    """``[B]`` bool: the prefix ending at ``t`` reads ``key ... query`` (query at ``t``, key
    somewhere in ``[1, t)``). ``tokens`` is ``[B, T]``."""
    t = t.long().unsqueeze(1)
    before = occurs_before(tokens, key_token).gather(1, t).squeeze(1)
    return before & (tokens.gather(1, t).squeeze(1) == query_token)


def split_positives(
    tokens: Tensor, examples: FeatureExamples, split: str = "test"
) -> tuple[Tensor, Tensor]:
    """Token rows ``[n, T]`` and positions ``[n]`` of the positives of one split."""
    mask = (examples.part(split) & (examples.act > 0)).cpu()
    seq, t = examples.seq.cpu()[mask], examples.t.cpu()[mask]
    return tokens[seq.to(tokens.device)], t.to(tokens.device)


def droppable_before(t: Tensor, length: int, protect: Tensor | None) -> Tensor:
    """``[B]``: positions in ``[1, t)`` that an insertion may drop (not ``protect``-ed)."""
    j = torch.arange(length, device=t.device).expand(len(t), length)
    free = (j >= 1) & (j < t.unsqueeze(1))
    if protect is not None:
        free &= ~protect.to(t.device)
    return free.sum(dim=1)


def distractor_drop(
    probe: Probe,
    tokens: Tensor,
    examples: FeatureExamples,
    distractor_token: int,
    copies: Sequence[int] = (1, 2, 3, 4),
    *,
    key_token: int | None = None,
    query_token: int | None = None,
    prepend: bool = True,
    split: str = "test",
) -> list[float]:
    """Mean relative drop ``(before - after) / before`` of the true activation at ``t`` over the
    positives of ``split`` when ``distractor_token`` is inserted ``n`` times, one value per
    ``n`` in ``copies`` (paper Fig. 6c; NaN when no positive qualifies).

    ``tokens`` is the corpus ``[N, T]`` the examples index. With ``key_token``/``query_token``
    only positives whose prefix reads ``key ... query`` are used. The copies go right after BOS
    (``prepend``, as in the paper) or right before ``t``; occurrences of the key are never
    dropped to make room. Token identity: layer 0 only (see module doc).
    """
    seqs, t = split_positives(tokens, examples, split)
    if key_token is not None and query_token is not None:
        keep = matches_term(seqs, t, key_token, query_token)
        seqs, t = seqs[keep], t[keep]
    protect = None if key_token is None else seqs == key_token
    # a positive whose prefix has too few tokens that may make room (all of them copies of the
    # key, or t = 1 at the end of the context) cannot take the copies: left out
    room = (seqs.shape[1] - 1 - t) + droppable_before(t, seqs.shape[1], protect)
    fits = room >= max(copies, default=0)
    seqs, t = seqs[fits], t[fits]
    protect = None if protect is None else protect[fits]
    if len(seqs) == 0:
        return [math.nan] * len(copies)
    # the unedited prompts and every copy count's in one call
    prompts, ends = [seqs], [t.cpu()]
    for n in copies:
        at = torch.ones_like(t) if prepend else t
        edit = insert_before_batch(seqs, t, [distractor_token] * n, at=at, protect=protect)
        prompts.append(edit.tokens)
        ends.append(edit.t.cpu())
    before, *after = probe.at(torch.cat(prompts), torch.cat(ends)).split(len(seqs))
    return [float(((before - a) / before).mean()) for a in after]


@dataclass(frozen=True)
class CopyDrops:
    """Copies of a distractor inserted right after BOS into a pool of prompts, one row per
    measured prompt: ``index`` ``[n]`` its row in the pool, ``before``/``after`` ``[n]`` the
    activation at its tracked position without and with the copies, ``edit`` the edited
    prompts."""

    index: Tensor
    before: Tensor
    after: Tensor
    edit: BatchEdit

    def __len__(self) -> int:
        return len(self.index)

    @property
    def drop(self) -> Tensor:
        """``[n]`` relative drop ``(before - after) / before`` of each prompt."""
        return (self.before - self.after) / self.before

    def mean(self) -> float:
        """The mean relative drop (NaN with no prompt)."""
        return _mean(self.drop)

    def weakest(self) -> int:
        """The row with the smallest drop (the first of equal ones)."""
        return int(torch.sort(self.drop, stable=True).indices[0])


def copy_drops(
    probe: Probe,
    rows: Tensor,
    t: Tensor,
    distractor_token: int,
    copies: int = 1,
    protect: Tensor | None = None,
) -> CopyDrops:
    """``copies`` copies of ``distractor_token`` inserted right after BOS into each prompt
    ``rows [B, T]`` tracked at ``t [B]``, measured in one call of ``probe`` (true activation).
    ``protect [B, T]`` marks tokens that are never dropped to make room. Prompts without room
    for the copies, and prompts whose activation before is not above 0 (the relative drop
    needs a positive one), are left out. The statistic of absence claims with a strength
    (``rulecheck.kinds.absence``); token identity: layer 0 only (see module doc)."""
    room = (rows.shape[1] - 1 - t) + droppable_before(t, rows.shape[1], protect)
    index = torch.nonzero(room >= copies).flatten().cpu()
    sel = index.to(rows.device)
    rows, t = rows[sel], t[sel]
    protect = None if protect is None else protect[sel]
    if len(index) == 0:
        empty = torch.zeros(0)
        return CopyDrops(index, empty, empty, BatchEdit(rows, t, t.new_zeros(0, copies), rows))
    edit = insert_before_batch(
        rows, t, [distractor_token] * copies, at=torch.ones_like(t), protect=protect
    )
    acts = probe.at(torch.cat([rows, edit.tokens]), torch.cat([t.cpu(), edit.t.cpu()]))
    before, after = acts.split(len(rows))
    ok = torch.nonzero(before > 0).flatten()
    kept = BatchEdit(
        tokens=edit.tokens[ok.to(rows.device)],
        t=edit.t[ok.to(edit.t.device)],
        inserted=edit.inserted[ok.to(edit.inserted.device)],
        origin=edit.origin[ok.to(edit.origin.device)],
    )
    return CopyDrops(index=index[ok], before=before[ok], after=after[ok], edit=kept)


@dataclass(frozen=True)
class Cooccurrence:
    """Corpus statistics of a term ``key ... query`` and its distractor (paper Fig. 6a, 6b).

    A sequence has the pattern when some query position has the key before it; the first such
    position ``j`` is used. ``share`` is the fraction of those sequences with the distractor in
    ``[1, j)``; the means are the feature's activation at ``j`` with and without it (NaN when
    a group is empty).
    """

    n_pattern: int
    n_with: int
    share: float
    mean_with: float
    mean_without: float


def _mean(x: Tensor) -> float:
    return float(x.mean()) if len(x) else math.nan


def cooccurrence_stats(
    tokens: Tensor, acts: Tensor, key_token: int, query_token: int, distractor_token: int
) -> Cooccurrence:
    """``Cooccurrence`` from ``tokens [N, T]`` and the feature's activations ``acts [N, T]``."""
    match = occurs_before(tokens, key_token) & (tokens == query_token)
    has = match.any(dim=1)
    j = match.long().argmax(dim=1, keepdim=True)  # first match
    with_d = occurs_before(tokens, distractor_token).gather(1, j).squeeze(1) & has
    act = acts.to(tokens.device).gather(1, j).squeeze(1)
    n_pattern, n_with = int(has.sum()), int(with_d.sum())
    return Cooccurrence(
        n_pattern=n_pattern,
        n_with=n_with,
        share=n_with / n_pattern if n_pattern else math.nan,
        mean_with=_mean(act[with_d]),
        mean_without=_mean(act[has & ~with_d]),
    )


def cooccurrence(
    probe: Probe, tokens: Tensor, key_token: int, query_token: int, distractor_token: int
) -> Cooccurrence:
    """``Cooccurrence`` over the corpus ``tokens [N, T]``, with the feature's true activations.
    Token identity: layer 0 only (see module doc)."""
    acts = probe.activations(tokens)
    return cooccurrence_stats(tokens.cpu(), acts, key_token, query_token, distractor_token)
