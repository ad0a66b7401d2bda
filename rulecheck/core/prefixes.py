"""Input-SAE activations of exemplar prefixes, one forward pass per distinct sequence.

A prefix ``(seq, t)`` is a corpus sequence read up to position ``t``. The prefixes of many
features (a head's exemplars, a rulebook's test splits) share sequences, and attention is
causal: every distinct sequence runs once to ``blocks.{layer}.hook_resid_pre``, cut after the
last ``t`` any prefix reads it at, and each prefix takes its query activations at ``t`` and its
keys' running maximum over ``[0, t]`` from that one pass (``sequence_chunks``). A whole-layer
extraction can do without even that: the corpus pass that finds the exemplars keeps every
sequence's activations (``KeptInputs``) and the prefixes are read from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck.core.gradient import importance_from
from rulecheck.core.heads import by_end, encode_columns, resid_pre_hook
from rulecheck.core.modelview import Model
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


def _by_sequence(
    seq: Tensor, t: Tensor, batch_size: int
) -> Iterator[tuple[Tensor, int, Tensor, Tensor]]:
    """The distinct sequences of the prefixes ``(seq [n], t [n])``, ``batch_size`` at a time in
    order of their last ``t`` (``heads.by_end``): each batch's sequence ids, the length they are
    cut to, and its prefixes (indices into ``seq``) with the batch row of their sequence."""
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
        counts = starts[batch + 1] - starts[batch]
        rows = torch.cat([by_sequence[starts[b] : starts[b + 1]] for b in batch.tolist()])
        where = torch.repeat_interleave(torch.arange(len(batch)), counts)
        yield distinct[batch], end, rows, where


@torch.no_grad()
def sequence_chunks(
    model: Model,
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
    for seqs, end, rows, where in _by_sequence(seq, t, batch_size):
        toks = tokens[seqs.to(tokens.device), :end].to(device)
        resid = model(toks, stop_at_layer=layer)
        feats = sae_in.encode(resid) if columns is None else encode_columns(sae_in, resid, columns)
        yield SequenceChunk(rows, feats, toks, where.to(device), t.cpu()[rows].to(device))


KEPT_BYTES = 2 << 30  # the most ``KeptInputs`` holds; past it, prefixes run the model again


class KeptInputs:
    """The input-SAE activations of every corpus sequence, kept sparse (8 bytes a nonzero) as
    the corpus pass goes by (``observe``), so that exemplar prefixes are read from them
    (``chunks``) instead of running the model to the layer again. Past ``KEPT_BYTES`` it
    gives up (``complete`` stays False)."""

    def __init__(self, sae_in: SAE, layer: int, tokens: Tensor) -> None:
        self.sae_in, self.hook, self.tokens = sae_in, resid_pre_hook(layer), tokens
        self.n_seq = tokens.shape[0]
        self.d = sae_in.cfg.d_sae
        self.seen, self.nbytes, self.given_up = 0, 0, False
        # per observed batch: nonzeros of each sequence, their position * d + column (int32,
        # by sequence) and their values; joined once read (``_joined``)
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self._joined: tuple[Tensor, Tensor, Tensor] | None = None  # ptr [n_seq + 1], ...

    @property
    def complete(self) -> bool:
        return not self.given_up and self.seen == self.n_seq

    @torch.no_grad()
    def observe(self, store: dict[str, Tensor]) -> None:
        """Keep the next batch's activations, from the pass's ``hook_resid_pre``."""
        if self.given_up:
            return
        feats = self.sae_in.encode(store[self.hook])  # [batch, pos, d]
        flat = feats.reshape(feats.shape[0], -1)
        nz = flat.nonzero()  # [nnz, 2], by row, then index
        counts = torch.bincount(nz[:, 0], minlength=flat.shape[0]).cpu()
        self._parts.append((counts, nz[:, 1].to(torch.int32), flat[nz[:, 0], nz[:, 1]]))
        self.seen += flat.shape[0]
        self.nbytes += 8 * len(nz)
        if self.nbytes > KEPT_BYTES:
            self.given_up = True
            self._parts = []

    def dense(self, seqs: Tensor, end: int) -> Tensor:
        """``[len(seqs), end, d]``: the kept activations of sequences ``seqs``, cut at ``end``."""
        assert self.complete
        if self._joined is None:
            counts, index, values = (torch.cat(part) for part in zip(*self._parts, strict=True))
            self._joined = (torch.cat([counts.new_zeros(1), counts.cumsum(0)]), index, values)
            self._parts = []
        ptr, index, values = self._joined
        lo, n = ptr[seqs], ptr[seqs + 1] - ptr[seqs]
        start = torch.repeat_interleave(lo - (n.cumsum(0) - n), n)
        at = (start + torch.arange(int(n.sum()))).to(index.device)
        w, row = index[at].long(), torch.repeat_interleave(torch.arange(len(seqs)), n)
        keep = w < end * self.d  # positions before ``end``
        out = values.new_zeros(len(seqs) * end * self.d)
        out[(row.to(w.device) * end * self.d + w)[keep]] = values[at][keep]
        return out.view(len(seqs), end, self.d)

    def chunks(self, seq: Tensor, t: Tensor, batch_size: int) -> Iterator[SequenceChunk]:
        """``sequence_chunks`` of the prefixes ``(seq, t)``, read from the kept activations."""
        for seqs, end, rows, where in _by_sequence(seq, t, batch_size):
            feats = self.dense(seqs, end)
            toks = self.tokens[seqs.to(self.tokens.device), :end].to(feats.device)
            yield SequenceChunk(
                rows, feats, toks, where.to(feats.device), t.cpu()[rows].to(feats.device)
            )


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
        if q_all is None or k_all is None or t_all is None:  # the first chunk: all three
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
