"""Absence and counting rules of an extracted feature (paper 4.2, 4.3).

Candidates come from the weights (distractors of the top terms) and from counterfactuals
(counting curves of the top terms' keys); each is measured on the feature's test positives.
Tokens stand for input features (their top token), so validation reads token identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from rulecheck.absence import Distractor, distractor_drop, find_distractors
from rulecheck.counting import CountingResult, as_counting_rule, counting_curve
from rulecheck.exemplars import FeatureExamples
from rulecheck.heads import HeadWeights, Probe
from rulecheck.scores import Terms

MIN_DROP = 0.5  # a distractor must at least halve the activation, on average, with one copy


@dataclass(frozen=True)
class AbsenceFinding:
    """A distractor of a term and its measured drop for 1..4 inserted copies (Fig. 6c)."""

    distractor: Distractor
    drop: list[float]

    @property
    def suppresses(self) -> bool:
        """The candidate absence rule: one copy halves the activation, on average."""
        return not any(math.isnan(x) for x in self.drop) and self.drop[0] >= MIN_DROP


def find_absence(
    probe: Probe,
    tokens: Tensor,
    ex: FeatureExamples,
    d: Tensor,
    w: HeadWeights,
    value_score: Tensor,
    terms: Terms,
    token_of: Tensor,
    top_terms: int = 3,
) -> list[AbsenceFinding]:
    """Distractors of the top terms, each with the mean relative drop of the activation when
    its token is inserted 1..4 times (NaN where no test positive reads the term). ``token_of``
    is ``[d_sae_in]``, the top token of each input feature (-1 where none)."""
    found = []
    for dis in find_distractors(d, w.W_Q, w.W_K, w.attn_scale, value_score, terms, top_terms):
        ids = [int(token_of[f]) for f in (dis.distractor, dis.key, dis.query)]
        if min(ids) < 0:
            continue
        drop = distractor_drop(probe, tokens, ex, ids[0], key_token=ids[1], query_token=ids[2])
        found.append(AbsenceFinding(dis, drop))
    return found


def find_counting(
    probe: Probe, tokens: Tensor, ex: FeatureExamples, terms: Terms, token_of: Tensor, top: int = 1
) -> list[tuple[int, CountingResult]]:
    """Counting rules ``(key input feature, result)`` on the keys of the top terms (threshold
    count >= 2)."""
    keys: list[int] = []
    for k in terms.key.tolist():
        if int(token_of[k]) >= 0 and k not in keys:
            keys.append(k)
        if len(keys) == top:
            break
    out = []
    for k in keys:
        rule = as_counting_rule(counting_curve(probe, tokens, ex, int(token_of[k])))
        if rule is not None:
            out.append((k, rule))
    return out
