"""Checking a rulebook's skip-gram claims against a checkpoint.

A feature's terms are evaluated on freshly collected exemplars (the same protocol, seed and
split as extraction). A listed term is a claim that its pattern turns the feature on, so the
binary prediction is "some term's pattern is present"; recorded scores, when there are any,
only set the magnitude used for Spearman. Refs name an input-SAE feature or, in hand-written
rules, tokens: a token ref is active where one of its tokens is the input token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rulecheck.errors import RulecheckError
from rulecheck.exemplars import FeatureExamples
from rulecheck.metrics import binary_scores, spearman
from rulecheck.rulebook import FeatureRules, TokenRef
from rulecheck.rules import predict
from rulecheck.scores import Terms


@dataclass(frozen=True)
class Columns:
    """The input columns a rulebook reads: input-SAE features, then token-id sets."""

    features: tuple[int, ...]
    token_sets: tuple[tuple[int, ...], ...]

    def index(self, ref: Ref) -> int:
        if ref.feature is not None:
            return self.features.index(ref.feature)
        return len(self.features) + self.token_sets.index(ref.token_ids)


@dataclass(frozen=True)
class Ref:
    """A resolved ref: an input-SAE feature id, or the token ids it stands for."""

    feature: int | None
    token_ids: tuple[int, ...] = ()


def token_id(tokenizer, text: str, *, file: str, field: str) -> int:
    """The id of ``text`` as one token of ``tokenizer`` (as the rulebook writes tokens:
    decoded text, e.g. ``" then"``)."""
    if tokenizer is None:
        raise RulecheckError(
            f"names token {text!r} but the model has no tokenizer",
            file=file,
            field=field,
            fix="give the input feature id instead (feature: N)",
        )
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids == [unk] and text != tokenizer.unk_token:
        raise RulecheckError(
            f"token {text!r} is not in the model's vocabulary",
            file=file,
            field=field,
            fix="name a token of the model's tokenizer, or give the feature id",
        )
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise RulecheckError(
            f"token {text!r} is not one token of the model's tokenizer (it splits into {pieces})",
            file=file,
            field=field,
            fix="name a single token, e.g. one of those pieces, or give the feature id",
        )
    return int(ids[0])


def resolve_ref(ref: TokenRef, tokenizer, d_sae_in: int, *, file: str, field: str) -> Ref:
    """A feature id wins when given (its tokens are then a description); else the tokens."""
    if ref.feature is not None:
        if not 0 <= ref.feature < d_sae_in:
            raise RulecheckError(
                f"input feature {ref.feature} is out of range: the input SAE has "
                f"{d_sae_in} features",
                file=file,
                field=f"{field}.feature",
                fix=f"use a feature id in 0..{d_sae_in - 1}",
            )
        return Ref(ref.feature)
    ids = tuple(
        token_id(tokenizer, tok, file=file, field=f"{field}.tokens[{i}]")
        for i, tok in enumerate(ref.tokens)
    )
    return Ref(None, ids)


def feature_refs(
    rules: FeatureRules, tokenizer, d_sae_in: int, file: str
) -> list[tuple[Ref, Ref, float, float]]:
    """Each skip-gram as ``(key, query, attn, value)``; missing scores count as 1."""
    out = []
    for i, term in enumerate(rules.skipgrams):
        field = f"feature[{rules.feature}].skipgrams[{i}]"
        key = resolve_ref(term.key, tokenizer, d_sae_in, file=file, field=f"{field}.key")
        query = resolve_ref(term.query, tokenizer, d_sae_in, file=file, field=f"{field}.query")
        attn = 1.0 if term.attn_score is None else term.attn_score
        value = 1.0 if term.value_score is None else term.value_score
        out.append((key, query, attn, value))
    return out


def columns_of(refs: list[tuple[Ref, Ref, float, float]]) -> Columns:
    features, token_sets = [], []
    for key, query, _, _ in refs:
        for ref in (key, query):
            if ref.feature is not None and ref.feature not in features:
                features.append(ref.feature)
            if ref.feature is None and ref.token_ids not in token_sets:
                token_sets.append(ref.token_ids)
    return Columns(tuple(features), tuple(token_sets))


def terms_of(refs: list[tuple[Ref, Ref, float, float]], columns: Columns) -> Terms:
    """Terms over ``columns``; every listed term is live (its claim is that it fires)."""
    return Terms(
        query=torch.tensor([columns.index(q) for _, q, _, _ in refs], dtype=torch.int64),
        key=torch.tensor([columns.index(k) for k, _, _, _ in refs], dtype=torch.int64),
        attn=torch.tensor([abs(a) or 1.0 for _, _, a, _ in refs]),
        value=torch.tensor([abs(v) or 1.0 for _, _, _, v in refs]),
    )


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
        pred[rows] = predict(input_columns(feats, tokens, columns), t, terms)
    return pred
