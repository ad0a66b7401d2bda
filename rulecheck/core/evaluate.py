"""Scoring predicted activations against exemplars (pure tensor functions).

Rules read *columns*: input-SAE features, and token-id sets (a hand-written token reference is
active where one of its tokens is the input token). Predictions over a feature's exemplars are
scored on its test split: precision, recall, F1 and Spearman.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from rulecheck.core.exemplars import FeatureExamples
from rulecheck.core.heldout import FireCounts, any_of, joined, term_matches
from rulecheck.core.metrics import binary_scores, spearman
from rulecheck.core.prefixes import SequenceChunk
from rulecheck.core.rules import predict_from, window_key_act
from rulecheck.core.scores import Terms


@dataclass(frozen=True)
class Columns:
    """The input columns a feature's rules read: input-SAE features, then token-id sets."""

    features: tuple[int, ...]
    token_sets: tuple[tuple[int, ...], ...]

    def index(self, feature: int | None, token_ids: tuple[int, ...] = ()) -> int:
        """The column of an input feature, or of a token set when ``feature`` is None."""
        if feature is not None:
            return self.features.index(feature)
        return len(self.features) + self.token_sets.index(token_ids)

    @cached_property
    def token_members(self) -> tuple[Tensor, Tensor]:
        """The token ids of the token sets, sorted (``[u]``), and which sets hold each
        (``[u, n_sets]``, bool): every set's indicator from one lookup."""
        ids = sorted({i for ts in self.token_sets for i in ts})
        member = torch.zeros(len(ids), len(self.token_sets), dtype=torch.bool)
        row = {token: r for r, token in enumerate(ids)}
        for s, ts in enumerate(self.token_sets):
            member[[row[i] for i in ts], s] = True
        return torch.tensor(ids, dtype=torch.long), member


def token_set_hits(tokens: Tensor, columns: Columns) -> Tensor:
    """``[batch, pos, n_sets]`` bool: whether each token is in each of ``columns``' token
    sets."""
    ids, member = (x.to(tokens.device) for x in columns.token_members)
    if not len(ids):
        return torch.zeros(
            *tokens.shape, len(columns.token_sets), dtype=torch.bool, device=ids.device
        )
    at = torch.searchsorted(ids, tokens.long()).clamp(max=len(ids) - 1)  # [batch, pos]
    return member[at] & (ids[at] == tokens).unsqueeze(-1)


