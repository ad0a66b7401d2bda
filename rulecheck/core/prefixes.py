"""Input-SAE activations of exemplar prefixes, one forward pass per distinct sequence.

A prefix ``(seq, t)`` is a corpus sequence read up to position ``t``. The prefixes of many
features (a head's exemplars, a rulebook's test splits) share sequences, and attention is
causal: every distinct sequence runs once to ``blocks.{layer}.hook_resid_pre``, cut after the
last ``t`` any prefix reads it at, and each prefix takes its query activations at ``t`` and its
keys' running maximum over ``[0, t]`` from that one pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from rulecheck.core.gradient import importance_from
from rulecheck.core.heads import by_end, encode_columns
from rulecheck.core.rules import prefix_stats
from rulecheck.core.scores import Terms


@dataclass(frozen=True)
class SequenceChunk:
    """A batch of distinct sequences and the prefixes that read them."""

    rows: Tensor  # [m] indices of the prefixes (into the ``seq``, ``t`` passed in)
    feats: Tensor  # [batch, pos, d] input-SAE activations (only the asked-for columns)
    tokens: Tensor  # [batch, pos]
    where: Tensor  # [m] the batch row of each prefix's sequence
    t: Tensor  # [m] each prefix's end

    def stats(self, feats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``q_act, k_max`` ``[m, d]`` of the chunk's prefixes (``rules.prefix_stats``) from
        ``feats [batch, pos, d]`` (default: the chunk's own)."""
        return prefix_stats(self.feats if feats is None else feats, self.t, self.where)


@torch.no_grad()
def sequence_chunks(
    model: HookedTransformer,
    sae_in: SAE,
    tokens: Tensor,
    layer: int,
    seq: Tensor,
    t: Tensor,
    batch_size: int,
    columns: Sequence[int] | None = None,
) -> Iterator[SequenceChunk]:
    """The prefixes ``(seq [n], t [n])`` of ``tokens [n_seq, pos]``, ``batch_size`` distinct
    sequences at a time (in order of their last ``t``, ``heads.by_end``), with their input-SAE
    activations (only ``columns``, in that order, when given). Every prefix comes in exactly one
    chunk."""
    device = model.cfg.device
    seq, t = seq.cpu().long(), t.cpu().long()
    if len(seq) == 0:
        return
    distinct, owner = torch.unique(seq, return_inverse=True)  # owner [n]: index into distinct
    last = torch.zeros(len(distinct), dtype=torch.long).scatter_reduce(
        0, owner, t, "amax", include_self=False
    )
    by_sequence = torch.argsort(owner, stable=True)  # prefixes grouped by their sequence
    starts = torch.searchsorted(owner[by_sequence], torch.arange(len(distinct) + 1))
    for batch, end in by_end(last, batch_size):
        toks = tokens[distinct[batch].to(tokens.device), :end].to(device)
        resid = model(toks, stop_at_layer=layer)
        feats = sae_in.encode(resid) if columns is None else encode_columns(sae_in, resid, columns)
        counts = starts[batch + 1] - starts[batch]
        rows = torch.cat([by_sequence[starts[b] : starts[b + 1]] for b in batch.tolist()])
        where = torch.repeat_interleave(torch.arange(len(batch)), counts)
        yield SequenceChunk(rows, feats, toks, where.to(device), t[rows].to(device))


@dataclass(frozen=True)
class PrefixFeatures:
    """One feature's prefixes as extraction scores them."""

    q_act: Tensor  # [n, d_sae_in] query activations at t
    k_max: Tensor  # [n, d_sae_in] key activations maxed over [0, t]
    importance: Tensor | None  # [n_terms] gradient importance over the train prefixes


def prefix_features(
    chunks: Iterable[SequenceChunk],
    sizes: Sequence[int],
    terms: Sequence[Terms] | None = None,
    train: Tensor | None = None,
    batch_size: int = 64,
) -> list[PrefixFeatures]:
    """Per feature, ``q_act`` and ``k_max`` of its prefixes, in their order, from ``chunks`` of
    the prefixes of all features concatenated (feature ``i`` owns ``sizes[i]`` of them, in
    turn); with ``terms`` (one ``Terms`` per feature) and ``train [n]`` (boolean), each
    feature's terms' gradient importance averaged over its train prefixes
    (``gradient.importance_from``), their key activations gathered as the chunks go by."""
    n = sum(sizes)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    offset = [0, *torch.cumsum(torch.tensor(list(sizes)), 0).tolist()]
    train_rows = torch.zeros(n, dtype=torch.bool) if train is None else train.cpu().bool()
    keys = [] if terms is None else [torch.unique(x.key) for x in terms]
    q_all = k_all = t_all = None
    fk_parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sizes]  # (rows, [m, pos, keys])
    for chunk in chunks:
        q, k = chunk.stats()
        if q_all is None:
            q_all, k_all = q.new_zeros(n, q.shape[1]), k.new_zeros(n, k.shape[1])
            t_all = chunk.t.new_zeros(n)
        at = chunk.rows.to(q.device)
        q_all[at], k_all[at], t_all[at] = q, k, chunk.t
        if terms is None:
            continue
        pick = train_rows[chunk.rows]
        mine_of = owner[chunk.rows]
        for i in mine_of[pick].unique().tolist():
            mine = pick & (mine_of == i)
            where = chunk.where[mine.to(chunk.where.device)]
            block = chunk.feats[where][:, :, keys[i].to(chunk.feats.device)]
            fk_parts[i].append((chunk.rows[mine], block))
    if q_all is None or k_all is None or t_all is None:
        empty = torch.zeros(0, 0)
        return [PrefixFeatures(empty, empty, None) for _ in sizes]
    out = []
    for i, (lo, hi) in enumerate(itertools.pairwise(offset)):
        importance = None
        if terms is not None and fk_parts[i]:
            importance = _importance(fk_parts[i], q_all, t_all, terms[i], batch_size)
        out.append(PrefixFeatures(q_all[lo:hi], k_all[lo:hi], importance))
    return out


def _importance(
    parts: list[tuple[Tensor, Tensor]], q_all: Tensor, t_all: Tensor, terms: Terms, batch: int
) -> Tensor:
    """One feature's gradient importance from its train prefixes' gathered key activations
    (``parts``: prefix rows and ``[m, pos, n_keys]`` blocks, ``pos`` varying by chunk)."""
    rows = torch.cat([r for r, _ in parts])
    width = max(b.shape[1] for _, b in parts)
    fk = torch.cat([torch.nn.functional.pad(b, (0, 0, 0, width - b.shape[1])) for _, b in parts])
    order = torch.argsort(rows)  # the prefixes in their own order
    rows, fk = rows[order], fk[order.to(fk.device)]
    at = rows.to(q_all.device)
    fq = q_all[at][:, terms.query.to(q_all.device)]
    return importance_from(fq, fk, t_all[at], terms, batch)
