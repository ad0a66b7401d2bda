"""Scoring predicted activations against exemplars (pure tensor functions).

Rules read *columns*: input-SAE features, and token-id sets (a hand-written token reference is
active where one of its tokens is the input token). Predictions over a feature's exemplars are
scored on its test split: precision, recall, F1 and Spearman.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rulecheck.core.exemplars import FeatureExamples
from rulecheck.core.metrics import binary_scores, spearman
from rulecheck.core.rules import predict
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


def input_columns(feats: Tensor, tokens: Tensor, columns: Columns) -> Tensor:
    """``[batch, pos, n_columns]``: the input-SAE features, then one indicator per token set.

    ``feats`` is ``[batch, pos, d_sae_in]``, ``tokens`` ``[batch, pos]``.
    """
    parts = [feats[..., list(columns.features)]] if columns.features else []
    for ids in columns.token_sets:
        hit = torch.isin(tokens, torch.tensor(ids, device=tokens.device))
        parts.append(hit.to(feats.dtype).unsqueeze(-1))
    if not parts:
        return feats.new_zeros(*feats.shape[:2], 0)
    return torch.cat(parts, dim=-1)


@dataclass
class Measured:
    """A feature's rules scored on its test split."""

    f1: float
    precision: float
    recall: float
    spearman: float
    n_test: int

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def score_predictions(pred: Tensor, ex: FeatureExamples) -> Measured:
    """Binary scores and Spearman of predicted against true activations on the test split."""
    test = ex.part("test").to(pred.device)
    act = ex.act.to(pred.device)[test]
    scores = binary_scores(act, pred[test])
    return Measured(
        f1=float(scores["f1"]),
        precision=float(scores["precision"]),
        recall=float(scores["recall"]),
        spearman=spearman(pred[test].cpu(), act.cpu()),
        n_test=int(test.sum()),
    )


def predict_examples(
    feats_chunks, columns: Columns, terms: Terms, n: int, device: torch.device
) -> Tensor:
    """``[n]`` predictions from chunks ``(rows, feats, tokens, t)`` of the examples."""
    pred = torch.zeros(n, device=device)
    terms = Terms(*(x.to(device) for x in (terms.query, terms.key, terms.attn, terms.value)))
    for rows, feats, tokens, t in feats_chunks:
        pred[rows.to(device)] = predict(input_columns(feats, tokens, columns), t, terms)
    return pred