def input_columns(feats: Tensor, tokens: Tensor, columns: Columns) -> Tensor:
    """``[batch, pos, n_columns]``: the input-SAE features, then one indicator per token set.

    ``feats`` is ``[batch, pos, d_sae_in]``, ``tokens`` ``[batch, pos]``.
    """
    whole = columns.features == tuple(range(feats.shape[-1]))  # every column, in order
    parts = [feats if whole else feats[..., list(columns.features)]] if columns.features else []
    if columns.token_sets:
        parts.append(token_set_hits(tokens, columns).to(feats.dtype))
    if not parts:
        return feats.new_zeros(*feats.shape[:2], 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@dataclass
class Measured:
    """A feature's rules scored on its test split, its hard negatives counted
    (``core.heldout``); ``protocol_*`` without them, as the paper scores; ``corpus_precision``
    over the held-out positions where the rules fire (NaN where they never do)."""

    f1: float
    precision: float
    recall: float
    spearman: float
    n_test: int
    protocol_precision: float = float("nan")
    protocol_f1: float = float("nan")
    corpus_precision: float = float("nan")
    n_fire: int = 0
    n_hard: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def with_hard(act: Tensor, pred: Tensor, n_hard: int) -> tuple[Tensor, Tensor]:
    """``act, pred [n]`` (or ``pred [n, k]``) with ``n_hard`` hard negatives appended: the
    feature off where the rule predicts it on."""
    shape = (n_hard, *pred.shape[1:])
    return torch.cat([act, act.new_zeros(n_hard)]), torch.cat([pred, pred.new_ones(shape)])


def score_predictions(
    pred: Tensor, ex: FeatureExamples, fire: FireCounts | None = None
) -> Measured:
    """Binary scores and Spearman of predicted against true activations on the test split;
    precision and F1 with ``fire``'s hard negatives among the negatives."""
    test = ex.part("test").to(pred.device)
    act = ex.act.to(pred.device)[test]
    protocol = binary_scores(act, pred[test])
    n_hard = 0 if fire is None else fire.hard
    scores = binary_scores(*with_hard(act, pred[test], n_hard))
    return Measured(
        f1=float(scores["f1"]),
        precision=float(scores["precision"]),
        recall=float(scores["recall"]),
        spearman=spearman(pred[test].cpu(), act.cpu()),
        n_test=int(test.sum()),
        protocol_precision=float(protocol["precision"]),
        protocol_f1=float(protocol["f1"]),
        corpus_precision=float("nan") if fire is None else fire.precision,
        n_fire=0 if fire is None else fire.fire,
        n_hard=n_hard,
    )


def fire_positions(
    chunks: Iterable[SequenceChunk], n_seq: int, columns: Columns, terms: Sequence[Terms]
) -> list[Tensor]:
    """Per ``terms`` (whose columns index ``columns``), ``[n_seq, pos]`` bool: where it
    predicts the feature on at each position of ``n_seq`` sequences (``heldout.term_matches``),
    from ``chunks`` reading the sequences whole (one prefix per sequence, its rows its
    index), their activations those of every input feature."""
    read = columns
    every, offsets = joined(list(terms))
    out = None
    for chunk in chunks:
        cols = input_columns(chunk.feats, chunk.tokens, read)
        if out is None:
            out = torch.zeros(n_seq, cols.shape[1], len(terms), dtype=torch.bool)
        fire = any_of(term_matches(cols, every.to(cols.device)), offsets).cpu()
        out[chunk.rows.cpu(), : fire.shape[1]] = fire[chunk.where.cpu()]
    if out is None:
        return [torch.zeros(n_seq, 0, dtype=torch.bool) for _ in terms]
    return list(out.unbind(dim=2))


def union_columns(columns: Sequence[Columns]) -> tuple[Columns, list[Tensor]]:
    """The columns all of ``columns`` read, each feature's once, and for each ``Columns`` the
    index of each of its columns among them (``[n_columns]``, long)."""
    features = tuple(dict.fromkeys(f for c in columns for f in c.features))
    token_sets = tuple(dict.fromkeys(ts for c in columns for ts in c.token_sets))
    union = Columns(features, token_sets)
    index = [
        torch.tensor(
            [union.index(f) for f in c.features] + [union.index(None, ts) for ts in c.token_sets],
            dtype=torch.long,
        )
        for c in columns
    ]
    return union, index


class JoinedTerms:
    """The terms of several features end to end (feature ``i``'s are ``[offset[i],
    offset[i] + count[i])``), to predict rows of different owners in one pass. A feature with
    distance-bounded terms has none here (``bounded``): its rows are predicted on their own."""

    def __init__(self, terms: Sequence[Terms]) -> None:
        self.bounded = torch.tensor([t.bounded for t in terms], dtype=torch.bool)
        kept = [t for t in terms if not t.bounded]
        self.count = torch.tensor([0 if t.bounded else len(t) for t in terms], dtype=torch.long)
        self.offset = torch.cumsum(self.count, 0) - self.count
        empty = torch.zeros(0)
        self.query, self.key = (
            torch.cat([empty.long(), *(getattr(t, f) for t in kept)]) for f in ("query", "key")
        )
        self.attn, self.value = (
            torch.cat([empty, *(getattr(t, f) for t in kept)]) for f in ("attn", "value")
        )

    def predict(self, q_act: Tensor, k_max: Tensor, own: Tensor) -> Tensor:
        """``predict_from`` of each row of ``q_act, k_max [n, d_sae_in]`` under the terms of its
        owner ``own [n]`` (none bounded): the same products, the largest per row."""
        device = q_act.device
        count = self.count.to(device)[own]  # [n]
        row = torch.repeat_interleave(torch.arange(len(own), device=device), count)  # [m]
        start = self.offset.to(device)[own] - (torch.cumsum(count, 0) - count)  # [n]
        term = torch.arange(len(row), device=device) + start[row]  # [m]
        query, key, attn, value = (
            x.to(device)[term] for x in (self.query, self.key, self.attn, self.value)
        )
        fq = q_act.clamp(min=0)[row, query]
        fk = k_max.clamp(min=0)[row, key]
        contrib = (fq * fk).mul_(attn).mul_(fk).mul_(value)  # term_contributions's order
        contrib = torch.where((attn > 0) & (value > 0), contrib, 0.0)
        out = q_act.new_zeros(len(own))
        return out.scatter_reduce_(0, row, contrib, "amax", include_self=True)


def predict_prefixes(
    chunks: Iterable[SequenceChunk], owner: Tensor, columns: Columns, terms: Sequence[Terms]
) -> Tensor:
    """``[n]`` predicted activation of each prefix under the terms of its owner (``owner [n]``
    indexes ``terms``, whose columns index ``columns``), from ``chunks`` of the prefixes
    (``prefixes.sequence_chunks``, encoding the input features of ``columns`` in order): the
    rows of every feature without distance bounds at once (``JoinedTerms``), the others
    feature by feature."""
    read = Columns(tuple(range(len(columns.features))), columns.token_sets)
    joined_terms = JoinedTerms(terms)
    pred = torch.zeros(len(owner))
    for chunk in chunks:
        cols = input_columns(chunk.feats, chunk.tokens, read)
        q, k = chunk.stats(cols)
        mine_of = owner[chunk.rows].to(q.device)
        bounded = joined_terms.bounded.to(q.device)[mine_of]  # [rows]
        free = ~bounded
        if bool(free.any()):
            got = joined_terms.predict(q[free], k[free], mine_of[free])
            pred[chunk.rows[free.cpu()]] = got.float().cpu()
        for i in mine_of[bounded].unique().tolist():
            mine = mine_of == i
            own_terms = terms[i].to(q.device)
            where, t = chunk.where.to(q.device)[mine], chunk.t.to(q.device)[mine]
            k_act = window_key_act(cols, t, where, own_terms)
            own = predict_from(q[mine], k[mine], own_terms, k_act)
            pred[chunk.rows[mine.cpu()]] = own.float().cpu()
    return pred
